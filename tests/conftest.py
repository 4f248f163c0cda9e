"""Shared test setup: CPU mode, one gloo world per pytest process, model-parallel layouts.

``tests/unit`` and ``tests/data`` run in a plain pytest process (a world of one);
``tests/dist`` and ``tests/dist4`` run under ``torchrun --nproc_per_node=2`` / ``4``.
"""

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line(
        "markers",
        "slow: a module of whole-pipeline subprocess runs (30 s or more on 2 cores); collected first, so that "
        "the xdist workers of `make test` (--no-loadscope-reorder) start on them and end together",
    )


def pytest_collection_modifyitems(config, items):
    import torch

    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: the order within each group is kept
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def world():
    """torch.distributed over gloo in CPU mode (or NCCL when CUDA is present); returns world size."""
    import torch
    import torch.distributed as dist

    from megatron_patch.runtime import parallel

    parallel.init_distributed(cpu=not torch.cuda.is_available(), timeout_minutes=3)
    return dist.get_world_size()


@pytest.fixture
def model_parallel(world):
    """Call ``model_parallel(tp, pp, seed=...)`` to (re)build megatron's groups inside the world."""
    from megatron_patch.runtime import parallel

    def init(tensor_parallel=1, pipeline_parallel=1, seed=1234):
        if world % (tensor_parallel * pipeline_parallel):
            pytest.skip(f"needs a world divisible by TP*PP={tensor_parallel * pipeline_parallel}")
        parallel.init_model_parallel(tensor_parallel, pipeline_parallel, seed=seed)

    yield init
    parallel.destroy_model_parallel()


@pytest.fixture
def cpu_world(world, model_parallel):
    """A world of one with megatron's groups at TP=1, PP=1 (the in-process trainer tests)."""
    model_parallel(1, 1)
    return world


@pytest.fixture(scope="session")
def tiny_jsonl():
    """The bundled corpus, ``examples/data/tiny.jsonl.xz`` (the tests fail, never skip, without it)."""
    path = REPO_ROOT / "examples" / "data" / "tiny.jsonl.xz"
    assert path.is_file(), f"{path} is missing: it ships with the repository (git checkout it)"
    return path


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A SentencePiece model (vocab 512) and a ``.bin/.idx`` prefix of the tiny corpus, built with the
    project's own tools once per pytest process; in a torchrun world rank 0 builds, all ranks read."""
    import torch.distributed as dist

    def build():
        from tools import preprocess_data, train_tokenizer

        folder = tmp_path_factory.mktemp("corpus")
        source = REPO_ROOT / "examples" / "data" / "tiny.jsonl.xz"
        assert source.is_file(), f"{source} is missing: it ships with the repository (git checkout it)"
        source = str(source)
        assert (
            train_tokenizer.main(["--input", source, "--vocab-size", "512", "--output-prefix", str(folder / "tok")])
            == 0
        )
        assert (
            preprocess_data.main(
                [
                    "--input",
                    source,
                    "--output-prefix",
                    str(folder / "tiny"),
                    "--tokenizer-model",
                    str(folder / "tok.model"),
                    "--append-eod",
                    "--workers",
                    "1",
                ]
            )
            == 0
        )
        return {"tokenizer": str(folder / "tok.model"), "prefix": str(folder / "tiny_text_document")}

    if not dist.is_initialized():
        return build()
    holder = [build() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


@pytest.fixture
def counted_scans(monkeypatch):
    """The .bin paths the vocabulary check scans during a test (the scan itself still runs)."""
    from megatron_patch.data import vocab_check

    calls = []
    scan = vocab_check.scan_max_token_id

    def counted(bin_path, dtype):
        calls.append(bin_path)
        return scan(bin_path, dtype)

    monkeypatch.setattr(vocab_check, "scan_max_token_id", counted)
    return calls
