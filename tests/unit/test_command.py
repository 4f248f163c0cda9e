"""``run_main`` on Ctrl-C: one line ``error: interrupted; ...`` saying what was left, exit code 130,
no traceback; the trainer's own stop signals still turn a signal into a flag instead.

Each case runs in a child process that sends itself SIGINT (as Ctrl-C does), so that a
KeyboardInterrupt escaping ``run_main`` fails the test instead of stopping pytest."""

import signal
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

INTERRUPTED = """
import os, signal, sys, time
from megatron_patch.runtime.command import run_main
def body():
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
    time.sleep(30)
sys.exit(run_main(body, io_errors_are_user_errors=sys.argv[1] == "staged"))
"""

STOPPED_BY_ITS_OWN_SIGNAL = """
import os, signal, sys
from megatron_patch.runtime.command import run_main
from megatron_patch.training.preemption import StopSignals
def body():
    with StopSignals([signal.SIGINT]) as stop:  # the trainer's --exit-signal SIGINT
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested == "SIGINT", stop.requested
    print("saved and stopped")
sys.exit(run_main(body))
"""


def _run(script: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", script, *argv],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler),
    )


@pytest.mark.parametrize(
    "mode, left",
    [
        ("staged", "nothing was written"),
        ("other", "what it had finished (e.g. saved checkpoints, complete output files) is kept"),
    ],
)
def test_ctrl_c_is_one_line_and_exit_code_130(mode, left):
    done = _run(INTERRUPTED, mode)
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: interrupted; ") and left in lines[0], lines


def test_the_trainers_stop_signal_is_not_an_interrupt():
    done = _run(STOPPED_BY_ITS_OWN_SIGNAL)
    assert done.returncode == 0, done.stderr
    assert "saved and stopped" in done.stdout and "error:" not in done.stderr
