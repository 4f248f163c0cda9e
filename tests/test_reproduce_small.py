"""The small-scale reproduction script, reduced (tiny model and corpus, 24 steps, CPU), so the GPU session
that runs it in full finds a working pipeline: four runs, eight evaluations, one report."""

import json
import math
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_reduced_reproduction_runs_and_reports(tmp_path, shared_data):
    work = tmp_path / "repro"
    result = subprocess.run([sys.executable, "examples/reproduce_small.py", "--reduced", "--cpu", "--workdir", str(work)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = (work / "report.md").read_text()
    for run in ("token-only", "lambda-1_2", "lambda-2_3", "lambda-4_5"):
        assert f"| {run} |" in report
    assert "| lambda-2_3 | 0.500 |" in report  # theoretical cost lambda/K + 1 - lambda at K=4
    assert "![validation loss](loss_curves.png)" in report
    assert (work / "loss_curves.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    curves = json.loads((work / "curves.json").read_text())
    for run, points in curves.items():  # the last validation comes after the last step
        summary = json.loads((work / run / "summary.json").read_text())
        assert points[-1]["tokens"] == summary["total_tokens"]
        assert math.isclose(points[-1]["flops"], sum(s["flops"] for s in summary["stages"].values()), rel_tol=1e-9)
