"""Exact resume with a stochastic model: with hidden and attention dropout on, a run resumed from a
mid-stage checkpoint logs the uninterrupted run's losses and grad norms bit for bit and ends in
the same whole checkpoint (RNG states included). Without the saved RNG states restored, the same
resume gives other losses: the comparison can fail."""

import shutil

import pytest

from megatron_patch.checkpoint import folders
from megatron_patch.checkpoint import store as checkpoint
from megatron_patch.checkpoint.compare import differences
from megatron_patch.training import cli
from tests.training.common import train_records, trainer_args

ITERS = 12  # 8 patch steps, 4 token steps
DROPOUT = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1"]


def _argv(corpus, save, *extra):
    return trainer_args(
        corpus,
        save,
        *DROPOUT,
        "--save-interval",
        "2",
        "--keep-last-checkpoints",
        "0",
        "--eval-iters",
        "0",
        *extra,
        train_iters=ITERS,
    )


@pytest.fixture(scope="module")
def uninterrupted(world, tiny_corpus, tmp_path_factory):
    save = tmp_path_factory.mktemp("dropout") / "uninterrupted"
    assert cli.main(_argv(tiny_corpus, save)) == 0
    return save


def _cut_back_to(save, iteration):
    """The --save folder as a run killed right after its checkpoint at ``iteration`` leaves it."""
    for later in range(iteration + 2, ITERS + 1, 2):
        shutil.rmtree(folders.checkpoint_dir(str(save), later))
    (save / folders.TRACKER).write_text(f"{iteration}\n")


@pytest.mark.parametrize("resume_at", [6, 10], ids=["patch-stage", "token-stage"])
def test_dropout_run_resumes_bit_for_bit(cpu_world, tiny_corpus, tmp_path, uninterrupted, resume_at):
    reference = train_records(uninterrupted)
    resumed = tmp_path / "resumed"
    shutil.copytree(uninterrupted, resumed)
    _cut_back_to(resumed, resume_at)
    assert cli.main(_argv(tiny_corpus, resumed, "--load", str(resumed))) == 0
    records = train_records(resumed)
    for iteration in range(resume_at + 1, ITERS + 1):
        assert records[iteration]["loss"] == reference[iteration]["loss"], iteration
        assert records[iteration]["grad_norm"] == reference[iteration]["grad_norm"], iteration
    final = folders.checkpoint_dir(str(uninterrupted), ITERS)
    assert differences(final, folders.checkpoint_dir(str(resumed), ITERS)) == []


def test_dropout_is_on(cpu_world, tiny_corpus, tmp_path, uninterrupted):
    """Same weights and data at iteration 1; only the dropout masks differ."""
    no_dropout = tmp_path / "no-dropout"
    assert cli.main(trainer_args(tiny_corpus, no_dropout, "--eval-iters", "0", train_iters=ITERS)) == 0
    assert train_records(no_dropout)[1]["loss"] != train_records(uninterrupted)[1]["loss"]


def test_without_the_saved_rng_the_resume_differs(cpu_world, tiny_corpus, tmp_path, uninterrupted, monkeypatch):
    reference = train_records(uninterrupted)
    load = checkpoint.load_checkpoint
    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda *a, **k: load(*a, **{**k, "restore_rng": False}))
    resumed = tmp_path / "resumed"
    shutil.copytree(uninterrupted, resumed)
    _cut_back_to(resumed, 6)
    assert cli.main(_argv(tiny_corpus, resumed, "--load", str(resumed))) == 0
    records = train_records(resumed)
    assert any(records[i]["loss"] != reference[i]["loss"] for i in range(7, ITERS + 1))
