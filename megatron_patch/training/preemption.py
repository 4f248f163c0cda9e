"""Pre-emption: the signals that ask the trainer to save at the current step and exit 0.

SLURM sends SIGTERM at a time limit or ``scancel`` (to every process of the job step) and, with
``--signal=USR1@90``, SIGUSR1 ahead of the limit; torchrun forwards the signals it handles to its
workers. ``StopSignals`` turns each of them into a flag the training loop reads after every step
(the ranks agree on it with an all-reduce, then all save and stop together)::

    with StopSignals(parse_signals(args.exit_signal)) as stop:
        ...
        if stop.requested: ...

``--exit-duration-in-mins`` adds a time limit to the same flag (``StopSignals.reason``), for
schedulers that end a job without a warning signal.

The handler only sets the flag, so it is safe at any point of a step. Processes the trainer
forks while the handler is installed (megatron's checkpoint writers) inherit it and keep
writing when the signal reaches the whole process group; nothing on the save path depends on a
process that the default SIGTERM action would end (``checkpoint/store.py``). Under torchrun the
launcher itself re-raises the signal once its workers are done (exit status 1); it waits
``--shutdown-timeout`` seconds (default 30) before it kills workers still saving, so a job whose
checkpoint takes longer must raise it, and must add SIGUSR1 to ``--signals-to-handle`` for
torchrun to forward that one.
"""

import logging
import signal
import threading
import time
from typing import Iterable, Optional, Tuple

logger = logging.getLogger(__name__)

DEFAULT_SIGNALS = "SIGTERM,SIGUSR1"


def parse_signals(text: str) -> Tuple[signal.Signals, ...]:
    """``"SIGTERM,SIGUSR1"`` (names with or without ``SIG``, or numbers) -> the signals; ValueError
    (one line, naming the value) for an unknown or uncatchable one."""
    found = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name = item.upper() if item.isdigit() or item.upper().startswith("SIG") else "SIG" + item.upper()
        try:
            sig = signal.Signals(int(name)) if name.isdigit() else signal.Signals[name]
        except (KeyError, ValueError):
            raise ValueError(f"--exit-signal {text!r}: {item!r} is not a signal name (e.g. SIGTERM, SIGUSR1)") from None
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"--exit-signal {text!r}: {sig.name} cannot be caught; use SIGTERM or SIGUSR1")
        if sig not in found:
            found.append(sig)
    if not found:
        raise ValueError(f"--exit-signal {text!r} names no signal; e.g. {DEFAULT_SIGNALS}")
    return tuple(found)


class StopSignals:
    """While entered, each of ``signals`` sets ``requested`` (the first signal's name) instead of
    ending the process; the previous handlers come back on exit. Outside the main thread (where
    Python cannot install handlers) it does nothing and says so.

    ``time_limit_minutes`` (``--exit-duration-in-mins``): :meth:`reason` also asks to stop once
    that long has passed since this object was made (the trainer makes it at start-up).

    ``ignore_on_exit``: on exit the signals are ignored instead, for a process that ends once the
    run has ended: a scheduler's signal that arrives while torch is being torn down would otherwise
    end a finished run with the signal's default action, and its exit status would say it failed.
    """

    def __init__(
        self,
        signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGUSR1),
        time_limit_minutes: Optional[float] = None,
        ignore_on_exit: bool = False,
    ):
        self.signals = tuple(signals)
        self.ignore_on_exit = ignore_on_exit
        self.requested: Optional[str] = None
        self.time_limit_minutes = time_limit_minutes
        self._started = time.monotonic()
        self._previous = {}

    def reason(self) -> Optional[str]:
        """Why to stop after this step: the first signal received, or the time limit once passed
        (then ``requested`` names it too); None to go on."""
        if self.requested is None and self.time_limit_minutes is not None:
            minutes = (time.monotonic() - self._started) / 60
            if minutes >= self.time_limit_minutes:
                self.requested = f"--exit-duration-in-mins {self.time_limit_minutes:g} ({minutes:.2f} min)"
                logger.warning("%s reached: saving a checkpoint after this step, then exiting", self.requested)
        return self.requested

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested is None:
            logger.warning("%s received: saving a checkpoint after this step, then exiting", name)
            self.requested = name

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            logger.warning(
                "not the main thread: %s will not stop training with a checkpoint",
                ", ".join(s.name for s in self.signals),
            )
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if self.ignore_on_exit else handler)
        self._previous.clear()
