"""Pre-emption under torchrun: SIGTERM to the whole process group (launcher, workers and whatever
they started, as scancel or a SLURM time limit delivers it), or to the workers alone, right after
the first periodic save makes every rank save at the current step and exit 0, leaves a complete
checkpoint that matches its manifest, no ``iter_*.tmp`` and no process; the run then resumes to
the end (shown once, for the group). Also the signal names ``preemption.parse_signals`` accepts
and the handler ``StopSignals`` installs."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from megatron_patch.checkpoint import folders
from megatron_patch.checkpoint import store as checkpoint
from megatron_patch.training.preemption import StopSignals, parse_signals
from tests.training.common import ENTRY, REPO_ROOT, launch, train_records, trainer_args

pytestmark = pytest.mark.slow  # whole-pipeline subprocess runs: scheduled first (tests/conftest.py)

ITERS = 12


def _torchrun(args):
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", ENTRY, *args]
    return subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for_iteration(process, save, iteration, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"trainer ended early: {process.communicate()[0][-3000:]}")
        if os.path.exists(os.path.join(save, "metrics.jsonl")) and max(train_records(save), default=0) >= iteration:
            return
        time.sleep(0.01)
    raise AssertionError(f"iteration {iteration} not reached")


def _workers(launcher_pid):
    """The trainer processes torchrun started (its children running the entry point)."""
    import psutil

    return [p for p in psutil.Process(launcher_pid).children() if ENTRY in " ".join(p.cmdline())]


@pytest.mark.parametrize("target", ["group", "workers"])
def test_sigterm_under_torchrun_saves_on_every_rank(tiny_corpus, tmp_path, target):
    """``group``: the whole job (scancel, a SLURM time limit); ``workers``: each rank alone (a
    cluster agent signalling the trainer processes), after which torchrun sees them end well."""
    save = tmp_path / "run"
    args = trainer_args(
        tiny_corpus,
        save,
        "--eval-iters",
        "0",
        "--save-interval",
        "2",
        "--tensor-model-parallel-size",
        "2",
        train_iters=ITERS,
    )
    process = _torchrun(args)
    _wait_for_iteration(process, save, 3)  # the save at iteration 2 is done
    if target == "group":
        os.killpg(process.pid, signal.SIGTERM)
    else:
        workers = _workers(process.pid)
        assert len(workers) == 2, workers
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=240)
    with pytest.raises(ProcessLookupError):
        os.killpg(process.pid, 0)  # nothing of the job is left
    for rank in (0, 1):  # each worker stopped on its own signal handler and returned normally
        assert re.search(rf"\[rank {rank}\][^\n]*stopped by SIGTERM at iteration", output), output[-3000:]
    assert "BrokenPipeError" not in output and "ChildFailedError" not in output, output[-3000:]
    # signalled itself too, torchrun re-raises the signal once its workers are done (exit status 1)
    assert process.returncode in ((0, 1) if target == "group" else (0,)), output[-3000:]
    saved = folders.tracker_value(str(save))
    assert saved is not None and saved >= 3 and f"stopped by SIGTERM at iteration {saved}" in output
    assert not [name for name in os.listdir(save) if name.endswith(".tmp")], os.listdir(save)
    checkpoint.check_files(folders.checkpoint_dir(str(save), saved))
    if target == "workers":
        return  # the checkpoint is the same; one resume (below, and test_faults.py's) shows it runs to the end
    resumed = _torchrun(args + ["--load", str(save)])
    output, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, output[-3000:]
    assert f"loaded full state from {folders.checkpoint_dir(str(save), saved)}" in output
    assert sorted(train_records(save)) == list(range(1, ITERS + 1))
    assert folders.tracker_value(str(save)) == ITERS


@pytest.mark.parametrize(
    "text, expected",
    [
        ("SIGTERM,SIGUSR1", (signal.SIGTERM, signal.SIGUSR1)),
        ("usr1", (signal.SIGUSR1,)),
        ("TERM, TERM", (signal.SIGTERM,)),
        (str(int(signal.SIGUSR2)), (signal.SIGUSR2,)),
    ],
)
def test_parse_signals(text, expected):
    assert parse_signals(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("SIGFOO", "'SIGFOO' is not a signal name"),
        ("KILL", "SIGKILL cannot be caught"),
        (" , ", "names no signal"),
    ],
)
def test_parse_signals_refuses_with_one_line(text, message):
    with pytest.raises(ValueError, match=message) as error:
        parse_signals(text)
    assert "\n" not in str(error.value)


def test_stop_signals_set_the_flag_and_restore_the_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals(parse_signals("SIGTERM,SIGUSR1")) as stop:
        assert stop.requested is None
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal keeps the first one's name
        time.sleep(0.01)
        assert stop.requested == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


@pytest.mark.parametrize("when", ["start-up", "after the run"])
def test_a_stop_signal_outside_the_steps_is_handled(cpu_world, tiny_corpus, tmp_path, monkeypatch, when):
    """SIGTERM while the trainer builds its datasets stops the run after its first step, with a
    checkpoint; SIGTERM after the last save (teardown) is only noted: exit 0 both times, and the
    signal never reaches the handler that was there before the command."""
    from megatron_patch.training import cli, loop

    reached = []
    previous = signal.signal(signal.SIGTERM, lambda *_: reached.append(True))
    try:
        if when == "start-up":
            build = loop.build_run_datasets

            def build_then_signal(*args):
                os.kill(os.getpid(), signal.SIGTERM)
                return build(*args)

            monkeypatch.setattr(loop, "build_run_datasets", build_then_signal)
        else:
            run = loop.Trainer.run

            def run_then_signal(self):
                summary = run(self)
                os.kill(os.getpid(), signal.SIGTERM)
                return summary

            monkeypatch.setattr(loop.Trainer, "run", run_then_signal)
        save = tmp_path / "run"
        assert cli.main(trainer_args(tiny_corpus, save, "--eval-iters", "0", train_iters=ITERS)) == 0
        assert signal.getsignal(signal.SIGTERM) is not None and not reached
    finally:
        signal.signal(signal.SIGTERM, previous)
    expected = 1 if when == "start-up" else ITERS
    assert folders.tracker_value(str(save)) == expected
    assert sorted(train_records(save)) == list(range(1, expected + 1))


def test_without_save_the_stop_signals_are_left_alone(cpu_world, tiny_corpus, monkeypatch):
    """Without --save no checkpoint can be written, so the trainer takes no stop signal: SIGTERM does
    what it does to any program (by default it ends the process with a failing status, so the
    scheduler does not record a finished run); here the handler that was there before sees it."""
    from megatron_patch.training import cli, loop

    reached = []
    previous = signal.signal(signal.SIGTERM, lambda *_: reached.append(True))
    build = loop.build_run_datasets

    def build_then_signal(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        return build(*args)

    monkeypatch.setattr(loop, "build_run_datasets", build_then_signal)
    try:
        assert cli.main(trainer_args(tiny_corpus, None, "--eval-iters", "0", train_iters=3)) == 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert reached == [True]


def test_the_time_limit_asks_to_stop_once_passed():
    stop = StopSignals((), time_limit_minutes=0.002)  # 120 ms
    assert stop.reason() is None
    time.sleep(0.15)
    assert stop.reason().startswith("--exit-duration-in-mins 0.002 (")
    assert StopSignals(()).reason() is None  # no limit, no signal


def test_exit_duration_saves_stops_and_the_run_resumes(cpu_world, tiny_corpus, tmp_path, capsys):
    """``--exit-duration-in-mins``, for a job time limit that sends no signal: past it, the run
    saves after the step it is in and exits 0 (here after the first step); resumed, it runs to the end."""
    from megatron_patch.training import cli

    save = tmp_path / "run"
    args = trainer_args(tiny_corpus, save, "--eval-interval", "1", train_iters=ITERS)
    assert cli.main(args + ["--exit-duration-in-mins", "1e-6"]) == 0
    assert folders.tracker_value(str(save)) == 1
    assert sorted(train_records(save)) == [1]
    assert train_records(save, "valid") == {}  # stopping, the run saves instead of validating first
    with open(save / "metrics.jsonl") as f:
        summaries = [record for record in map(json.loads, f) if record["kind"] == "summary"]
    assert summaries[-1]["interrupted"] is True
    assert cli.main(args + ["--load", str(save)]) == 0
    assert folders.tracker_value(str(save)) == ITERS
    assert sorted(train_records(save)) == list(range(1, ITERS + 1))
    capsys.readouterr()
    no_save = trainer_args(tiny_corpus, None, "--exit-duration-in-mins", "5", train_iters=ITERS)
    for flags, message in ((args + ["--exit-duration-in-mins", "0"], "must be > 0"), (no_save, "needs --save DIR")):
        code = cli.main(flags)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err


def test_a_trainer_made_without_stop_signals_installs_its_own(cpu_world, tiny_corpus, tmp_path, monkeypatch):
    """``Trainer(config)`` used as a library (no ``stop`` from the command line): ``run`` holds the
    signals itself, so SIGTERM inside step 3 saves there and stops; the handler before it is back after."""
    from megatron_patch.runtime import parallel
    from megatron_patch.training import loop
    from megatron_patch.training.arguments import parse_args

    train_step, steps = loop.train_step, []

    def step_then_signal(*args, **kwargs):
        steps.append(True)
        if len(steps) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return train_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", step_then_signal)
    config = parse_args(trainer_args(tiny_corpus, tmp_path / "run", "--eval-iters", "0", train_iters=ITERS), 1)
    parallel.init_model_parallel(1, 1, seed=config.seed)
    before = signal.getsignal(signal.SIGTERM)
    summary = loop.Trainer(config).run()
    assert summary["interrupted"] and folders.tracker_value(str(tmp_path / "run")) == 3
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_stop_signal_after_the_run_has_ended_leaves_exit_status_0(tiny_corpus, tmp_path):
    """A SIGTERM that arrives once the run has finished and said so (a job ending at its time
    limit), while the process tears torch down, is ignored: the exit status stays 0, so a scheduler's
    dependent jobs (SLURM ``afterok``) and torchrun (no restart) see the finished run it is."""
    process = launch(trainer_args(tiny_corpus, tmp_path / "run", "--eval-iters", "0"))
    for line in process.stdout:
        if "FLOPs relative to token-only training" in line:  # the summary's line: the run has ended
            break
    else:
        raise AssertionError(f"no summary; exit {process.wait()}")
    signals = 0
    while process.poll() is None:
        process.send_signal(signal.SIGTERM)  # the trainer alone, until it exits
        signals += 1
        time.sleep(0.01)
    output = process.stdout.read()
    assert process.wait() == 0 and signals > 1, (process.returncode, signals, output[-2000:])


@pytest.mark.parametrize("iteration", [4, 8])
def test_a_stop_during_a_validation_cuts_it_short_and_saves(cpu_world, tiny_corpus, tmp_path, monkeypatch, iteration):
    """SIGTERM during the first of five validation batches: the validation stops before its second
    batch and the run saves at that step at once (4: an interval validation, whose loss is then not
    logged; 8: the patch stage's last step, whose validation the resumed run runs first). Before,
    every batch of the validation and one more training step ran before the save."""
    from megatron_patch.training import cli, step

    run_schedule, validation_batches = step.run_schedule, []

    def signal_in_validation(model, iterator, stage, forward_only):
        if forward_only:
            validation_batches.append(True)
            if len(validation_batches) == 1 + (iteration // 4 - 1) * 5:  # the first batch at `iteration`
                os.kill(os.getpid(), signal.SIGTERM)
        return run_schedule(model, iterator, stage, forward_only)

    save = tmp_path / "run"
    argv = trainer_args(tiny_corpus, save, "--eval-interval", "4", "--eval-iters", "5", train_iters=ITERS)
    with monkeypatch.context() as patch:
        patch.setattr(step, "run_schedule", signal_in_validation)
        assert cli.main(argv) == 0
    assert len(validation_batches) == 1 + (iteration // 4 - 1) * 5  # no batch after the signal's
    assert folders.tracker_value(str(save)) == iteration and max(train_records(save)) == iteration
    assert iteration not in train_records(save, "valid")
    assert cli.main(argv + ["--load", str(save)]) == 0
    assert sorted(train_records(save, "valid")) == ([8, ITERS] if iteration == 4 else [4, 8, ITERS])


def test_a_stop_during_a_periodic_save_stops_at_that_checkpoint(cpu_world, tiny_corpus, tmp_path, monkeypatch):
    """SIGTERM while the periodic save of iteration 4 is being written: the run stops there, with
    that checkpoint to resume from. Before, it trained step 5 and saved all over again, which on a
    large model can outlast the time torchrun leaves the workers after the signal."""
    from megatron_patch.training import cli

    save_checkpoint, saved = checkpoint.save_checkpoint, []

    def signal_while_saving(root, iteration, *args, **kwargs):
        saved.append(iteration)
        path = save_checkpoint(root, iteration, *args, **kwargs)
        if iteration == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return path

    save = tmp_path / "run"
    argv = trainer_args(tiny_corpus, save, "--eval-iters", "0", "--save-interval", "4", train_iters=ITERS)
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "save_checkpoint", signal_while_saving)
        assert cli.main(argv) == 0
    assert saved == [4] and folders.tracker_value(str(save)) == 4 and max(train_records(save)) == 4


def test_sigterm_to_the_job_with_data_workers_saves_and_exits_0(tiny_corpus, tmp_path):
    """--num-workers 2: a SIGTERM to the whole process group reaches the data workers too; they
    ignore it (torch's handler in a worker would end it, and the trainer would then raise in the
    middle of the step or of the stop's save, with no checkpoint and exit code 1)."""
    save = tmp_path / "run"
    args = trainer_args(tiny_corpus, save, "--eval-iters", "0", "--num-workers", "2", train_iters=ITERS)
    process = launch(args)
    _wait_for_iteration(process, save, 3)
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 0, output[-3000:]
    saved = folders.tracker_value(str(save))
    assert saved is not None and saved >= 3 and f"stopped by SIGTERM at iteration {saved}" in output
    checkpoint.check_files(folders.checkpoint_dir(str(save), saved))
