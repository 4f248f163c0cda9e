"""The multi-epoch recipe (``--stage-split epochs``) at TP=2 follows TP=1 (2 ranks).

Fresh initialisation depends on the layout, so both runs start from the same weights: the TP=1
run (DP=2) saves at iteration 2 of its patch stage, and the TP=2 run resumes from that checkpoint
(resharded on load). From there the two read the same samples of both epoch-split datasets (the
global batch and the data order do not depend on the layout), across the switch to the token stage,
and must give the same losses and gradient norms.
"""

import json
import lzma

import pytest
import torch.distributed as dist

from megatron_patch.training import cli
from tests.model_helpers import shared_tmp
from tests.training.common import REPO_ROOT, train_records, trainer_args

ITERS = 12  # 6 patch steps, then 6 token steps: about one epoch each of the 16 short documents


@pytest.fixture(scope="module")
def short_corpus(world, tiny_corpus, tmp_path_factory):
    """16 short documents (the first 600 characters of the bundled ones), built by rank 0."""
    if world != 2:
        pytest.skip("runs in a 2-rank world")
    folder = shared_tmp(tmp_path_factory, "short")
    if dist.get_rank() == 0:
        from tools import preprocess_data

        with lzma.open(REPO_ROOT / "examples" / "data" / "tiny.jsonl.xz", "rt", encoding="utf-8") as stream:
            records = [json.loads(line) for _, line in zip(range(16), stream)]
        with open(f"{folder}/short.jsonl", "w", encoding="utf-8") as out:
            for record in records:
                out.write(json.dumps({"text": record["text"][:600]}) + "\n")
        argv = ["--input", f"{folder}/short.jsonl", "--output-prefix", f"{folder}/short"]
        argv += ["--tokenizer-model", tiny_corpus["tokenizer"], "--append-eod", "--workers", "1"]
        assert preprocess_data.main(argv) == 0
    dist.barrier()
    return {"prefix": f"{folder}/short_text_document", "tokenizer": tiny_corpus["tokenizer"]}


def epoch_args(corpus, save, *extra):
    return trainer_args(
        corpus,
        save,
        "--stage-split",
        "epochs",
        "--patch-data-fraction",
        "0.5",
        "--split",
        "15,1,0",
        "--micro-batch-size",
        "2",
        "--eval-iters",
        "1",
        *extra,
        train_iters=ITERS,
    )


def test_tp2_follows_tp1_through_both_epoch_stages(short_corpus, tmp_path_factory):
    reference = shared_tmp(tmp_path_factory, "tp1")
    code = cli.main(epoch_args(short_corpus, reference, "--save-interval", "2", "--keep-last-checkpoints", "0"))
    assert code == 0
    other = shared_tmp(tmp_path_factory, "tp2")
    start = f"{reference}/iter_0000002"
    code = cli.main(epoch_args(short_corpus, other, "--tensor-model-parallel-size", "2", "--load", start))
    assert code == 0
    if dist.get_rank() != 0:
        return
    expected, observed = train_records(reference), train_records(other)
    assert sorted(observed) == list(range(3, ITERS + 1))
    assert [observed[i]["stage"] for i in range(3, ITERS + 1)] == ["patch"] * 4 + ["token"] * 6
    for iteration in range(3, ITERS + 1):
        for key in ("loss", "grad_norm"):
            a, b = expected[iteration][key], observed[iteration][key]
            assert abs(a - b) <= 1e-5 * abs(a), (iteration, key, a, b)
    valid = train_records(reference, "valid"), train_records(other, "valid")
    assert sorted(valid[0]) == sorted(valid[1]) == [6, ITERS]
    for iteration in (6, ITERS):
        a, b = valid[0][iteration]["loss"], valid[1][iteration]["loss"]
        assert abs(a - b) <= 1e-5 * abs(a), (iteration, a, b)
