"""``--manual-gc``: Python's garbage collector run by the trainer at chosen steps, not at random.

Python's automatic collector starts a full collection whenever its allocation counters say so,
at a different moment on every rank; at scale one rank's pause stalls all the others at the next
collective. With ``--manual-gc`` (Megatron's flag) the automatic collector is off while the
trainer runs, one collection runs at start, and then one after every ``--manual-gc-interval``-th
global iteration (0: none), at the same step on every rank. Reference cycles (rare in the
training step) then live until the next collection; reference counting still frees everything
else at once. The collector's previous state comes back when the run ends.
"""

import gc
import logging
from typing import Optional

logger = logging.getLogger(__name__)


class ManualGC:
    """A context for the run; :meth:`after_step` collects at the interval. ``interval`` None: off."""

    def __init__(self, interval: Optional[int]):
        self.interval = interval
        self._was_enabled = False

    def __enter__(self) -> "ManualGC":
        if self.interval is not None:
            self._was_enabled = gc.isenabled()
            gc.disable()
            gc.collect()
            logger.info(
                "--manual-gc: automatic garbage collection off; a collection every %s",
                f"{self.interval} steps" if self.interval else "start only",
            )
        return self

    def after_step(self, iteration: int) -> None:
        if self.interval and iteration % self.interval == 0:
            gc.collect()

    def __exit__(self, *exc) -> None:
        if self.interval is not None and self._was_enabled:
            gc.enable()
