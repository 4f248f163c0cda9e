"""Per-step phase times from megatron-core's own timer hooks (``config.timers``).

megatron-core 0.16.1 times its phases itself when a config's ``timers`` is not None: the pipeline
schedules and ``finalize_model_grads`` read the model's TransformerConfig (``get_model_config``),
the optimizers their OptimizerConfig (``self.config``). Every call site is::

    config.timers(name, log_level=1 or 2).start(barrier=config.barrier_with_L1_time)   # or .start()
    config.timers(name).stop()

``PhaseTimers`` implements exactly that interface, without synchronising: on CUDA each start/stop
records an event on the current stream (megatron's own ``Timer`` calls ``torch.cuda.synchronize``
at every start and stop, which would change what is measured); on CPU it reads
``time.perf_counter``. ``barrier`` and ``log_level`` are accepted and ignored: the benchmark is one
rank, and every level is recorded. Names it does not know are recorded like the others.

Where the phases sit in one training step (megatron-core 0.16.1, every schedule):

- ``forward-backward`` holds the whole schedule, and inside it ``forward-compute`` and
  ``backward-compute`` (once per micro-batch), the pipeline's send/recv phases, and
  ``finalize_model_grads``'s ``all-grads-sync``, ``*-grads-all-reduce`` phases (the schedule calls
  ``finalize_model_grads_func`` before it stops ``forward-backward``).
- After it, one after another: the optimizer phases in ``OPTIMIZER_PHASES``.
- Untimed by megatron: zeroing the gradient buffers, the loss all-reduce and ``.item()``, and in a
  ``ChainedOptimizer`` (what ``get_megatron_optimizer`` returns) the gradient norm and clipping, so
  ``optimizer-clip-main-grad`` and ``optimizer-count-zeros`` do not fire there; and the LR scheduler.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Dict, Iterable, List, Optional

# Phases that run after forward-backward, one after another (none inside another).
OPTIMIZER_PHASES = (
    "optimizer-copy-to-main-grad",
    "optimizer-unscale-and-check-inf",
    "optimizer-clip-main-grad",
    "optimizer-count-zeros",
    "optimizer-inner-step",
    "optimizer-copy-main-to-model-params",
    "params-all-gather",
)
TOP_LEVEL_PHASES = ("forward-backward",) + OPTIMIZER_PHASES  # disjoint: their sum never counts a time twice


class _Phase:
    """What ``timers(name)`` returns: megatron calls ``start(barrier=...)`` and ``stop()`` on it."""

    def __init__(self, owner: "PhaseTimers", name: str):
        self.owner, self.name = owner, name

    def start(self, barrier: bool = False) -> None:
        self.owner._start(self.name)

    def stop(self, barrier: bool = False) -> None:
        self.owner._stop(self.name)


class PhaseTimers:
    """megatron's ``timers`` callable; collects, per step, every interval of every phase name.

    Call ``end_step()`` after each step (no synchronisation), and ``per_step_ms()`` once the device
    work of those steps has finished (after ``torch.cuda.synchronize``).
    """

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self._phases: Dict[str, _Phase] = {}
        self.clear()

    def __call__(self, name: str, log_level: Optional[int] = None) -> _Phase:
        phase = self._phases.get(name)
        if phase is None:
            phase = self._phases[name] = _Phase(self, name)
        return phase

    def clear(self) -> None:
        """Forget every interval (the warm-up's, or a step cut short by an error)."""
        self._open: Dict[str, object] = {}
        self._current: List[tuple] = []  # (name, start mark, stop mark) of the step under way
        self._steps: List[List[tuple]] = []
        self.names: Dict[str, None] = {}  # phase names in the order they first started

    def _mark(self):
        if self.cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _start(self, name: str) -> None:
        if name in self._open:
            raise RuntimeError(f"phase timer {name!r} started twice without a stop")
        self.names.setdefault(name, None)
        self._open[name] = self._mark()

    def _stop(self, name: str) -> None:
        if name not in self._open:
            raise RuntimeError(f"phase timer {name!r} stopped without a start")
        self._current.append((name, self._open.pop(name), self._mark()))

    def end_step(self) -> None:
        if self._open:
            raise RuntimeError(f"phase timers still running at the end of a step: {', '.join(self._open)}")
        self._steps.append(self._current)
        self._current = []

    def per_step_ms(self) -> List[Dict[str, float]]:
        """For each ended step: {name: summed milliseconds of all its intervals in that step}."""
        steps = []
        for intervals in self._steps:
            totals: Dict[str, float] = {}
            for name, start, stop in intervals:
                ms = start.elapsed_time(stop) if self.cuda else 1e3 * (stop - start)
                totals[name] = totals.get(name, 0.0) + ms
            steps.append(totals)
        return steps


def phase_medians(per_step: List[Dict[str, float]], names: Iterable[str]) -> Dict[str, float]:
    """{name: median over the steps of its per-step total}, 0 ms in a step where it did not run;
    names seen in no step are left out."""
    return {
        name: statistics.median(step.get(name, 0.0) for step in per_step)
        for name in names
        if any(name in step for step in per_step)
    }


def outside_ms(step_ms: float, phases_ms: Dict[str, float]) -> float:
    """Step time not inside a top-level phase: step - forward-backward - the optimizer phases.

    Nested phases (forward-compute, backward-compute, all-grads-sync, ...) are inside
    forward-backward and are not subtracted again."""
    return step_ms - sum(phases_ms.get(name, 0.0) for name in TOP_LEVEL_PHASES)


@contextlib.contextmanager
def installed(timers: PhaseTimers, configs: Iterable[object]):
    """Set ``config.timers = timers`` on each distinct config object; put the old value back on exit."""
    unique = list({id(config): config for config in configs}.values())
    saved = [config.timers for config in unique]
    try:
        for config in unique:
            config.timers = timers
        yield timers
    finally:
        for config, old in zip(unique, saved):
            config.timers = old


def phase_table(rows: List[dict]) -> str:
    """One row per configuration, one column per phase name seen (median ms per step)."""
    names = list({name: None for r in rows for name in r.get("phases_ms", {})})
    lines = [
        "| recompute | K | b | step ms (median) | " + " | ".join(names) + " | outside timed phases |",
        "| --- | --- | --- | --- | " + "--- | " * len(names) + "--- |",
    ]
    for r in rows:
        cells = [r["recompute"], str(r["patch_size"]), str(r["micro_batch_size"])]
        if "error" in r:
            cells += ["OOM" if r["error"].startswith("OOM") else r["error"]] + [""] * (len(names) + 1)
        else:
            phases = r["phases_ms"]
            cells += [f"{1e3 * r['step_s_median']:.2f}"]
            cells += [f"{phases[name]:.2f}" if name in phases else "" for name in names]
            cells += [f"{r['phases_outside_ms']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
