"""Faults through the real entry point (a process of its own): kill -9 and resume gives the
uninterrupted run's losses bit for bit and its whole final checkpoint (RNG states included);
SIGTERM to the process group after a save saves and exits 0, leaving no process behind; a kill
between renaming a checkpoint into place and writing the tracker resumes from the newest one
and leaves the tracker naming the newest; an interrupted save leaves the previous checkpoint
loadable; a save that meets a full disk stops the run with one line and keeps the previous
checkpoint; kill -9 of the trainer inside a save leaves no checkpoint writer running, and resumes."""

import os
import shutil
import signal
import time

import pytest

from megatron_patch.checkpoint import folders
from megatron_patch.checkpoint import store as checkpoint
from megatron_patch.checkpoint.compare import differences
from tests.training.common import (
    full_disk_in,
    launch,
    metadata_write_fails_in,
    slow_writer_command,
    train_records,
    trainer_args,
)

pytestmark = pytest.mark.slow  # whole-pipeline subprocess runs: scheduled first (tests/conftest.py)

ITERS = 12  # 8 patch steps (global 1-8), then 4 token steps (global 9-12)
EVERY_CHECKPOINT = ("--save-interval", "2", "--eval-iters", "0", "--keep-last-checkpoints", "0")  # 2, 4, ..., 12 kept


def _finish(process, timeout=240):
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def _wait_for_iteration(process, save, iteration, timeout=120):
    deadline = time.time() + timeout
    path = os.path.join(save, "metrics.jsonl")
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"trainer ended early: {process.communicate()[0][-3000:]}")
        if os.path.exists(path) and max(train_records(save), default=0) >= iteration:
            return
        time.sleep(0.005)
    raise AssertionError(f"iteration {iteration} not reached")


def _group_gone(process) -> bool:
    """True when no process of ``process``'s group (the trainer and all it started) is left."""
    try:
        os.killpg(process.pid, 0)
    except ProcessLookupError:
        return True
    return False


def _final_checkpoint_equal(save, reference_save):
    final = folders.checkpoint_dir(str(save), ITERS)
    assert folders.tracker_value(str(save)) == ITERS
    assert differences(folders.checkpoint_dir(str(reference_save), ITERS), final) == []


@pytest.fixture(scope="module")
def uninterrupted_run(tiny_corpus, tmp_path_factory):
    """The run's --save folder (every checkpoint kept: iterations 2, 4, ..., 12)."""
    save = tmp_path_factory.mktemp("full") / "run"
    code, output = _finish(launch(trainer_args(tiny_corpus, save, *EVERY_CHECKPOINT, train_iters=ITERS)))
    assert code == 0, output[-3000:]
    assert "Warning" not in output, output  # megatron's known notices stay out of the entry point's log
    return save


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run):
    return train_records(uninterrupted_run)


@pytest.mark.parametrize("kill_after", [3, 8, 10], ids=["patch-stage", "stage-switch", "token-stage"])
def test_kill_9_then_resume_matches_uninterrupted_run(
    tiny_corpus, tmp_path, uninterrupted, uninterrupted_run, kill_after
):
    save = tmp_path / "run"
    args = trainer_args(tiny_corpus, save, "--save-interval", "2", "--eval-iters", "0", train_iters=ITERS)
    process = launch(args)
    _wait_for_iteration(process, save, kill_after)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    resumed_from = folders.read_tracker(str(save))
    code, output = _finish(launch(args + ["--load", str(save)]))
    assert code == 0, output[-3000:]
    records = train_records(save)
    assert sorted(records) == list(range(1, ITERS + 1))
    for iteration in range(1, ITERS + 1):
        assert records[iteration]["loss"] == uninterrupted[iteration]["loss"], (iteration, resumed_from)
        assert records[iteration]["lr"] == uninterrupted[iteration]["lr"], iteration
        assert records[iteration]["grad_norm"] == uninterrupted[iteration]["grad_norm"], iteration
    _final_checkpoint_equal(save, uninterrupted_run)  # weights, Adam state, scheduler and RNG states


