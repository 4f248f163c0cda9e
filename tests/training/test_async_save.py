"""``--async-save`` through the real entry point: the checkpoints written in the background are
the synchronous run's, file for file (so a resume from one is a resume from those, which
``test_faults.py`` checks; the GPU test of ``test_trainer.py`` resumes from one itself); a
SIGTERM to the process group while a background save is in flight completes it, saves at the stop
and exits 0; kill -9 of the trainer while its background writer works leaves the previous
checkpoint, no writer and a free --save lock; a background write that fails stops the run with
one line and keeps the previous checkpoint; a run that ends on an error kills its writer before it
releases the --save lock."""

import json
import os
import signal
import subprocess
import time

import psutil
import pytest

from megatron_patch.checkpoint import folders
from megatron_patch.checkpoint import store as checkpoint
from megatron_patch.checkpoint.compare import differences
from megatron_patch.checkpoint.lock import SaveDirLock
from tests.training.common import REPO_ROOT, full_disk_in, launch, slow_writer_command, train_records, trainer_args

pytestmark = pytest.mark.slow  # whole-pipeline subprocess runs: scheduled first (tests/conftest.py)

ITERS = 12  # 8 patch steps (global 1-8), then 4 token steps (global 9-12)
FLAGS = ("--save-interval", "2", "--eval-iters", "0", "--keep-last-checkpoints", "0")


def _finish(process, timeout=240):
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def _records(save, kind):
    with open(os.path.join(save, "metrics.jsonl")) as f:
        return [record for record in map(json.loads, f) if record["kind"] == kind]


@pytest.fixture(scope="module")
def synchronous_run(tiny_corpus, tmp_path_factory):
    save = tmp_path_factory.mktemp("sync") / "run"
    code, output = _finish(launch(trainer_args(tiny_corpus, save, *FLAGS, train_iters=ITERS)))
    assert code == 0, output[-3000:]
    return save


@pytest.fixture(scope="module")
def async_run(tiny_corpus, tmp_path_factory):
    save = tmp_path_factory.mktemp("async") / "run"
    code, output = _finish(launch(trainer_args(tiny_corpus, save, *FLAGS, "--async-save", train_iters=ITERS)))
    assert code == 0, output[-3000:]
    return save, output


def test_background_checkpoints_equal_the_synchronous_ones(async_run, synchronous_run):
    save, output = async_run
    assert folders.tracker_value(str(save)) == ITERS
    assert folders.complete_iterations(str(save)) == list(range(2, ITERS + 1, 2))
    assert not [name for name in os.listdir(save) if name.endswith(".tmp")]
    for iteration in range(2, ITERS + 1, 2):
        ours, reference = (folders.checkpoint_dir(str(s), iteration) for s in (save, synchronous_run))
        checkpoint.check_files(ours)  # complete and matching its manifest
        assert differences(reference, ours) == [], iteration
    saved = {r["iteration"]: r for r in _records(save, "checkpoint")}
    assert sorted(saved) == list(range(2, ITERS + 1, 2))
    # interval saves go to the background, the run's last stays synchronous
    assert all("blocked_seconds" in saved[i] for i in range(2, ITERS, 2)), saved
    # completed at a later step's end (its scalars are logged there: W&B steps only go up)
    assert all(ITERS >= saved[i]["completed_at_iteration"] > i for i in range(2, ITERS, 2)), saved
    assert "blocked_seconds" not in saved[ITERS]
    assert "in the background (training waited" in output
    losses = train_records(save)
    reference = train_records(synchronous_run)
    assert [losses[i]["loss"] for i in range(1, ITERS + 1)] == [reference[i]["loss"] for i in range(1, ITERS + 1)]


