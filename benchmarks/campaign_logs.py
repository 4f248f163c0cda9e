"""The campaign's runs read back: the trainer's log lines and ``throughput.py``'s progress lines (for
a run stopped at its time limit, before it wrote its JSON), and pytest's ``--junitxml`` counts.

Nothing here runs a model or imports the package. Units: seconds, tokens, GiB.
"""

from __future__ import annotations

import os
import re
from typing import List, Optional

# the trainer's log line (megatron_patch/training/metrics.py), e.g. "[patch] iter 5/40 (global 5) | stage
# tokens 1.311M | ... | 412,345 tok/s (all GPUs) | 300.1 TFLOP/s/GPU MFU 38.0% | peak mem (max over ranks)
# 27.01 GiB"; earlier logs said "tokens", "tok/s" and "peak mem" alone (and before the figure was per GPU
# the unit had no "/GPU")
TRAINER_LINE = re.compile(
    r"\[(?P<stage>patch|token)\] iter (?P<iter>\d+)/(?P<iters>\d+) \(global \d+\) \|.*?\| "
    r"(?P<tps>[\d,]+) tok/s(?: \(all GPUs\))? \| (?P<flops>[\d.]+) (?P<unit>TFLOP/s|GFLOP/s)(?:/GPU)?"
    r"(?: MFU (?P<mfu>[\d.]+)%)?(?: \| peak mem(?: \(max over ranks\))? (?P<peak>[\d.]+) GiB)?"
)
# throughput.py's progress line, e.g. "  recompute=none b=16 K=1: 283.1 ms, 115,855 tok/s, 303.8 TFLOP/s, ..."
THROUGHPUT_LINE = re.compile(
    r"recompute=(?P<recompute>\w+) b=(?P<b>\d+) K=(?P<K>\d+): (?P<ms>[\d.]+) ms, (?P<tps>[\d,]+) tok/s, "
    r"(?P<tflops>[\d.e+-]+) TFLOP/s"
)


def _number(text: Optional[str], scale: float = 1.0) -> Optional[float]:
    return None if text is None else float(text.replace(",", "")) * scale


def trainer_windows(text: str) -> List[dict]:
    """The trainer's log lines: one dict per logged window (tokens/s, TFLOP/s per GPU, MFU, peak GiB)."""
    windows = []
    for m in TRAINER_LINE.finditer(text):
        window = {"stage": m["stage"], "iteration": int(m["iter"]), "stage_iters": int(m["iters"])}
        window["tokens_per_s"] = _number(m["tps"])
        window["tflops_per_gpu"] = _number(m["flops"], 1e-3 if m["unit"] == "GFLOP/s" else 1.0)
        window.update(mfu=_number(m["mfu"], 0.01), peak_memory_gib=_number(m["peak"]))
        windows.append(window)
    return windows


def throughput_partial_rows(text: str) -> List[dict]:
    """Rows of a ``throughput.py`` run stopped before it wrote its JSON (no MFU, no memory)."""
    rows = []
    for m in THROUGHPUT_LINE.finditer(text):
        row = {"recompute": m["recompute"], "micro_batch_size": int(m["b"]), "patch_size": int(m["K"])}
        row.update(step_s_median=_number(m["ms"], 1e-3), tokens_per_s=_number(m["tps"]), tflops=_number(m["tflops"]))
        row.update(stage="token" if m["K"] == "1" else "patch", mfu=None, peak_memory_gib=None, partial=True)
        rows.append(row)
    return rows


def junit_counts(path: str) -> Optional[dict]:
    """passed/failed/errors/skipped and the failing tests' names from pytest's ``--junitxml`` file."""
    from xml.etree import ElementTree

    if not os.path.exists(path):
        return None
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        kind = "failed" if "failure" in kinds else "errors" if "error" in kinds else None
        kind = kind or ("skipped" if "skipped" in kinds else "passed")
        counts[kind] += 1
        if kind in ("failed", "errors"):
            counts["failures"].append(f"{case.get('classname')}::{case.get('name')}")
    return counts


# pytest -v's line for a finished test, e.g. "tests/unit/test_rope.py::test_fused_on_gpu PASSED [ 14%]"
PYTEST_LINE = re.compile(r"^(?P<test>\S+::\S+) (?P<outcome>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", re.M)


def pytest_log_counts(text: str) -> Optional[dict]:
    """The counts of :func:`junit_counts` from pytest ``-v`` output, for a run stopped before it wrote
    its junit file (``partial``: True); None when no test finished."""
    found = PYTEST_LINE.findall(text)
    if not found:
        return None
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "partial": True}
    kinds = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors"}
    for test, outcome in found:
        kind = kinds.get(outcome, "skipped")
        counts[kind] += 1
        if kind in ("failed", "errors"):
            counts["failures"].append(test)
    return counts