def test_resume_takes_a_complete_checkpoint_newer_than_the_tracker(
    tiny_corpus, tmp_path, uninterrupted, uninterrupted_run
):
    """A kill between renaming iter_10 into place and writing the tracker (still naming 8)."""
    save = tmp_path / "run"
    shutil.copytree(uninterrupted_run, save, ignore=shutil.ignore_patterns("iter_0000012", "metrics.jsonl"))
    (save / folders.TRACKER).write_text("8\n")
    args = trainer_args(tiny_corpus, save, *EVERY_CHECKPOINT, train_iters=ITERS)
    code, output = _finish(launch(args + ["--load", str(save)]))
    assert code == 0, output[-3000:]
    assert "names 8 but" in output and "iter_0000010 is complete and newer" in output, output[-3000:]
    assert "loaded full state from " + folders.checkpoint_dir(str(save), 10) in output
    records = train_records(save)
    assert sorted(records) == [11, 12]  # only the steps after the newest checkpoint ran
    for iteration in (11, 12):
        assert records[iteration]["loss"] == uninterrupted[iteration]["loss"], iteration
    _final_checkpoint_equal(save, uninterrupted_run)


def test_sigterm_saves_and_exits_zero_then_resumes(tiny_corpus, tmp_path, uninterrupted, uninterrupted_run):
    """SIGTERM to the whole process group after the first periodic save: megatron's checkpoint
    writer has run by then, so whatever it started got the signal too (before the fix a
    Manager process died of it and the stop-save failed with BrokenPipeError, 3 of 3 tries)."""
    save = tmp_path / "run"
    args = trainer_args(
        tiny_corpus,
        save,
        "--eval-iters",
        "0",
        "--save-interval",
        "2",
        "--keep-last-checkpoints",
        "0",
        train_iters=ITERS,
    )
    process = launch(args)
    _wait_for_iteration(process, save, 3)
    os.killpg(process.pid, signal.SIGTERM)
    code, output = _finish(process)
    assert code == 0, output[-3000:]
    assert "stopped by SIGTERM" in output
    assert _group_gone(process)  # no helper process outlives the trainer
    saved = folders.tracker_value(str(save))
    assert saved is not None and 3 <= saved < ITERS and "stopped by SIGTERM at iteration %d" % saved in output
    assert not [name for name in os.listdir(save) if name.endswith(".tmp")], os.listdir(save)
    checkpoint.check_files(folders.checkpoint_dir(str(save), saved))  # complete, matches its manifest
    code, output = _finish(launch(args + ["--load", str(save)]))
    assert code == 0, output[-3000:]
    records = train_records(save)
    assert [records[i]["loss"] for i in range(1, ITERS + 1)] == [uninterrupted[i]["loss"] for i in range(1, ITERS + 1)]
    _final_checkpoint_equal(save, uninterrupted_run)


def test_interrupted_save_leaves_previous_checkpoint(world, model_parallel, tiny_corpus, tmp_path, monkeypatch):
    """A save that dies half-way (here: the writer raises after writing part of it) leaves the
    tracker on the previous checkpoint, which still loads; the partial one is not mistaken for one,
    and the next completed save removes every partial one."""
    import shutil

    from megatron.core import dist_checkpointing

    from megatron_patch.training import cli

    save = tmp_path / "run"
    args = trainer_args(
        tiny_corpus, save, "--eval-iters", "0", "--save-interval", "2", "--keep-last-checkpoints", "0", train_iters=6
    )
    assert cli.main(args) == 0
    # roll the run back to iteration 2, as if it had stopped there
    for iteration in (4, 6):
        shutil.rmtree(folders.checkpoint_dir(str(save), iteration))
    (save / folders.TRACKER).write_text("2\n")
    real_save = dist_checkpointing.save

    def dying_save(state, directory, *args, **kwargs):
        real_save(state, directory, *args, **kwargs)
        open(os.path.join(directory, "partial.bin"), "wb").write(b"\0" * 10)
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(dist_checkpointing, "save", dying_save)
    assert cli.main(args + ["--load", str(save)]) == 130  # Ctrl-C: one line, 128 + SIGINT
    monkeypatch.setattr(dist_checkpointing, "save", real_save)
    assert folders.read_tracker(str(save)) == 2
    assert os.path.isdir(folders.checkpoint_dir(str(save), 4) + ".tmp"), os.listdir(save)
    assert not os.path.exists(folders.checkpoint_dir(str(save), 4))
    # as if a pre-emption's save at iteration 3 (never saved again) had been killed too
    shutil.copytree(folders.checkpoint_dir(str(save), 4) + ".tmp", folders.checkpoint_dir(str(save), 3) + ".tmp")
    # resuming loads iteration 2 and finishes, replacing the partial directory; its first save
    # removes the other one
    assert cli.main(args + ["--load", str(save)]) == 0
    assert folders.read_tracker(str(save)) == 6
    assert not [name for name in os.listdir(save) if name.endswith(".tmp")], os.listdir(save)


