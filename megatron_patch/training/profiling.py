"""``--profile``: a torch.profiler trace of the training steps ``[start, end)`` on chosen ranks.

Megatron's flags (``--profile``, ``--profile-step-start``, ``--profile-step-end``,
``--profile-ranks``), with torch.profiler (CPU and, on a GPU, CUDA activity). Steps are the
global iterations of the run (1-based, the numbers the log and ``metrics.jsonl`` show), so a
window may span the stage boundary; a resumed run profiles the part of the window it runs. Each
profiled step is a ``record_function`` range named ``iteration N`` in the trace. When the window
closes (or the run stops inside it), each profiled rank writes
``DIR/rank{R}_iters{A}-{B}.json`` (Chrome trace format: chrome://tracing or ui.perfetto.dev;
``DIR`` is ``--profile-dir``, by default ``<--save>/profile``) and logs the operators with the
most self time (device time on a GPU, CPU time otherwise).
"""

import contextlib
import logging
import os
from typing import Optional

import torch

from megatron_patch.runtime import atomic_file
from megatron_patch.training.config import ProfileSettings

logger = logging.getLogger(__name__)

TOP_OPERATORS = 15


class StepProfiler:
    """Starts and stops torch.profiler around the steps of ``settings``' window on this rank."""

    def __init__(self, settings: Optional[ProfileSettings], rank: int):
        self.settings = settings if settings is not None and rank in settings.ranks else None
        self.rank = rank
        self._profiler = None
        self._first = self._last = None

    def step(self, iteration: int):
        """A context for the step that will be global ``iteration``: profiled inside the window."""
        settings = self.settings
        if settings is None or not settings.first_step <= iteration < settings.end_step:
            return contextlib.nullcontext()
        if self._profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities)
            self._profiler.start()
            self._first = iteration
        self._last = iteration
        return self._step_range(iteration)

    @contextlib.contextmanager
    def _step_range(self, iteration: int):
        with torch.profiler.record_function(f"iteration {iteration}"):
            yield
        if iteration == self.settings.end_step - 1:
            self.close()

    def close(self) -> None:
        """Stop the profiler, if running, and write its trace (the window's end, or a stop inside it)."""
        if self._profiler is None:
            return
        profiler, self._profiler = self._profiler, None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        profiler.stop()
        folder = self.settings.folder
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"rank{self.rank}_iters{self._first}-{self._last}.json")
        atomic_file.write_with(path, profiler.export_chrome_trace)
        sort_by = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = profiler.key_averages().table(sort_by=sort_by, row_limit=TOP_OPERATORS)
        logger.info("profile of iterations %d-%d: %s; top operators:\n%s", self._first, self._last, path, table)