def _slow_trainer(args, delay_s):
    return subprocess.Popen(
        slow_writer_command(delay_s, args),
        cwd=REPO_ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1", PYTHONUNBUFFERED="1"),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(condition, what, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"{what} did not happen")


def test_sigterm_during_a_background_save_completes_it_and_saves_at_the_stop(tiny_corpus, tmp_path, synchronous_run):
    save = tmp_path / "run"
    args = trainer_args(tiny_corpus, save, *FLAGS, "--async-save", train_iters=ITERS)
    trainer = _slow_trainer(args, 3)
    _wait_for(lambda: (save / "iter_0000002.tmp").is_dir() and _last_trained_iteration(save) >= 3, "a save in flight")
    assert not (save / "iter_0000002").exists()  # still in flight while training went on
    os.killpg(trainer.pid, signal.SIGTERM)
    code, output = _finish(trainer)
    assert code == 0, output[-3000:]
    stopped = folders.tracker_value(str(save))
    assert f"stopped by SIGTERM at iteration {stopped}" in output, output[-3000:]
    assert 2 in folders.complete_iterations(str(save)) and stopped > 2
    assert not [name for name in os.listdir(save) if name.endswith(".tmp")], os.listdir(save)
    for iteration in folders.complete_iterations(str(save)):
        checkpoint.check_files(folders.checkpoint_dir(str(save), iteration))
    code, output = _finish(launch(args + ["--load", str(save)]))
    assert code == 0, output[-3000:]
    records, reference = train_records(save), train_records(synchronous_run)
    assert [records[i]["loss"] for i in range(1, ITERS + 1)] == [reference[i]["loss"] for i in range(1, ITERS + 1)]


def _last_trained_iteration(save) -> int:
    try:
        return max(train_records(save), default=0)
    except (OSError, ValueError):
        return 0


def test_kill_9_during_a_background_save_leaves_the_previous_checkpoint(tiny_corpus, tmp_path):
    save = tmp_path / "run"
    args = trainer_args(tiny_corpus, save, *FLAGS, "--async-save", train_iters=ITERS)
    trainer = _slow_trainer(args, 60)
    _wait_for(lambda: (save / "iter_0000002.tmp").is_dir() and _last_trained_iteration(save) >= 3, "a save in flight")
    helpers = psutil.Process(trainer.pid).children(recursive=True)
    assert helpers, "no background writer"
    trainer.kill()
    trainer.wait()
    _, alive = psutil.wait_procs(helpers, timeout=10)
    assert not alive, alive  # the writer and megatron's helpers ended with the trainer
    assert folders.read_tracker(str(save)) is None and not (save / "iter_0000002").exists()
    SaveDirLock(str(save)).acquire().release()  # nothing left holds --save's lock: a resume may start


def test_a_failed_background_write_is_one_line_and_keeps_the_previous_checkpoint(
    cpu_world, tiny_corpus, tmp_path, monkeypatch, capsys
):
    """The forked writer of iteration 4's save fails (a full disk): the run stops with one line
    naming the save, the tracker stays on iteration 2, whose checkpoint loads, and the partial
    ``iter_0000004.tmp`` is never taken for a checkpoint; a resume trains to the end."""
    from megatron_patch.training import cli

    save = tmp_path / "run"
    args = trainer_args(tiny_corpus, save, *FLAGS, "--async-save", train_iters=ITERS)
    with monkeypatch.context() as patch:
        full_disk_in(patch, "iter_0000004.tmp")
        assert cli.main(args) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "background save of" in error[0] and "iter_0000004 failed" in error[0], error
    assert "No space left on device" in error[0], error
    assert folders.read_tracker(str(save)) == 2 and not (save / "iter_0000004").exists()
    checkpoint.check_files(folders.checkpoint_dir(str(save), 2))
    assert cli.main(args + ["--load", str(save)]) == 0
    assert folders.tracker_value(str(save)) == ITERS
    assert not [name for name in os.listdir(save) if name.endswith(".tmp")], os.listdir(save)


def test_a_run_ending_on_an_error_stops_its_writer_before_releasing_the_lock(
    cpu_world, tiny_corpus, tmp_path, monkeypatch
):
    """A step fails (here: a NaN loss at iteration 3) while iteration 2's save is being written:
    the writer is killed before the run releases --save's lock (else it would go on writing into a
    folder that a requeued run may already use), and its checkpoint stays an ``iter_N.tmp``."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    from megatron_patch.checkpoint import async_save
    from megatron_patch.errors import NonFiniteLossError
    from megatron_patch.training import cli, loop

    write = FileSystemWriterAsync.write_preloaded_data
    monkeypatch.setattr(
        FileSystemWriterAsync, "write_preloaded_data", staticmethod(lambda *a, **k: (time.sleep(60), write(*a, **k))[1])
    )
    train_step = loop.train_step
    steps = []

    def failing_step(*args, **kwargs):
        steps.append(1)
        if len(steps) == 3:
            raise NonFiniteLossError("the loss of iteration 3 is nan")
        return train_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", failing_step)
    save = tmp_path / "run"
    started = time.perf_counter()
    assert cli.main(trainer_args(tiny_corpus, save, *FLAGS, "--async-save", train_iters=ITERS)) != 0
    assert time.perf_counter() - started < 50  # not held up by the writer's 60 s
    manager = async_save._MANAGER._process.pid if async_save._MANAGER is not None else None
    writers = [p for p in psutil.Process().children(recursive=True) if p.pid != manager and p.is_running()]
    _, alive = psutil.wait_procs(writers, timeout=10)
    assert not alive, alive
    assert (save / "iter_0000002.tmp").is_dir() and folders.read_tracker(str(save)) is None
    assert not (save / ".lock").exists()  # released