def test_a_saved_checkpoint_is_on_disk_before_the_tracker_names_it(cpu_world, tiny_corpus, tmp_path, monkeypatch):
    """Every file of a checkpoint is flushed to disk (megatron leaves common.pt and metadata.json
    in the page cache), and so is the --save folder after the checkpoint's rename and before the
    tracker's: after a power loss the tracker never names a checkpoint the disk lacks."""
    from megatron_patch.checkpoint import manifest
    from megatron_patch.training import cli

    synced = []  # the paths fsync was called on, in order
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    save = tmp_path / "run"
    assert cli.main(trainer_args(tiny_corpus, save, "--eval-iters", "0", train_iters=2)) == 0
    final = folders.checkpoint_dir(str(save), 2)
    for name in manifest.read_manifest(final):
        assert os.path.join(final + ".tmp", name) in synced, name
    tracker_written = max(i for i, path in enumerate(synced) if os.path.basename(path).startswith(".latest_"))
    assert synced[tracker_written - 1] == str(save), synced  # the folder, with the checkpoint's new name


@pytest.mark.parametrize("failing", [full_disk_in, metadata_write_fails_in], ids=["shards", "metadata"])
def test_a_failed_save_is_one_line_and_keeps_the_previous_checkpoint(
    cpu_world, tiny_corpus, tmp_path, monkeypatch, capsys, failing
):
    """Iteration 4's save meets a full disk, while megatron writes the shards or while the
    checkpoint's metadata is written: the run stops with one line naming the save and the fix
    (exit 2, no traceback), the tracker stays on iteration 2, whose checkpoint is intact, the
    partial ``iter_0000004.tmp`` is never taken for a checkpoint, and a resume trains to the end."""
    from megatron_patch.training import cli

    save = tmp_path / "run"
    args = trainer_args(tiny_corpus, save, *EVERY_CHECKPOINT, train_iters=ITERS)
    capsys.readouterr()
    with monkeypatch.context() as patch:
        failing(patch, "iter_0000004.tmp")
        assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the save of ") and "iter_0000004 failed (" in err[0], err
    assert "No space left on device" in err[0] and err[0].endswith(f"then resume with --load {save}"), err
    assert folders.read_tracker(str(save)) == 2 and not (save / "iter_0000004").exists()
    assert (save / "iter_0000004.tmp").is_dir()
    checkpoint.check_files(folders.checkpoint_dir(str(save), 2))
    assert cli.main(args + ["--load", str(save)]) == 0
    assert folders.tracker_value(str(save)) == ITERS
    assert not [name for name in os.listdir(save) if name.endswith(".tmp")], os.listdir(save)


def test_resume_of_a_finished_run_repairs_the_tracker(tiny_corpus, tmp_path, uninterrupted_run):
    """A kill between renaming the last checkpoint into place and writing the tracker: the resumed
    run has no step left to save, and still leaves the tracker naming the newest checkpoint."""
    save = tmp_path / "run"
    shutil.copytree(uninterrupted_run, save)
    (save / folders.TRACKER).write_text("10\n")
    args = trainer_args(tiny_corpus, save, "--save-interval", "2", "--eval-iters", "0", train_iters=ITERS)
    code, output = _finish(launch(args + ["--load", str(save)]))
    assert code == 0, output[-3000:]
    assert (save / folders.TRACKER).read_text() == f"{ITERS}\n"
    assert f"named 10; now names {ITERS}" in output


def test_kill_9_inside_a_save_leaves_no_writer_and_the_resume_runs(tiny_corpus, tmp_path):
    """kill -9 of the trainer alone (as the OOM killer does it) while its forked checkpoint writer
    works: the writer ends with it (else it kept the --save lock and every resume was refused)."""
    import subprocess

    import psutil

    from tests.training.common import REPO_ROOT

    save = tmp_path / "run"
    args = trainer_args(tiny_corpus, save, "--eval-iters", "0", "--save-interval", "2", train_iters=ITERS)
    trainer = subprocess.Popen(
        slow_writer_command(60, args),
        cwd=REPO_ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    writers = []
    while not (writers and (save / "iter_0000002.tmp").is_dir()) and time.time() < deadline:
        writers = [p for p in psutil.Process(trainer.pid).children(recursive=True) if p.is_running()]
        time.sleep(0.02)
    assert writers and (save / "iter_0000002.tmp").is_dir(), "no save under way"
    trainer.kill()
    trainer.wait()
    gone, alive = psutil.wait_procs(writers, timeout=10)
    assert not alive, alive
    code, output = _finish(launch(args + ["--load", str(save)]))
    assert code == 0, output[-3000:]
    assert folders.tracker_value(str(save)) == ITERS
