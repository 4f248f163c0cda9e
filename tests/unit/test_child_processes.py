"""A command killed outright (kill -9) leaves no forked helper behind: after ``run_main`` every
process it forks ends with it, and with it the ``--save`` lock the helper shared. Without
``run_main`` (the control) the helper outlives its parent and keeps the lock."""

import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_patch.checkpoint.lock import SaveDirLock
from megatron_patch.checkpoint.store import CheckpointError
from tests.conftest import REPO_ROOT

# holds the --save lock, forks a helper (as megatron's checkpoint writer is forked), then is killed
KILLED_COMMAND = """
import multiprocessing, os, signal, sys, time
from megatron_patch.checkpoint.lock import SaveDirLock
from megatron_patch.runtime.command import run_main
if sys.argv[2] == "run_main":
    run_main(lambda: None)
lock = SaveDirLock(sys.argv[1]).acquire()
helper = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
helper.start()
print(helper.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as status:
            return "\nState:\tZ" not in status.read()  # a zombie has ended
    except FileNotFoundError:
        return False


def _helper_of_a_killed_command(tmp_path, mode: str) -> int:
    command = subprocess.Popen(
        [sys.executable, "-c", KILLED_COMMAND, str(tmp_path / "save"), mode],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    helper = command.stdout.readline()  # not to the end: a live helper holds the pipe open
    assert command.wait(timeout=120) == -signal.SIGKILL, helper
    command.stdout.close()
    return int(helper)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_commands_forked_helper_ends_and_frees_the_lock(tmp_path):
    helper = _helper_of_a_killed_command(tmp_path, "run_main")
    deadline = time.time() + 10
    while _running(helper) and time.time() < deadline:
        time.sleep(0.05)
    assert not _running(helper)
    SaveDirLock(str(tmp_path / "save")).acquire().release()


def test_without_it_the_helper_outlives_the_command_and_keeps_the_lock(tmp_path):
    helper = _helper_of_a_killed_command(tmp_path, "plain")
    try:
        time.sleep(0.5)
        assert _running(helper)
        with pytest.raises(CheckpointError, match="in use by another trainer"):
            SaveDirLock(str(tmp_path / "save")).acquire()
    finally:
        os.kill(helper, signal.SIGKILL)


# starts a program in a session of its own (as the GPU campaign starts its runs), then is killed
KILLED_STARTER = """
import os, signal, subprocess, sys
from megatron_patch.runtime.child_processes import end_with_parent_after_exec
preexec = end_with_parent_after_exec if sys.argv[1] == "requested" else None
quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # the test reads the pid, not until EOF
run = subprocess.Popen(["sleep", "60"], start_new_session=True, preexec_fn=preexec, **quiet)
print(run.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("mode", ["requested", "control"])
def test_a_started_program_ends_with_its_killed_starter_when_asked(mode):
    starter = subprocess.run(
        [sys.executable, "-c", KILLED_STARTER, mode], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    pid = int(starter.stdout.split()[0])
    try:
        deadline = time.time() + 10
        while _running(pid) and time.time() < deadline and mode == "requested":
            time.sleep(0.05)
        assert _running(pid) is (mode == "control")
    finally:
        if _running(pid):
            os.kill(pid, signal.SIGKILL)
