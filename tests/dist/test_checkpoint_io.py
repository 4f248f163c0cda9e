"""Checkpoint writing and reading shared by the data-parallel replicas, in a 2-rank world (DP=2,
plain optimizer, so the model and its whole Adam state are replicated): by default both replicas
write an even share of the replicated shards (against the control, --no-ckpt-fully-parallel-save,
where rank 0 writes nearly everything), the two checkpoints hold the same tensors, a resume that
reads with --ckpt-fully-parallel-load follows the uninterrupted run bit for bit, every save is
logged with its duration, and the same run with --async-save (each rank's share written by a
forked process while training goes on) writes the same checkpoints."""

import glob
import json
import os
import re
import shutil

import pytest
import torch.distributed as dist
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

from megatron_patch.checkpoint import folders as checkpoint_folders
from megatron_patch.checkpoint.compare import differences
from megatron_patch.training import cli
from tests import model_helpers as mh
from tests.model_helpers import shared_tmp
from tests.training.common import train_records, trainer_args

ITERS = 12  # 8 patch steps, 4 token steps
SAVE_FLAGS = ["--micro-batch-size", "2", "--eval-iters", "0", "--keep-last-checkpoints", "0"]
SHARD = re.compile(r"^__(\d+)_\d+\.distcp$")


def _train(corpus, save, *extra):
    code = cli.main(trainer_args(corpus, save, *SAVE_FLAGS, *extra, train_iters=ITERS))
    assert code == 0, extra


@pytest.fixture(scope="module")
def runs(world, tiny_corpus, tmp_path_factory):
    if world != 2:
        pytest.skip("runs in a 2-rank world")
    shared = shared_tmp(tmp_path_factory, "checkpoint-io")
    folders = {name: os.path.join(shared, name) for name in ("shared", "rank0", "resumed", "async")}
    _train(tiny_corpus, folders["shared"], "--save-interval", "3")
    _train(tiny_corpus, folders["async"], "--save-interval", "3", "--async-save")
    _train(tiny_corpus, folders["rank0"], "--save-interval", "6", "--no-ckpt-fully-parallel-save")
    if dist.get_rank() == 0:  # a --save folder whose latest checkpoint is the shared run's iteration 6
        os.makedirs(folders["resumed"])
        shutil.copytree(
            os.path.join(folders["shared"], "iter_0000006"), os.path.join(folders["resumed"], "iter_0000006")
        )
        with open(os.path.join(folders["resumed"], "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("6\n")
    dist.barrier()
    loads = []  # the resume must read through megatron's fully parallel load
    read = FullyParallelLoadStrategyWrapper.load
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            FullyParallelLoadStrategyWrapper, "load", lambda self, *a, **k: loads.append(1) or read(self, *a, **k)
        )
        _train(tiny_corpus, folders["resumed"], "--load", folders["resumed"], "--ckpt-fully-parallel-load")
    return dict(folders, fully_parallel_loads=len(loads))


def _bytes_per_rank(checkpoint):
    sizes = {}
    for path in glob.glob(os.path.join(checkpoint, "*.distcp")):
        rank = int(SHARD.match(os.path.basename(path)).group(1))
        sizes[rank] = sizes.get(rank, 0) + os.path.getsize(path)
    return sizes


def test_the_replicas_share_the_writing_of_the_same_checkpoint(runs):
    shared, rank0 = (_bytes_per_rank(os.path.join(runs[name], "iter_0000006")) for name in ("shared", "rank0"))
    assert min(shared.values()) >= 0.8 * max(shared.values()), shared
    assert rank0[1] < 0.1 * rank0[0], rank0  # the control: one replica writes what is replicated
    assert abs(sum(shared.values()) - sum(rank0.values())) < 0.05 * sum(rank0.values()), (shared, rank0)
    # collective: every rank loads both
    written, control = (mh.plain(os.path.join(runs[name], "iter_0000006")) for name in ("shared", "rank0"))
    assert sorted(written) == sorted(control) and any(key.startswith("optimizer") for key in control)
    for key, tensor in control.items():
        assert written[key].equal(tensor), key


def test_a_resume_read_by_all_replicas_follows_the_uninterrupted_run(runs):
    if dist.get_rank() != 0:
        return
    assert runs["fully_parallel_loads"] == 1
    uninterrupted, resumed = train_records(runs["shared"]), train_records(runs["resumed"])
    assert sorted(resumed) == list(range(7, ITERS + 1))
    for iteration in resumed:
        assert resumed[iteration]["loss"] == uninterrupted[iteration]["loss"], iteration
        assert resumed[iteration]["grad_norm"] == uninterrupted[iteration]["grad_norm"], iteration


def test_every_save_is_logged_with_its_duration(runs):
    if dist.get_rank() != 0:
        return
    with open(os.path.join(runs["shared"], "metrics.jsonl")) as f:
        saves = [record for record in map(json.loads, f) if record["kind"] == "checkpoint"]
    # every 3rd iteration, the stage boundary (8) and the end
    assert [record["iteration"] for record in saves] == [3, 6, 8, 9, 12]
    assert [record["stage"] for record in saves] == ["patch"] * 3 + ["token"] * 2
    for record in saves:
        assert record["seconds"] > 0 and os.path.isdir(record["path"]), record


def test_background_saves_write_the_same_checkpoints(runs):
    if dist.get_rank() != 0:
        return
    iterations = checkpoint_folders.complete_iterations(runs["async"])
    assert iterations == [3, 6, 8, 9, 12]
    for iteration in iterations:
        written, reference = (checkpoint_folders.checkpoint_dir(runs[name], iteration) for name in ("async", "shared"))
        assert differences(reference, written) == [], iteration
    with open(os.path.join(runs["async"], "metrics.jsonl")) as f:
        saves = [record for record in map(json.loads, f) if record["kind"] == "checkpoint"]
    assert [record["iteration"] for record in saves if "blocked_seconds" in record] == [3, 6, 8, 9]
