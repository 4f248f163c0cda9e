"""The trainer end to end in a 2-rank world: both stages at DP=2, TP=2 (with and without sequence
parallelism and the distributed optimizer) and PP=2 learn in both stages. DP=2 with the gradient
reduction overlapped with backward (plain, and distributed optimizer with the weight all-gather
overlapped with forward), and PP=2 with it, follow the trajectory and validation losses of the
same layout without it in both stages. Started from the same
weights (the DP=2 run's boundary checkpoint, resharded on load), every layout's token stage follows
the DP=2 run's trajectory, since the global batch and the data order do not depend on the layout.
(Fresh initialisation does depend on it, so the patch stages are compared at the model level, in
test_model_layouts.py.)"""

import json

import pytest
import torch.distributed as dist

from megatron_patch.training import cli
from tests import model_helpers as mh
from tests.model_helpers import shared_tmp
from tests.training.common import train_records, trainer_args

LAYOUTS = {
    "dp2": ["--save-interval", "5", "--keep-last-checkpoints", "0"],
    "tp2": ["--tensor-model-parallel-size", "2"],
    "tp2-sp-distopt": ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--use-distributed-optimizer"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
    "dp2-overlap": ["--overlap-grad-reduce"],
    "dp2-distopt-overlap": [
        "--use-distributed-optimizer",
        "--overlap-grad-reduce",
        "--overlap-param-gather",
        "--save-interval",
        "5",
        "--keep-last-checkpoints",
        "0",
    ],
    "pp2-overlap": ["--pipeline-model-parallel-size", "2", "--overlap-grad-reduce"],
}
ITERS = 18  # 12 patch steps, 6 token steps


def layout_args(tiny_corpus, save, name, *extra, eval_iters=1):
    """The tiny run in layout ``name`` (micro-batch 2, ``ITERS`` steps), plus ``extra`` flags."""
    micro_batch = ["--micro-batch-size", "2", "--eval-iters", str(eval_iters)]
    return trainer_args(tiny_corpus, save, *LAYOUTS[name], *micro_batch, *extra, train_iters=ITERS)


@pytest.fixture(scope="module")
def trajectories(world, tiny_corpus, tmp_path_factory):
    if world != 2:
        pytest.skip("runs in a 2-rank world")
    runs = {}
    for name in LAYOUTS:
        save = shared_tmp(tmp_path_factory, name)
        code = cli.main(layout_args(tiny_corpus, save, name))
        assert code == 0, name
        runs[name] = train_records(save) if dist.get_rank() == 0 else None
        runs[name + "_valid"] = train_records(save, "valid") if dist.get_rank() == 0 else None
        runs[name + "_save"] = save
    return runs


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_both_stages_learn(trajectories, name):
    if dist.get_rank() != 0:
        return
    records = trajectories[name]
    patch = [records[i]["loss"] for i in range(1, 13)]
    token = [records[i]["loss"] for i in range(13, 19)]
    assert {records[i]["stage"] for i in range(1, 13)} == {"patch"}
    assert sum(patch[-3:]) < sum(patch[:3]) and sum(token[-2:]) < sum(token[:2])


@pytest.mark.parametrize("name", ["dp2", "tp2", "pp2"])
def test_model_flops_are_logged_per_gpu(trajectories, name):
    """Each log window's TFLOP/s (and so MFU) is the run's model FLOP/s over the 2 ranks: the
    window's tokens/s (all ranks) times the stage's model FLOPs per token, halved."""
    if dist.get_rank() != 0:
        return
    with open(trajectories[name + "_save"] + "/metrics.jsonl") as f:
        (summary,) = [record for record in map(json.loads, f) if record["kind"] == "summary"]
    flops_per_token = {stage: s["flops"] / s["tokens"] for stage, s in summary["stages"].items()}
    for record in trajectories[name].values():
        expected = record["tokens_per_s"] * flops_per_token[record["stage"]] / 2 / 1e12
        assert record["tflops_per_gpu"] == pytest.approx(expected, rel=1e-9), record


