"""Checkpoints written while training goes on (``--async-save``, as Megatron-LM's).

A save copies this rank's shards to host memory (on a GPU: one device-to-host copy, into pinned
memory), then a forked process writes them into ``iter_N.tmp`` while the trainer runs its next
steps. The checkpoint is completed only once every rank's writer has ended: megatron's metadata,
then ours (``megatron_patch.json``, the manifest, the rename to ``iter_N``, the tracker and
pruning, ``store.save_checkpoint``'s completion), in the trainer's process, at the first step end
that finds all writers done (:meth:`PendingSave.poll`, collective), or at once where the run
needs it (:meth:`PendingSave.wait`: before the next save, at a stop, at the end). One save is in
flight at a time. Until its completion the checkpoint is an ``iter_N.tmp`` like any interrupted
save: a kill leaves the previous complete checkpoint and the tracker naming it.

The host copies are kept until the save is complete: pinned memory is not copy-on-write across a
fork, so a copy freed in the trainer (megatron-core 0.16.1 keeps no reference once its writer is
forked) would go back to torch's pinned-memory cache and could be handed out again, e.g. to a
pinned batch, while the writer still reads it.

megatron's torch_dist writer hands each rank's write results back through a queue that must reach
across processes here (the writer is forked); megatron makes it the queue of a ``multiprocessing``
Manager started with ``spawn``, a helper process that a SIGTERM to the process group (scancel,
torchrun's forwarding) would kill in the middle of a pre-empted run's last save.
:func:`results_queue` starts that Manager itself, once, with the stop signals ignored; like every
forked helper it ends with the trainer (``runtime/child_processes.py``).
"""

import gc
import logging
import multiprocessing
import os
import signal
import time
from multiprocessing.managers import SyncManager
from typing import Callable, Iterable, Optional

import torch.distributed as dist
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue, AsyncRequest

from megatron_patch.errors import CheckpointError, last_line

logger = logging.getLogger(__name__)

_MANAGER: Optional[SyncManager] = None
_QUEUE = None
ALWAYS_IGNORED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
POLL_S = 0.05  # between the collective checks of a wait
WAIT_WARNING_S = 60.0  # a wait longer than this is reported, and again after as long


def _start_manager_process(signals: tuple) -> None:
    """First thing in the Manager's (forked) process: a stop signal is the trainer's to handle (it
    saves, then exits), and the garbage collector never visits what the fork copied from the
    trainer (``gc.freeze``): finalizing those objects (torch's among them) in a forked child is not
    safe, and once crashed the Manager in a long-lived test process, failing a later save with
    BrokenPipeError."""
    gc.freeze()
    for number in signals:
        signal.signal(number, signal.SIG_IGN)


def results_queue(stop_signals: Iterable[signal.Signals] = ()):
    """The queue a forked writer puts its write results in and the trainer reads them from: a
    Manager's, so results of any size pass while the writer exits. The Manager is started once per
    process, ignoring SIGTERM, SIGINT, SIGUSR1 and ``stop_signals`` (the trainer's ``--exit-signal``)."""
    global _MANAGER, _QUEUE
    if _QUEUE is None:
        ignored = tuple(dict.fromkeys((*ALWAYS_IGNORED, *stop_signals)))
        _MANAGER = SyncManager(ctx=multiprocessing.get_context("fork"))
        _MANAGER.start(initializer=_start_manager_process, initargs=(ignored,))
        _QUEUE = _MANAGER.Queue()
    return _QUEUE


