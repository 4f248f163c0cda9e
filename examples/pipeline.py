"""What the example pipelines (``quickstart.py``, ``reproduce_small.py``) share: the workdir's record
of the settings its outputs are made with, one step run as a subprocess (skipped once its output
exists, and is newer than the run it was made from), a trainer run's command line and when it counts
as done, and how the scripts report errors.
"""

import json
import os
import subprocess
import time
from pathlib import Path

from megatron_patch.errors import ArgumentError, UserError
from megatron_patch.runtime import atomic_file, command

REPO = Path(__file__).resolve().parents[1]
PATCH_SIZE = 4  # K of every patch run of the examples
RECORD = "settings.json"  # in --workdir: what its outputs are made with
CPU_ENV = {"OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1"}  # each process one thread, no compiles


class StepError(UserError):
    """A pipeline step failed, or stopped before its end (exit code 1: its input was valid)."""

    exit_code = 1


def run_script(body) -> int:
    """``body()`` under the project's ``run_main``: a ``UserError`` or an ``OSError`` (a full disk, a
    read-only --workdir) is one line ``error: ...`` naming the file, without a traceback; Ctrl-C says
    that the finished steps are kept. Returns the exit code."""
    kept = "the finished steps are kept: re-run the same command to resume"
    return command.run_main(body, io_errors_are_user_errors=True, kept_after_ctrl_c=kept)


def _holds_outputs(work: Path, seeded: tuple = ()) -> bool:
    """``work`` holds a file other than its settings record and the ``seeded`` inputs at its top
    (empty folders do not count)."""
    for folder, _, files in os.walk(work):
        if any(not (Path(folder) == work and name in (RECORD, *seeded)) for name in files):
            return True
    return False


def check_workdir(work: Path, made_with: dict, script: str, seeded: tuple = ()) -> None:
    """Record in ``work/settings.json`` what ``work``'s outputs are made with (``script``'s settings),
    or raise ``ArgumentError`` (one line) when ``work`` is a file, holds outputs of other settings, or
    holds files without a record: a step whose output exists is not run again, so those outputs would
    be reported as this run's. A record beside no output (a first attempt stopped before it made
    anything) is replaced. ``seeded``: file names the user may place in a new workdir as inputs (the
    reproduction's ``tokenizer.model``, to share one tokenizer between runs): in a workdir without a
    record they are no outputs."""
    made_with = json.loads(json.dumps(made_with, default=str))  # as it reads back
    record = work / RECORD
    if work.exists() and not work.is_dir():
        raise ArgumentError(f"--workdir {work} is a file, not a folder: choose another --workdir")
    if record.is_file():
        try:
            before = json.loads(record.read_text())
        except ValueError as error:
            raise ArgumentError(
                f"{record}: not a settings record ({error}); remove --workdir {work} or choose another"
            ) from None
        keys = sorted({*before, *made_with})
        changed = [f"{k} {before.get(k)!r} -> {made_with.get(k)!r}" for k in keys if before.get(k) != made_with.get(k)]
        if not changed:
            return
        if _holds_outputs(work):  # a seeded input too: it may have been made with the other settings
            raise ArgumentError(
                f"--workdir {work} holds outputs of {script} made with other settings ({'; '.join(changed)}): "
                f"use another --workdir, or remove it to start over"
            )
    elif work.exists() and _holds_outputs(work, seeded):
        raise ArgumentError(
            f"--workdir {work} holds files but no {RECORD} saying what made them: remove it or choose another --workdir"
        )
    work.mkdir(parents=True, exist_ok=True)
    atomic_file.write_json(record, made_with, sort_keys=True)


def trained(save: Path) -> bool:
    """The trainer run saving to ``save`` trained to its end: its summary.json exists and is not
    marked ``interrupted`` (the trainer writes one too when a stop signal or --exit-duration-in-mins
    ends it early, after saving a checkpoint)."""
    summary = save / "summary.json"
    return summary.exists() and not json.loads(summary.read_text()).get("interrupted", True)


def made_after_run(output: Path, save: Path) -> bool:
    """``output`` (an evaluation or conversion of the trainer run saving to ``save``) exists and was
    written after the run's ``summary.json``: one made before the run was trained again (its folder
    removed and the pipeline re-run) is stale."""
    summary = save / "summary.json"
    return output.exists() and (not summary.exists() or output.stat().st_mtime >= summary.stat().st_mtime)


def train_command(launcher: list, flags: list, save: Path) -> list:
    """The trainer's command line for one run saving to ``save``, with ``--load`` of the same folder:
    the trainer resumes when the folder holds a checkpoint (a re-run after a kill) and starts fresh
    when it holds none; with ``--pretrained-checkpoint`` too, ``--load`` wins once it holds one."""
    outputs = ["--save", save, "--load", save, "--summary-json", save / "summary.json"]
    return [*launcher, "examples/pretrain_patch_gpt.py", *flags, *outputs]


def run_step(step: str, command_line: list, done: Path, finished=Path.exists, extra_env=CPU_ENV) -> None:
    """Run one pipeline step (from the repository root, its output streamed) unless ``finished(done)``
    (by default: its output ``done`` exists); ``extra_env``: set for the step (the quick start's CPU
    settings by default). Raises ``StepError`` when the step fails or ends unfinished."""
    if finished(done):
        print(f"== {step}: done already ({done.relative_to(REPO) if done.is_relative_to(REPO) else done})", flush=True)
        return
    print(f"== {step}: {' '.join(str(c) for c in command_line)}", flush=True)
    env = dict(os.environ, **extra_env, PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    result = subprocess.run([str(c) for c in command_line], cwd=REPO, env=env)
    if result.returncode != 0:
        raise StepError(f"step '{step}' failed with exit code {result.returncode}; fix the error above and re-run")
    if not finished(done):  # a trainer stopped by a signal saves, writes an interrupted summary and exits 0
        raise StepError(f"step '{step}' stopped before its end; re-run to resume it")
    print(f"== {step}: {time.perf_counter() - start:.1f} s", flush=True)
