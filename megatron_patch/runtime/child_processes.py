"""Forked helper processes end with the process that forked them.

A command forks helpers with ``fork`` and no ``exec``: megatron's checkpoint writers (one per
save, from the trainer and the converter), the DataLoader's workers, the preprocessing pool.
Killed outright (kill -9, the OOM killer), the command would leave them running, re-parented,
some blocked for good on a pipe whose other end has gone. They hold copies of the command's
open files, so they keep its locks: a helper left by a trainer killed during a save kept the
``--save`` folder's lock, and every resume was refused as "in use by another trainer". They also
ignore SIGTERM, having inherited the trainer's stop-signal handler.

:func:`end_forked_children_with_parent` (called by ``command.run_main`` for every command)
registers an at-fork hook: each process forked afterwards asks the kernel for SIGKILL when its
parent ends (Linux ``prctl(PR_SET_PDEATHSIG)``; the hook is inherited, so helpers of helpers too),
and ends at once if the parent ended before the request took effect. Processes started with
``exec`` (``subprocess``, torch.compile's workers) are not affected. Elsewhere than on Linux it
does nothing. :func:`end_with_parent_after_exec` is the same request for one ``subprocess`` (its
``preexec_fn``: the request survives ``exec``).
"""

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

_prctl = None
_forking_pid = None


def _note_forking_process() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


def _end_with_parent() -> None:
    """In the child, right after fork."""
    if _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0 and os.getppid() != _forking_pid:
        os.kill(os.getpid(), signal.SIGKILL)  # the parent ended between the fork and the request


def end_forked_children_with_parent() -> None:
    """From now on, every process this one forks gets SIGKILL when this one ends (Linux; once)."""
    global _prctl
    if _prctl is not None or not sys.platform.startswith("linux"):
        return
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
    os.register_at_fork(before=_note_forking_process, after_in_child=_end_with_parent)


def end_with_parent_after_exec() -> None:
    """``preexec_fn`` of a ``subprocess.Popen``: the started program gets SIGKILL when the process
    that started it ends (Linux; elsewhere nothing), e.g. a benchmark run whose harness was killed."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