class PendingSave:
    """At most one checkpoint being written in the background (collective: every rank calls every
    method at the same step). ``on_complete(path, seconds, blocked_seconds)`` is called once a
    checkpoint is complete: ``seconds`` after its save began, of which training waited
    ``blocked_seconds`` (the copy to host memory and the fork, every check while it was in flight,
    waits for it, and its completion). ``stop_signals``: the trainer's, ignored by the Manager."""

    def __init__(self, on_complete: Callable[[str, float, float], None], stop_signals: Iterable[signal.Signals] = ()):
        self._calls = AsyncCallsQueue(persistent=False)
        self._on_complete = on_complete
        self._stop_signals = tuple(stop_signals)
        self._path: Optional[str] = None
        self._started = 0.0
        self._blocked = 0.0
        self._completing = False
        self._host_copies: list = []  # the shards' host copies of the save in flight

    def results_queue(self):
        """:func:`results_queue` for this trainer's stop signals."""
        return results_queue(self._stop_signals)

    def start(self, request: AsyncRequest, complete: Callable[[], None], path: str, started: float) -> None:
        """Fork the writer of ``request`` (megatron's async save of ``path``'s ``.tmp`` folder);
        ``complete`` finishes the checkpoint once every rank's writer has ended; ``started``: when
        the save began (``time.perf_counter()``)."""
        if self._path is not None:
            raise RuntimeError(f"a save of {self._path} is still in flight: wait() for it first")

        def complete_checkpoint() -> None:
            self._completing = True  # from here on an error is ours, not the writer's
            complete()

        request.add_finalize_fn(complete_checkpoint)
        if request.preload_fn is not None:
            request = request._replace(preload_fn=self._keeping_host_copies(request.preload_fn))
        self._calls.schedule_async_request(request)
        self._path, self._started, self._completing = path, started, False
        self._blocked = time.perf_counter() - started

    def _keeping_host_copies(self, preload: Callable):
        def preload_and_keep():
            buckets = preload()
            self._host_copies.append(buckets)
            return buckets

        return preload_and_keep

    def poll(self) -> None:
        """Complete the checkpoint in flight if every rank's writer has ended (one all-reduce)."""
        if self._path is not None:
            began = time.perf_counter()
            self._finish(self._finalize_if_done(), began)

    def wait(self) -> None:
        """Wait for every rank's writer, then complete the checkpoint in flight (if any); a wait
        longer than :data:`WAIT_WARNING_S` is reported (a writer killed by the OOM killer leaves
        the others waiting for it)."""
        if self._path is None:
            return
        began = time.perf_counter()
        warn_at = began + WAIT_WARNING_S
        while not (done := self._finalize_if_done()):
            if time.perf_counter() >= warn_at:
                if dist.get_rank() == 0:
                    logger.warning(
                        "waiting %.0f s for the background save of %s to finish writing",
                        time.perf_counter() - began,
                        self._path,
                    )
                warn_at += WAIT_WARNING_S
            time.sleep(POLL_S)
        self._finish(done, began)

    def abort(self) -> None:
        """Kill the writer in flight without completing its checkpoint (it stays an ``iter_N.tmp``,
        which the next completed save removes): for a run ending on an error, so that nothing
        writes into ``--save`` once the run has released its lock. Not collective."""
        for call in self._calls.async_calls:
            call.async_caller.close(abort=True)
        self._calls.async_calls.clear()
        self._path = None
        self._host_copies.clear()

    def _finalize_if_done(self) -> bool:
        try:
            return bool(self._calls.maybe_finalize_async_calls(blocking=False))
        except BaseException as error:  # torch's CheckpointException is a BaseException
            if self._completing or isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise
            path, self._path = self._path, None
            self._host_copies.clear()
            raise failed_save(path, error, background=True) from None

    def _finish(self, done: bool, began: float) -> None:
        self._blocked += time.perf_counter() - began
        if done:
            path, seconds, blocked = self._path, time.perf_counter() - self._started, self._blocked
            self._path = None
            self._host_copies.clear()
            self._on_complete(path, seconds, blocked)


def failed_save(path: str, error: BaseException, background: bool = False) -> CheckpointError:
    """The one-line error of a save of checkpoint ``path`` that failed with ``error`` (a full disk,
    a folder without permission; torch's CheckpointException from the writers): the checkpoints
    completed before it are intact, and ``path`` stays an ``iter_N.tmp``, which no resume takes."""
    root = os.path.dirname(path)
    return CheckpointError(
        f"the {'background ' if background else ''}save of {path} failed ({last_line(error)}): the checkpoints "
        f"completed before it are untouched; free space (or fix permissions) in {root}, then resume with --load {root}"
    )
