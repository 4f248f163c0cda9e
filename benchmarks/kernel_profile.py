"""Where one training step's device time goes: its longest kernels, from one profiled step.

``throughput.py --kernel-table N`` runs one more step of a row under ``torch.profiler`` (after the
timed steps, so the timings never include the profiler) and keeps the N kernels with the most
device time in it: on a GPU, each CUDA kernel's name (which also says which attention kernel SDPA
picked: flash, cuDNN or memory-efficient), its launches and its summed time; on CPU, the operators
with the most self CPU time instead. ``busy`` is the summed time of every kernel over the profiled
step's wall time (synchronised before and after): what is left of 1 is time the device had no
kernel running (launch gaps, host syncs, the host's own work), or less than that when kernels
overlap on several streams.
"""

from __future__ import annotations

import time
from typing import Callable, List

NAME_CHARS = 200  # kernel names are long C++ templates: the start tells them apart


def profile_step(step: Callable[[], object], cuda: bool, top: int) -> dict:
    """Run ``step`` once under the profiler; its ``top`` longest kernels (CPU: operators by self time).

    Returns ``{"wall_ms", "kernel_ms", "busy", "kernels": [{"name", "calls", "ms", "share"}]}``,
    ``share`` being each one's part of ``kernel_ms`` (all kernels of the step, not only the top)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    synchronize()
    with profile(activities=activities) as profiler:
        started = time.perf_counter()
        step()
        synchronize()
        wall_ms = 1e3 * (time.perf_counter() - started)
    averages = profiler.key_averages()
    if cuda:  # the kernels themselves (an operator's device time is its kernels': counted once, here)
        kernels = [
            (e.key, e.count, e.self_device_time_total / 1e3) for e in averages if e.device_type == DeviceType.CUDA
        ]
    else:
        kernels = [(e.key, e.count, e.self_cpu_time_total / 1e3) for e in averages]
    kernels = [kernel for kernel in kernels if kernel[2] > 0]
    total = sum(ms for _, _, ms in kernels)
    kernels.sort(key=lambda k: k[2], reverse=True)
    return {
        "wall_ms": wall_ms,
        "kernel_ms": total,
        "busy": total / wall_ms if wall_ms > 0 else None,
        "kernels": [
            {"name": name[:NAME_CHARS], "calls": calls, "ms": ms, "share": ms / total if total else None}
            for name, calls, ms in kernels[:top]
        ],
    }


def kernel_tables(rows: List[dict], name_chars: int = 90) -> str:
    """A markdown table per row that has a ``kernel_profile`` (``throughput_sweep`` rows)."""
    out = []
    for row in rows:
        profile = row.get("kernel_profile")
        if not profile:
            continue
        stage = f"K={row['patch_size']}" if row["patch_size"] > 1 else "token stage"
        busy = f"{profile['busy']:.1%}" if profile["busy"] is not None else "n/a"
        out.append(
            f"\n{stage}, b={row['micro_batch_size']}, recompute {row['recompute']}: one profiled step of "
            f"{profile['wall_ms']:.1f} ms wall, kernels {profile['kernel_ms']:.1f} ms (busy {busy})\n"
        )
        out.append("| kernel | calls | ms | share |\n| --- | ---: | ---: | ---: |")
        for kernel in profile["kernels"]:
            name = kernel["name"].replace("|", "\\|")
            name = name if len(name) <= name_chars else name[: name_chars - 3] + "..."
            share = f"{kernel['share']:.1%}" if kernel["share"] is not None else ""
            out.append(f"| `{name}` | {kernel['calls']} | {kernel['ms']:.2f} | {share} |")
    return "\n".join(out)