@pytest.mark.parametrize(
    "name, reference", [("dp2-overlap", "dp2"), ("dp2-distopt-overlap", "dp2"), ("pp2-overlap", "pp2")]
)
def test_overlapped_gradient_reduction_follows_the_same_layout_without_it(trajectories, name, reference):
    """At DP=2 the token stage accumulates 4 micro-batches per replica (8 at PP=2), so the
    reductions must wait for the last one (megatron's no_sync); the patch stage has 1 (2). With
    --overlap-param-gather the validations (after a step, before the next forward) must see the
    updated weights."""
    if dist.get_rank() != 0:
        return
    for kind in ("", "_valid"):
        expected, observed = trajectories[reference + kind], trajectories[name + kind]
        assert sorted(observed) == sorted(expected)
        assert len(expected) == (ITERS if kind == "" else 2)  # validation at the boundary and the end
        for iteration, record in expected.items():
            for key in ("loss", "grad_norm") if kind == "" else ("loss",):
                a, b = record[key], observed[iteration][key]
                assert abs(a - b) <= 1e-5 * abs(a), (kind, iteration, key, a, b)


def test_a_checkpoint_with_no_forward_before_it_holds_the_updated_weights(trajectories, tiny_corpus, tmp_path_factory):
    """--overlap-param-gather leaves the weight all-gather to the next forward. Iteration 5 is saved
    with no validation (no forward) after its step: its weights are the DP=2 run's at iteration 5,
    and resuming from it follows the run."""
    name = "dp2-distopt-overlap"
    saves = [[trajectories[run + "_save"] + "/iter_0000005" for run in (name, "dp2")] if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(saves, src=0)
    source, reference = saves[0]
    saved, expected = (
        {key: tensor for key, tensor in mh.plain(path).items() if not key.startswith("optimizer")}
        for path in (source, reference)
    )  # the model's weights
    assert sorted(saved) == sorted(expected) and len(expected) > 5
    for key, tensor in expected.items():
        error = ((saved[key] - tensor).abs().max() / tensor.abs().max()).item()
        assert error < 1e-5, (key, error)
    source = [source]
    save = shared_tmp(tmp_path_factory, name + "-resumed")
    code = cli.main(layout_args(tiny_corpus, save, name, "--load", source[0]))
    assert code == 0
    if dist.get_rank() != 0:
        return
    uninterrupted, resumed = trajectories[name], train_records(save)
    assert sorted(resumed) == list(range(6, ITERS + 1))
    for iteration in resumed:
        assert resumed[iteration]["loss"] == uninterrupted[iteration]["loss"], iteration


@pytest.mark.parametrize("name", ["tp2", "tp2-sp-distopt", "pp2"])
def test_token_stage_from_the_boundary_checkpoint_matches_data_parallel(
    trajectories, tiny_corpus, tmp_path_factory, name
):
    boundary = [None]
    if dist.get_rank() == 0:
        boundary[0] = trajectories["dp2_save"] + "/iter_0000012"
    dist.broadcast_object_list(boundary, src=0)
    save = shared_tmp(tmp_path_factory, name + "-token")
    code = cli.main(
        layout_args(tiny_corpus, save, name, "--stage", "token", "--pretrained-checkpoint", boundary[0], eval_iters=0)
    )
    assert code == 0
    if dist.get_rank() != 0:
        return
    reference, other = trajectories["dp2"], train_records(save)
    assert sorted(other) == list(range(13, ITERS + 1))
    for iteration in range(13, ITERS + 1):
        a, b = reference[iteration]["loss"], other[iteration]["loss"]
        assert abs(a - b) <= 1e-5 * abs(a), (iteration, a, b)


def test_a_resume_at_another_tensor_size_with_the_distributed_optimizer_is_refused(
    trajectories, tiny_corpus, tmp_path_factory, capsys
):
    """The distributed optimizer's state reshards across data parallelism only: resuming the DP=2
    run at TP=2 is one line naming both layouts (it was a "corrupt checkpoint" error)."""
    name = "dp2-distopt-overlap"
    source = [trajectories[name + "_save"] + "/iter_0000005" if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(source, src=0)
    save = shared_tmp(tmp_path_factory, name + "-at-tp2")
    argv = layout_args(tiny_corpus, save, name, "--tensor-model-parallel-size", "2", "--load", source[0])
    capsys.readouterr()
    assert cli.main(argv) == 2
    if dist.get_rank() == 0:
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "saved at TP=1 PP=1 with the distributed optimizer" in err[0], err
        assert "(this run: TP=2 PP=1): resume at TP=1 PP=1" in err[0], err
