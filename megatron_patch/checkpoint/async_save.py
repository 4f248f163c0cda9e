"""Checkpoints written while training goes on (``--async-save``, as Megatron-LM's).

A save copies this rank's shards to host memory (on a GPU: one device-to-host copy, the only
time the step waits beyond building the state dict), then a forked process writes them into
``iter_N.tmp`` while the trainer runs its next steps. The checkpoint is completed only once every
rank's writer has ended: megatron's metadata, then ours (``megatron_patch.json``, the manifest,
the rename to ``iter_N``, the tracker and pruning, ``store.save_checkpoint``'s completion), in the
trainer's process, at the first step end that finds all writers done (``PendingSave.poll``,
collective), or at once where the run needs it (:meth:`PendingSave.wait`: before the next save,
at a stop, at the end). One save is in flight at a time. Until its completion the checkpoint is an
``iter_N.tmp`` like any interrupted save: a kill leaves the previous complete checkpoint and the
tracker naming it.

megatron's torch_dist writer hands each rank's write results back through a queue that must reach
across processes here (the writer is forked); megatron makes it a ``multiprocessing`` Manager's, a
helper process that a SIGTERM to the process group (scancel, torchrun's forwarding) would kill in
the middle of a pre-empted run's last save. :func:`results_queue` starts that Manager itself, once,
with the stop signals ignored; like every forked helper it ends with the trainer
(``runtime/child_processes.py``).
"""

import logging
import multiprocessing
import signal
import time
from multiprocessing.managers import SyncManager
from typing import Callable, Optional

from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue, AsyncRequest

from megatron_patch.errors import CheckpointError

logger = logging.getLogger(__name__)

_MANAGER: Optional[SyncManager] = None
_QUEUE = None


def _ignore_stop_signals() -> None:
    """In the Manager's process: a stop signal is the trainer's to handle (it saves, then exits)."""
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(number, signal.SIG_IGN)


def results_queue():
    """The queue a forked writer puts its write results in and the trainer reads them from (a
    Manager's, so results of any size pass while the writer exits; started once per process)."""
    global _MANAGER, _QUEUE
    if _QUEUE is None:
        _MANAGER = SyncManager(ctx=multiprocessing.get_context("fork"))
        _MANAGER.start(initializer=_ignore_stop_signals)
        _QUEUE = _MANAGER.Queue()
    return _QUEUE


class PendingSave:
    """At most one checkpoint being written in the background (collective: every rank calls every
    method at the same step). ``on_complete(path, seconds)`` is called once a checkpoint is
    complete, ``seconds`` after its save began."""

    def __init__(self, on_complete: Callable[[str, float], None]):
        self._calls = AsyncCallsQueue(persistent=False)
        self._on_complete = on_complete
        self._path: Optional[str] = None
        self._started = 0.0

    @property
    def path(self) -> Optional[str]:
        """Where the checkpoint in flight will be once complete; None when none is."""
        return self._path

    def start(self, request: AsyncRequest, complete: Callable[[], None], path: str, started: float) -> None:
        """Fork the writer of ``request`` (megatron's async save of ``path``'s ``.tmp`` folder);
        ``complete`` finishes the checkpoint once every rank's writer has ended; ``started``: when
        the save began (``time.perf_counter()``)."""
        if self._path is not None:
            raise RuntimeError(f"a save of {self._path} is still in flight: wait() for it first")
        request.add_finalize_fn(complete)
        self._calls.schedule_async_request(request)
        self._path, self._started = path, started

    def poll(self) -> None:
        """Complete the checkpoint in flight if every rank's writer has ended (one all-reduce)."""
        self._finalize(blocking=False)

    def wait(self) -> None:
        """Wait for every rank's writer, then complete the checkpoint in flight (if any)."""
        self._finalize(blocking=True)

    def _finalize(self, blocking: bool) -> None:
        if self._path is None:
            return
        path = self._path
        try:
            done = self._calls.maybe_finalize_async_calls(blocking=blocking)
        except BaseException as error:  # torch's CheckpointException is a BaseException
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise
            self._path = None
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            raise CheckpointError(
                f"the background save of {path} failed ({lines[-1][:200] if lines else type(error).__name__}): "
                f"the checkpoints completed before it are untouched; resume with --load"
            ) from None
        if done:
            self._path = None
            self._on_complete(path, time.perf_counter() - self._started)
