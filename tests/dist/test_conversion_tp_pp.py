"""tools/convert_checkpoint.py in a 2-rank world: a patch-stage checkpoint trained at TP=2 PP=1
becomes a token-stage start at TP=1 PP=2 and back at TP=2 PP=1 (the tool checks logits against
the source at TP=1 PP=1 each time; the weights come back bit for bit), the token stage trains from
it through the trainer, and evaluate.py gives the same loss at TP=2 and at PP=2."""

import json
import os

import pytest
import torch
import torch.distributed as dist

from megatron_patch.checkpoint import folders
from megatron_patch.checkpoint import store as checkpoint
from megatron_patch.training import cli
from tests.model_helpers import shared_tmp
from tests.training.common import train_records, trainer_args
from tools import convert_checkpoint, evaluate

ITERS = 3  # K=4, lambda=2/3: 2 patch steps (checkpoint iter 2), then 1 token step


def _model_tensors(path):
    from megatron.core import dist_checkpointing

    tensors = dist_checkpointing.load_plain_tensors(folders.resolve_checkpoint(path))
    return {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor) and not k.startswith("optimizer.")}


@pytest.fixture(scope="module")
def patch_checkpoint(world, tiny_corpus, tmp_path_factory):
    if world != 2:
        pytest.skip("runs in a 2-rank world")
    root = os.path.join(shared_tmp(tmp_path_factory, "conversion"), "run")
    code = cli.main(
        trainer_args(
            tiny_corpus,
            root,
            "--tensor-model-parallel-size",
            "2",
            "--eval-iters",
            "0",
            "--keep-last-checkpoints",
            "0",
            train_iters=ITERS,
        )
    )
    assert code == 0
    path = folders.checkpoint_dir(root, 2)
    meta = checkpoint.read_metadata(path)
    assert meta["progress"]["stage"] == "patch" and meta["layout"]["tensor"] == 2
    return path


@pytest.fixture(scope="module")
def converted(patch_checkpoint, tmp_path_factory):
    folder = shared_tmp(tmp_path_factory, "converted")
    pp2, back = os.path.join(folder, "tp1pp2"), os.path.join(folder, "tp2pp1")
    assert (
        convert_checkpoint.main(
            [
                "--cpu",
                "--load",
                patch_checkpoint,
                "--save",
                pp2,
                "--tolerance",
                "1e-5",
                "--tensor-model-parallel-size",
                "1",
                "--pipeline-model-parallel-size",
                "2",
            ]
        )
        == 0
    )
    assert (
        convert_checkpoint.main(
            [
                "--cpu",
                "--load",
                pp2,
                "--save",
                back,
                "--tolerance",
                "1e-5",
                "--tensor-model-parallel-size",
                "2",
                "--pipeline-model-parallel-size",
                "1",
            ]
        )
        == 0
    )
    return {"pp2": pp2, "back": back}


def test_round_trip_keeps_weights_and_logits(patch_checkpoint, converted):
    source = _model_tensors(patch_checkpoint)
    for name in ("pp2", "back"):
        meta = checkpoint.read_metadata(folders.resolve_checkpoint(converted[name]))
        assert meta["progress"]["stage"] == "token" and meta["iteration"] == 0
        assert meta["conversion"]["max_abs_logit_diff"] <= 1e-5  # the tool's own logits check
        tensors = _model_tensors(converted[name])
        assert tensors.keys() == source.keys()
        assert all(torch.equal(tensors[k], source[k]) for k in source), name
    pp2 = checkpoint.read_metadata(folders.resolve_checkpoint(converted["pp2"]))
    assert pp2["layout"] == {"data": 1, "pipeline": 2, "tensor": 1}
    assert pp2["conversion"]["source_layout"] == {"data": 1, "pipeline": 1, "tensor": 2}
    assert pp2["conversion"]["patch_size"] == 4
    back = checkpoint.read_metadata(folders.resolve_checkpoint(converted["back"]))
    assert back["conversion"]["source_layout"] == {"data": 1, "pipeline": 2, "tensor": 1}
    dist.barrier()


def test_token_stage_trains_from_the_converted_checkpoint(converted, tiny_corpus, tmp_path_factory):
    save = shared_tmp(tmp_path_factory, "token-stage")
    # a vanishing LR: the weights after the step are the converted ones (a fresh start would differ by ~0.02)
    code = cli.main(
        trainer_args(
            tiny_corpus,
            save,
            "--pipeline-model-parallel-size",
            "2",
            "--stage",
            "token",
            "--pretrained-checkpoint",
            converted["pp2"],
            "--eval-iters",
            "0",
            "--lr",
            "1e-9",
            train_iters=ITERS,
        )
    )
    assert code == 0
    final = checkpoint.read_metadata(folders.resolve_checkpoint(save))
    assert final["progress"]["stage"] == "token" and final["progress"]["stage_complete"]
    if dist.get_rank() == 0:
        records = train_records(save)
        assert sorted(records) == [ITERS] and records[ITERS]["stage"] == "token"
        assert torch.isfinite(torch.tensor(records[ITERS]["loss"]))
    start, trained = _model_tensors(converted["pp2"]), _model_tensors(save)
    for key in start:
        assert torch.allclose(trained[key], start[key], rtol=0, atol=1e-6), key
    dist.barrier()


def test_evaluation_is_the_same_at_tp2_and_pp2(converted, tiny_corpus, tmp_path_factory):
    folder = shared_tmp(tmp_path_factory, "evaluate")
    results = []
    for layout in (["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"]):
        output = os.path.join(folder, f"{layout[0]}.json")
        assert (
            evaluate.main(
                [
                    "--cpu",
                    "--load",
                    converted["back"],
                    "--data-path",
                    tiny_corpus["prefix"],
                    "--max-documents",
                    "1",
                    "--micro-batch-size",
                    "8",
                    "--output-json",
                    output,
                    *layout,
                ]
            )
            == 0
        )
        dist.barrier()
        results.append(json.load(open(output)))
    tp2, pp2 = results
    assert tp2["tokens"] == pp2["tokens"] > 0
    assert abs(tp2["loss"] - pp2["loss"]) <= 1e-5 * pp2["loss"]
    dist.barrier()


def test_ranks_that_read_different_checkpoints_are_refused_alike(
    patch_checkpoint, tiny_corpus, tmp_path_factory, capsys, caplog
):
    """Each rank resolves ``--load ROOT`` through the tracker on its own; here rank 1 reads the patch
    stage's checkpoint while rank 0 reads the newest, as when the training run saves in ROOT while
    the tool starts. Both ranks stop with the same one-line error before any weights are read."""
    root = os.path.dirname(patch_checkpoint)
    resolve = folders.resolve_checkpoint
    output = os.path.join(shared_tmp(tmp_path_factory, "mixed"), "eval.json")
    argv = ["--cpu", "--load", root, "--data-path", tiny_corpus["prefix"], "--max-documents", "1"]
    argv += ["--micro-batch-size", "8", "--output-json", output, "--tensor-model-parallel-size", "2"]
    try:
        if dist.get_rank() == 1:
            folders.resolve_checkpoint = lambda path: patch_checkpoint if path == root else resolve(path)
        assert evaluate.main(argv) != 0
    finally:
        folders.resolve_checkpoint = resolve
    expected = f"--load resolved to {folders.checkpoint_dir(root, ITERS)} on rank 0 but to {patch_checkpoint} on rank 1"
    said = capsys.readouterr().err if dist.get_rank() == 0 else caplog.text  # rank 0 prints, the others log
    assert expected in said
    assert not os.path.exists(output)
    dist.barrier()
