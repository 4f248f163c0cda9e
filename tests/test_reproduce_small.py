"""The small-scale reproduction script, reduced (tiny model and corpus, 24 steps, CPU), so the GPU session
that runs it in full finds a working pipeline: four runs, eight evaluations, one report."""

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


def _reproduce_small():
    spec = importlib.util.spec_from_file_location("examples_reproduce_small", REPO_ROOT / "examples" / "reproduce_small.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("reduced", [True, False])
@pytest.mark.parametrize("cpu", [True, False])
def test_every_run_passes_the_trainers_validation(reduced, cpu, tmp_path):
    """The flags of each run, full or reduced, CPU or GPU, are accepted by the trainer (one process)."""
    from megatron_patch.training.arguments import parse_args

    repro = _reproduce_small()
    tokenizer = tmp_path / "tokenizer.model"
    tokenizer.write_bytes(b"")  # the trainer checks only that the file exists before it starts
    runs = repro.trainer_arguments(repro.settings(reduced, cpu), tmp_path / "train_text_document", tokenizer,
                                   31_000_000 if not reduced else 16 * 64 * 24, cpu)
    assert list(runs) == list(repro.RUN_NAMES)
    for name, flags in runs.items():
        args = parse_args([str(flag) for flag in flags], world_size=1)
        assert args.patch_size == (1 if name == "token-only" else repro.PATCH_SIZE)
        assert args.token_iters > 0 and (args.patch_iters > 0) == (name != "token-only")


def test_a_process_count_that_splits_no_patch_batch_is_refused(tmp_path):
    result = subprocess.run([sys.executable, "examples/reproduce_small.py", "--workdir", str(tmp_path), "--nproc", "3"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--nproc 3: the global batch of 32 sequences must split into K=4 x micro-batch 8 x 3 processes" in result.stderr
    assert not any(tmp_path.iterdir())


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

    # a second call with a subset of the runs trains nothing again and reports only those runs
    again = subprocess.run([sys.executable, "examples/reproduce_small.py", "--reduced", "--cpu", "--workdir", str(work),
                            "--runs", "token-only,lambda-2_3"], cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "== train token-only: done already" in again.stdout and "== train lambda-2_3: done already" in again.stdout
    report = (work / "report.md").read_text()
    assert "| token-only |" in report and "| lambda-2_3 |" in report and "| lambda-1_2 |" not in report


def test_unknown_run_names_are_refused(tmp_path):
    result = subprocess.run([sys.executable, "examples/reproduce_small.py", "--workdir", str(tmp_path),
                             "--runs", "token-only,lambda-3_4"], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert "--runs 'token-only,lambda-3_4': unknown run lambda-3_4; choose from" in result.stderr
    assert not any(tmp_path.iterdir())  # nothing created before the flags are checked
