"""The interleaved pipeline beside data parallelism, in a 4-rank world: DP=2 x PP=2 with 2 virtual
stages per rank (the tiny preset's 4 layers, one per model chunk) against PP=1 at DP=4.

Both runs take the same global batch (4 patch samples, then 16 token samples, one sequence per
micro-batch), so they differ only in where the layers sit, how many micro-batches each rank runs
(1 and 4 at DP=4; 2 and 8 through the interleaved schedule at DP=2) and the order of the gradient
reductions. Started from the same weights (the DP=4 run's checkpoint after its first patch step,
resharded on load into two chunks per rank and two data-parallel replicas), the per-step losses,
gradient norms and validation losses of both stages agree within 1e-5 (fresh initialisation
depends on the layout, so the first step is not compared).
"""

import pytest
import torch.distributed as dist

from megatron_patch.checkpoint import folders
from megatron_patch.checkpoint import store as checkpoint
from megatron_patch.training import cli
from tests.model_helpers import shared_tmp
from tests.training.common import train_records, trainer_args

ITERS = 6  # K=4, lambda=2/3: 4 patch steps, then 2 token steps
START = 1  # the interleaved run starts from the DP=4 run's checkpoint of this iteration
COMMON = ["--micro-batch-size", "1", "--eval-iters", "1", "--keep-last-checkpoints", "0"]
INTERLEAVED = ["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2"]


def _run(tiny_corpus, save, *flags):
    assert cli.main(trainer_args(tiny_corpus, save, *COMMON, *flags, train_iters=ITERS)) == 0


@pytest.fixture(scope="module")
def runs(world, tiny_corpus, tmp_path_factory):
    if world != 4:
        pytest.skip("runs in a 4-rank world")
    reference = shared_tmp(tmp_path_factory, "dp4")
    _run(tiny_corpus, reference, "--save-interval", str(START))
    interleaved = shared_tmp(tmp_path_factory, "dp2pp2v2")
    _run(tiny_corpus, interleaved, *INTERLEAVED, "--load", folders.checkpoint_dir(reference, START))
    return {"dp4": reference, "dp2pp2v2": interleaved}


def test_dp2_pp2_v2_follows_pp1_dp4_from_the_same_weights(runs):
    if dist.get_rank() == 0:
        final = checkpoint.read_metadata(folders.resolve_checkpoint(runs["dp2pp2v2"]))
        assert final["layout"] == {"pipeline": 2, "tensor": 1, "data": 2, "virtual_pipeline": 2}
        assert final["progress"]["stage"] == "token" and final["progress"]["stage_complete"]
        for kind, keys in (("train", ("loss", "grad_norm")), ("valid", ("loss",))):
            reference, interleaved = (train_records(runs[name], kind) for name in ("dp4", "dp2pp2v2"))
            expected = list(range(START + 1, ITERS + 1)) if kind == "train" else [4, ITERS]
            assert sorted(interleaved) == expected, kind
            for iteration, record in interleaved.items():
                for key in keys:
                    a, b = reference[iteration][key], record[key]
                    assert abs(a - b) <= 1e-5 * abs(a), (kind, iteration, key, a, b)
        stages = [record["stage"] for _, record in sorted(train_records(runs["dp2pp2v2"]).items())]
        assert stages == ["patch"] * 3 + ["token"] * 2
    dist.barrier()
