"""``--manual-gc``: the automatic collector is off during every step, collections run at start and
after every N-th global iteration only, and the collector's state comes back after the run."""

import gc

import pytest

from megatron_patch.training import cli, loop, manual_gc
from tests.training.common import trainer_args

ITERS = 12


class CountingGC:
    """The gc module for manual_gc.py, recording after how many steps each collection ran."""

    def __init__(self, steps):
        self.steps, self.collections = steps, []

    def collect(self, *args):
        self.collections.append(len(self.steps))
        return gc.collect(*args)

    def __getattr__(self, name):
        return getattr(gc, name)


@pytest.mark.parametrize("interval", [5, 0])
def test_collections_at_the_interval_with_the_collector_off(cpu_world, tiny_corpus, tmp_path, monkeypatch, interval):
    steps = []  # per step: was the automatic collector on?
    counting = CountingGC(steps)
    monkeypatch.setattr(manual_gc, "gc", counting)
    train_step = loop.train_step

    def recording_step(*args, **kwargs):
        steps.append(gc.isenabled())
        return train_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", recording_step)
    assert gc.isenabled()
    flags = ["--eval-iters", "0", "--manual-gc", "--manual-gc-interval", str(interval)]
    assert cli.main(trainer_args(tiny_corpus, tmp_path / "run", *flags, train_iters=ITERS)) == 0
    assert steps == [False] * ITERS
    assert counting.collections == [0] + list(range(interval, ITERS + 1, interval) if interval else [])
    assert gc.isenabled()


def test_without_the_flag_the_collector_is_left_alone(cpu_world, tiny_corpus, tmp_path, monkeypatch):
    steps = []
    counting = CountingGC(steps)
    monkeypatch.setattr(manual_gc, "gc", counting)
    train_step = loop.train_step
    monkeypatch.setattr(loop, "train_step", lambda *a, **k: steps.append(gc.isenabled()) or train_step(*a, **k))
    assert cli.main(trainer_args(tiny_corpus, tmp_path / "run", "--eval-iters", "0", train_iters=4)) == 0
    assert steps == [True] * 4 and counting.collections == []


def test_a_negative_interval_is_one_line(tiny_corpus, tmp_path, capsys):
    assert cli.main(trainer_args(tiny_corpus, tmp_path / "run", "--manual-gc", "--manual-gc-interval", "-1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--manual-gc-interval -1 must be >= 0" in err[0], err
