"""The multi-epoch recipe (``--stage-split epochs``) through the trainer: both stages read all the
training documents for the passes the budget gives them, the summary says how many; a kill -9 at
the stage switch resumes to the uninterrupted run's trajectory and final checkpoint; contradictory
flags end in one line.

The corpus is small on purpose (the first 600 characters of 16 bundled documents, ~3k tokens with
the 512-piece tokenizer; split 15 training documents, 1 validation), so 4 epochs take ~24 steps.
"""

import json
import lzma
import math
import os
import signal
import time
from pathlib import Path

import numpy
import pytest

from megatron_patch.checkpoint import folders
from megatron_patch.checkpoint.compare import differences
from megatron_patch.training import cli, loop
from megatron_patch.training.arguments import parse_args
from tests.training.common import REPO_ROOT, launch, train_records, trainer_args

pytestmark = pytest.mark.slow  # whole-pipeline subprocess runs: scheduled first (tests/conftest.py)

TOKENS_PER_STEP = 16 * 32  # trainer_args: G=16 sequences of T=32 tokens


@pytest.fixture(scope="module")
def short_corpus(tiny_corpus, tmp_path_factory):
    """{"prefix", "tokenizer", "train_tokens"}: 16 short documents, the last one for validation."""
    from tools import preprocess_data

    folder = tmp_path_factory.mktemp("short")
    with lzma.open(REPO_ROOT / "examples" / "data" / "tiny.jsonl.xz", "rt", encoding="utf-8") as stream:
        records = [json.loads(line) for _, line in zip(range(16), stream)]
    with open(folder / "short.jsonl", "w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps({"text": record["text"][:600]}) + "\n")
    assert (
        preprocess_data.main(
            [
                "--input",
                str(folder / "short.jsonl"),
                "--output-prefix",
                str(folder / "short"),
                "--tokenizer-model",
                tiny_corpus["tokenizer"],
                "--append-eod",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    prefix = str(folder / "short_text_document")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)  # keep it alive: its __del__ closes the mmap under the view
    lengths = numpy.array(dataset.sequence_lengths, dtype=numpy.int64)
    assert len(lengths) == 16
    return {"prefix": prefix, "tokenizer": tiny_corpus["tokenizer"], "train_tokens": int(lengths[:15].sum())}


def epoch_args(corpus, save=None, *extra, epochs=4):
    """K=4, lambda=1/2 over ``epochs`` passes: the fewest (even) steps that reach them."""
    iters = 2 * math.ceil(epochs * corpus["train_tokens"] / TOKENS_PER_STEP / 2)
    return trainer_args(
        corpus,
        save,
        "--stage-split",
        "epochs",
        "--patch-data-fraction",
        "0.5",
        "--split",
        "15,1,0",
        *extra,
        train_iters=iters,
    )


def _run(argv):
    from megatron_patch.runtime import parallel

    config = parse_args(argv, world_size=1)
    parallel.init_model_parallel(1, 1, seed=config.seed)
    trainer = loop.Trainer(config)
    return trainer, trainer.run()


def test_both_stages_read_all_training_documents_for_their_epochs(cpu_world, short_corpus, tmp_path):
    trainer, summary = _run(epoch_args(short_corpus, tmp_path / "run", "--summary-json", str(tmp_path / "s.json")))
    plan, data = trainer.plan, trainer.datasets
    W = short_corpus["train_tokens"]
    assert data.train_tokens == data.patch_tokens == data.token_tokens == W
    assert summary["stage_split"] == "epochs" and summary["corpus_train_tokens"] == W
    for name, planned in (("patch", plan.patch_iters), ("token", plan.token_iters)):
        stage = summary["stages"][name]
        assert stage["iterations"] == planned == plan.train_iters // 2
        assert stage["tokens"] == planned * TOKENS_PER_STEP
        assert stage["epochs"] == pytest.approx(planned * TOKENS_PER_STEP / W) and 2 <= stage["epochs"] < 2.1
    written = json.loads((tmp_path / "s.json").read_text())
    assert written["stages"]["token"]["epochs"] == summary["stages"]["token"]["epochs"]
    # megatron built 3 passes (2 and a bit) of all 15 training documents per stage, each in its own order
    for dataset in (data.patch_train, data.token_train):
        assert sorted(dataset.indices.tolist()) == list(range(15))
        counts = numpy.bincount(dataset.document_index, minlength=15)
        assert counts.tolist() == [3] * 15
    assert not numpy.array_equal(data.patch_train.document_index, data.token_train.document_index)
    assert set(numpy.unique(data.valid.document_index).tolist()) == {15}
    records = train_records(tmp_path / "run")
    assert [records[i]["stage"] for i in sorted(records)] == ["patch"] * plan.patch_iters + ["token"] * plan.token_iters


def test_documents_split_stays_the_default(cpu_world, short_corpus, tmp_path):
    argv = [a for a in epoch_args(short_corpus, None, "--eval-iters", "0") if a not in ("--stage-split", "epochs")]
    trainer, summary = _run(argv)
    data = trainer.datasets
    assert summary["stage_split"] == "documents"
    assert data.patch_tokens + data.token_tokens == short_corpus["train_tokens"]
    assert not set(data.patch_train.indices.tolist()) & set(data.token_train.indices.tolist())


@pytest.mark.parametrize("case", ["under_one_pass", "bad_mode"])
def test_contradictory_flags_give_one_line(cpu_world, short_corpus, capsys, case):
    if case == "under_one_pass":
        argv = epoch_args(short_corpus, None, epochs=0.5)
        expected = "under one pass over the"
    else:
        argv = epoch_args(short_corpus)
        argv[argv.index("epochs")] = "passes"
        expected = "--stage-split: invalid choice"
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and expected in err[0], err
    if case == "under_one_pass":
        assert "--stage-split documents" in err[0] and f"{short_corpus['train_tokens']} training tokens" in err[0]


def _finish(process, timeout=300):
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def test_kill_9_at_the_switch_then_resume_matches_uninterrupted_run(short_corpus, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    args = epoch_args(short_corpus, None, "--save-interval", "4", "--eval-iters", "0", epochs=2)
    iters = int(args[args.index("--train-iters") + 1])
    switch = iters // 2
    code, output = _finish(launch(args + ["--save", str(full)]))
    assert code == 0, output[-3000:]
    process = launch(args + ["--save", str(killed)])
    path = os.path.join(killed, "metrics.jsonl")
    deadline = time.time() + 240
    while not (os.path.exists(path) and max(train_records(killed), default=0) >= switch):
        assert process.poll() is None and time.time() < deadline, process.communicate()[0][-3000:]
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    resumed_from = folders.read_tracker(str(killed))
    assert resumed_from is not None and resumed_from < iters
    code, output = _finish(launch(args + ["--save", str(killed), "--load", str(killed)]))
    assert code == 0, output[-3000:]
    expected, observed = train_records(full), train_records(killed)
    assert sorted(observed) == list(range(1, iters + 1))
    for iteration in range(1, iters + 1):
        for key in ("loss", "lr", "grad_norm"):
            assert observed[iteration][key] == expected[iteration][key], (iteration, key, resumed_from)
    assert differences(folders.checkpoint_dir(str(full), iters), folders.checkpoint_dir(str(killed), iters)) == []
    summary = [json.loads(line) for line in Path(killed, "metrics.jsonl").read_text().splitlines()][-1]
    assert summary["kind"] == "summary" and summary["stage_split"] == "epochs"
    assert summary["stages"]["token"]["epochs"] == pytest.approx(
        (iters - switch) * TOKENS_PER_STEP / short_corpus["train_tokens"]
    )


def test_the_reproductions_multi_epoch_runs_are_the_recipes_three_arms(tiny_corpus):
    """examples/reproduce_small.py --epochs 4: each run's flags pass the trainer's checks, the budget
    is 4 passes rounded up to whole steps, and the arms train 4, 2 + 2 and the last 2 epochs."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("reproduce_small", REPO_ROOT / "examples" / "reproduce_small.py")
    repro = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(repro)
    settings = repro.settings(True, True)
    step = settings["gbs"] * settings["seq_length"]
    W = 78_460  # any corpus size: the first 12 bundled documents at the reduced tokenizer
    budget = repro.epoch_budget(W, 4, step)
    assert budget % step == 0 and 4 * W <= budget < 4 * W + step
    runs = repro.trainer_arguments(
        settings, "data/train_text_document", tiny_corpus["tokenizer"], budget, True, stage_split="epochs"
    )
    epochs = {}
    for name in ("token-only", "lambda-1_2", "control-lambda-1_2"):
        plan = parse_args([str(flag) for flag in runs[name]], world_size=1).plan
        assert plan.stage_split == "epochs" and plan.train_tokens == budget
        plan.check_epoch_budget(W)  # at least one pass: accepted
        epochs[name] = {stage.name: stage.iterations * step / W for stage in plan.stages}
    assert epochs["token-only"] == {"token": pytest.approx(4, abs=0.02)}
    assert epochs["lambda-1_2"] == {"patch": pytest.approx(2, abs=0.02), "token": pytest.approx(2, abs=0.02)}
    assert epochs["control-lambda-1_2"] == {"token": epochs["lambda-1_2"]["token"]}
