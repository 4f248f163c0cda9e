"""The GPU campaign's runner: each run a subprocess in its own process group, given the time its part
has left and stopped there (SIGTERM, then SIGKILL), its output appended to the one ``campaign.log``
(the device returns at most 8 files: the summary, four part JSONs and one log), and every part's
JSON and ``summary.md`` rewritten under temporary names after each run.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import math
import os
import platform
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Tuple

from campaign_options import ACCUM_RUN, COST_RUNS, TESTS_RUN
from campaign_summary import summary_markdown
from common import write_json, write_text

from megatron_patch.runtime.child_processes import end_with_parent_after_exec

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "megatron_patch.gpu_campaign/1"
LOG_NAME = "campaign.log"  # every run's output, part after part


class Stopped(Exception):
    """SIGTERM: stop the running subprocess, write what finished, exit."""


def environment(cpu: bool) -> dict:
    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "missing"

    device = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    if not cpu:
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit", "--format=csv,noheader"]
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            device = subprocess.run(query, capture_output=True, text=True, timeout=30, check=False).stdout.strip()
        device = device or "nvidia-smi gave no GPU"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    env = {"date_utc": date, "python": platform.python_version(), "torch": version("torch")}
    return dict(env, megatron_core=version("megatron-core"), device=device)


class Campaign:
    """Runs the parts' subprocesses against the clock and rewrites the outputs after each run."""

    def __init__(self, opts, argv: List[str], work: Path):
        self.opts, self.work, self.out = opts, work, Path(opts.out)
        self.start = time.monotonic()
        # 10 s before the deadline: 5 s for a stopped run to exit, then the summary
        self.deadline = self.start + opts.deadline_s - 10 if opts.deadline_s else math.inf
        path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path)
        self.state = {"schema": SCHEMA, "command": "python benchmarks/gpu_campaign.py " + shlex.join(argv)}
        self.state.update(cpu=opts.cpu, parts_requested=opts.parts, environment=environment(opts.cpu))
        # what each part is to run, for the summary's list of what did not finish and how to rerun it
        runs = {"tests": [TESTS_RUN], "throughput": opts.throughput_runs, "cost": list(COST_RUNS)}
        runs["activations"] = opts.activations_runs
        self.state.update(argv=list(argv), plan={part: runs[part] for part in opts.parts}, elapsed_s=0.0, parts={})
        self.part_end, self.log = math.inf, self.out / LOG_NAME
        self.log.write_text("")
        self.failed_levers: Dict[str, str] = {}  # lever -> why: a lever whose run alone failed, left out after

    def begin(self, name: str, **fields) -> dict:
        """Start part ``name``: its budget, and with a deadline also what earlier parts left, but never
        the budgets of the parts after it."""
        now, parts = time.monotonic(), self.opts.parts
        own = now + getattr(self.opts, f"{name}_budget_s")
        later = sum(getattr(self.opts, f"{p}_budget_s") for p in parts[parts.index(name) + 1 :])
        self.part_end = own if self.deadline == math.inf else min(self.deadline, max(own, self.deadline - later))
        with open(self.log, "a") as log:
            log.write(f"\n===== part {name}\n")
        part = self.state["parts"][name] = {"part": name, "runs": [], **fields}
        self.save()
        return part

    def run(self, part: dict, name: str, cmd: List[str], cap_s: float = math.inf, **fields) -> Tuple[dict, str]:
        """Run ``cmd`` (an argument list) in the repository root with the time the part has left, or
        ``cap_s`` seconds where that is less, its output appended to the log; returns its record
        (status, seconds) and output. A run stopped at its own cap is ``failed (over its N s cap)``:
        a failure of the run, not a lack of the part's time."""
        record = {"name": name, "command": shlex.join(cmd), "status": "skipped (no time left)", "seconds": 0.0}
        part["runs"].append(dict(record, **fields))
        record = part["runs"][-1]
        left, output = self.part_end - time.monotonic(), ""
        capped = cap_s < left
        left = min(left, cap_s)
        if left >= 1:
            with open(self.log, "a") as log:
                log.write(f"\n$ {record['command']}\n")
                log.flush()
                offset, started = log.tell(), time.monotonic()
                # its own process group, so that a stop reaches its compile workers too; and killed
                # with the harness, should the device's time limit kill it outright
                kw = dict(cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                kw.update(preexec_fn=end_with_parent_after_exec)
                proc = subprocess.Popen(cmd, **kw)
                try:
                    rc = proc.wait(timeout=left)
                    record["status"] = "ok" if rc == 0 else f"failed (exit {rc})"
                except subprocess.TimeoutExpired:
                    record["status"] = (
                        f"failed (over its {left:.0f} s cap)" if capped else f"timed out after {left:.0f} s"
                    )
                except Stopped:
                    record["status"] = "stopped (SIGTERM)"
                    raise
                finally:
                    if proc.poll() is None:
                        _stop(proc)
                    record["seconds"] = time.monotonic() - started
            with open(self.log, errors="replace") as log:
                log.seek(offset)
                output = log.read()
        print(f"[{part['part']}] {name}: {record['status']}, {record['seconds']:.1f} s", flush=True)
        return record, output

    def save(self) -> None:
        self.state["elapsed_s"] = time.monotonic() - self.start
        head = {"schema": SCHEMA, "command": self.state["command"], "environment": self.state["environment"]}
        for name, part in self.state["parts"].items():
            write_json(str(self.out / f"{name}.json"), {**head, **part})
        write_text(self.out / "summary.md", summary_markdown(self.state, ACCUM_RUN))


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the run's process group (its compile workers too), SIGKILL after 5 s."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
            return
