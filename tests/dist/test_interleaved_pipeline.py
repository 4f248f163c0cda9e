"""The interleaved pipeline (megatron's virtual pipeline stages) in a 2-rank world: PP=2 with 2
virtual stages per rank (the tiny preset's 4 layers, one per model chunk).

* Both stages (patch K=4, then token) at PP=2 x V=2 follow the PP=1 run (DP=2): started from the
  same weights (the PP=1 run's checkpoint after its first patch step, saved as one chunk and
  resharded on load into two chunks per rank, optimizer state included), the per-step losses,
  gradient norms and validation losses agree within 1e-5 (fresh initialisation depends on the
  layout, so the first step is not compared).
* A PP=2 x V=2 checkpoint (``model0``, ``model1``) resumes at the same layout bit for bit.
* It converts with tools/convert_checkpoint.py to PP=1 and back to PP=2 x V=2 (the tool checks
  the logits each time; the weights come back bit for bit), and tools/evaluate.py gives the same
  loss at PP=2 x V=2, at PP=2 and, on the conversion, at PP=1.
"""

import json
import os

import pytest
import torch
import torch.distributed as dist

from megatron_patch.checkpoint import folders
from megatron_patch.checkpoint import store as checkpoint
from megatron_patch.training import cli
from tests import model_helpers as mh
from tests.model_helpers import shared_tmp
from tests.training.common import train_records, trainer_args
from tools import convert_checkpoint, evaluate

ITERS = 6  # K=4, lambda=2/3: 4 patch steps (2 micro-batches of 2 per step), then 2 token steps (8)
COMMON = ["--micro-batch-size", "2", "--eval-iters", "1", "--keep-last-checkpoints", "0"]
INTERLEAVED = ["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2"]
START = 1  # the interleaved run starts from the PP=1 run's checkpoint of this iteration


def _run(tiny_corpus, save, *flags):
    assert cli.main(trainer_args(tiny_corpus, save, *COMMON, *flags, train_iters=ITERS)) == 0


def _records(save):
    if dist.get_rank() != 0:
        return None
    return {"train": train_records(save), "valid": train_records(save, "valid")}


@pytest.fixture(scope="module")
def runs(world, tiny_corpus, tmp_path_factory):
    if world != 2:
        pytest.skip("runs in a 2-rank world")
    reference = shared_tmp(tmp_path_factory, "pp1")
    _run(tiny_corpus, reference, "--save-interval", str(START))
    interleaved = shared_tmp(tmp_path_factory, "pp2v2")
    start = folders.checkpoint_dir(reference, START)
    _run(tiny_corpus, interleaved, *INTERLEAVED, "--save-interval", "3", "--load", start)
    return {
        "pp1": reference,
        "pp2v2": interleaved,
        "pp2v2_patch": folders.checkpoint_dir(interleaved, 4),  # the patch stage's end, which conversion takes
        "pp1_records": _records(reference),
        "pp2v2_records": _records(interleaved),
    }


def test_both_stages_follow_pp1_from_the_same_weights(runs):
    if dist.get_rank() != 0:
        return
    reference, interleaved = runs["pp1_records"], runs["pp2v2_records"]
    assert sorted(interleaved["train"]) == list(range(START + 1, ITERS + 1))
    assert [interleaved["train"][i]["stage"] for i in range(START + 1, ITERS + 1)] == ["patch"] * 3 + ["token"] * 2
    for iteration, record in interleaved["train"].items():
        for key in ("loss", "grad_norm"):
            a, b = reference["train"][iteration][key], record[key]
            assert abs(a - b) <= 1e-5 * abs(a), (iteration, key, a, b)
    assert sorted(interleaved["valid"]) == sorted(reference["valid"]) == [4, ITERS]  # the boundary and the end
    for iteration, record in interleaved["valid"].items():
        a, b = reference["valid"][iteration]["loss"], record["loss"]
        assert abs(a - b) <= 1e-5 * abs(a), (iteration, a, b)


def test_the_checkpoint_records_the_layout_and_holds_every_chunk(runs):
    final = checkpoint.read_metadata(folders.resolve_checkpoint(runs["pp2v2"]))
    assert final["layout"] == {"pipeline": 2, "tensor": 1, "data": 1, "virtual_pipeline": 2}
    assert final["args"]["virtual_pipeline_model_parallel_size"] == 2
    assert final["progress"]["stage"] == "token" and final["progress"]["stage_complete"]
    single = checkpoint.read_metadata(folders.resolve_checkpoint(runs["pp1"]))
    assert single["layout"] == {"pipeline": 1, "tensor": 1, "data": 2}  # as before virtual stages
    saved, expected = (_model_tensors(runs[name]) for name in ("pp2v2", "pp1"))
    assert sorted(saved) == sorted(expected)  # the same global names: every layer of every chunk
    dist.barrier()


def test_resuming_at_pp2_v2_follows_the_run_bit_for_bit(runs, tiny_corpus, tmp_path_factory):
    """Iteration 3 (patch stage) of the interleaved run: both chunks' weights, the optimizer state
    of both and the LR schedule come back."""
    save = shared_tmp(tmp_path_factory, "pp2v2-resumed")
    _run(tiny_corpus, save, *INTERLEAVED, "--load", folders.checkpoint_dir(runs["pp2v2"], 3))
    if dist.get_rank() == 0:
        uninterrupted, resumed = runs["pp2v2_records"]["train"], train_records(save)
        assert sorted(resumed) == list(range(4, ITERS + 1))
        for iteration, record in resumed.items():
            assert record["loss"] == uninterrupted[iteration]["loss"], iteration
            assert record["grad_norm"] == uninterrupted[iteration]["grad_norm"], iteration
    dist.barrier()


def _model_tensors(path):
    tensors = mh.plain(folders.resolve_checkpoint(path))
    return {key: value for key, value in tensors.items() if not key.startswith("optimizer.")}


def _convert(source, save, *layout):
    argv = ["--cpu", "--load", source, "--save", save, "--tolerance", "1e-5", *layout]
    assert convert_checkpoint.main(argv) == 0


@pytest.fixture(scope="module")
def converted(runs, tmp_path_factory):
    folder = shared_tmp(tmp_path_factory, "converted")
    pp1, back = os.path.join(folder, "pp1"), os.path.join(folder, "pp2v2")
    _convert(runs["pp2v2_patch"], pp1)  # TP=1 PP=1: DP=2
    _convert(pp1, back, *INTERLEAVED)
    return {"pp1": pp1, "back": back}


def test_conversion_to_pp1_and_back_keeps_the_weights(runs, converted):
    source = _model_tensors(runs["pp2v2_patch"])
    for name in ("pp1", "back"):
        meta = checkpoint.read_metadata(folders.resolve_checkpoint(converted[name]))
        assert meta["conversion"]["max_abs_logit_diff"] <= 1e-5  # the tool's own logits check
        tensors = _model_tensors(converted[name])
        assert tensors.keys() == source.keys()
        assert all(torch.equal(tensors[key], source[key]) for key in source), name
    pp1 = checkpoint.read_metadata(folders.resolve_checkpoint(converted["pp1"]))
    assert pp1["layout"] == {"pipeline": 1, "tensor": 1, "data": 2}
    assert pp1["conversion"]["source_layout"] == {"pipeline": 2, "tensor": 1, "data": 1, "virtual_pipeline": 2}
    assert pp1["args"]["virtual_pipeline_model_parallel_size"] is None
    back = checkpoint.read_metadata(folders.resolve_checkpoint(converted["back"]))
    assert back["layout"] == {"pipeline": 2, "tensor": 1, "data": 1, "virtual_pipeline": 2}
    assert back["args"]["virtual_pipeline_model_parallel_size"] == 2
    dist.barrier()


def test_evaluation_gives_the_same_loss_at_every_layout(runs, converted, tiny_corpus, tmp_path_factory):
    folder = shared_tmp(tmp_path_factory, "evaluate")
    cases = {
        "pp2v2": (runs["pp2v2_patch"], INTERLEAVED),
        "pp2": (runs["pp2v2_patch"], ["--pipeline-model-parallel-size", "2"]),  # resharded on load
        "pp1": (converted["pp1"], []),
        "back": (converted["back"], INTERLEAVED),
    }
    results = {}
    # one document: 246 windows of 32 tokens, 31 micro-batches of 8, padded to 32 at PP=2 x V=2
    for name, (load, layout) in cases.items():
        output = os.path.join(folder, f"{name}.json")
        argv = ["--cpu", "--load", load, "--data-path", tiny_corpus["prefix"], "--max-documents", "1"]
        assert evaluate.main([*argv, "--micro-batch-size", "8", "--output-json", output, *layout]) == 0
        dist.barrier()
        with open(output) as f:
            results[name] = json.load(f)
    assert results["pp2v2"]["layout"] == {"tensor": 1, "pipeline": 2, "data": 1, "virtual_pipeline": 2}
    reference = results["pp1"]
    for name, result in results.items():
        assert result["tokens"] == reference["tokens"] > 0, name
        assert abs(result["loss"] - reference["loss"]) <= 1e-5 * reference["loss"], (name, result["loss"])
    dist.barrier()
