"""The small-scale reproduction script, reduced (tiny model and corpus, 24 steps, CPU), so the GPU session
that runs it in full finds a working pipeline: token-only, a patch run and its control, a second seed,
the evaluations, one report with the transfer table."""

import importlib.util
import json
import lzma
import math
import shutil
import statistics
import subprocess
import sys

import pytest

from megatron_patch.errors import UserError
from tests.conftest import REPO_ROOT
from tests.test_quickstart import STAND_IN
from tests.trainer_plan import stages

pytestmark = pytest.mark.slow  # whole-pipeline subprocess runs: scheduled first (tests/conftest.py)


def _reproduce_small():
    spec = importlib.util.spec_from_file_location(
        "examples_reproduce_small", REPO_ROOT / "examples" / "reproduce_small.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("reduced", [True, False])
@pytest.mark.parametrize("cpu", [True, False])
def test_every_run_passes_the_trainers_validation(reduced, cpu, tmp_path, tiny_corpus):
    """The flags of each run, full or reduced, CPU or GPU, are accepted by the trainer (one process),
    and each control runs its patch run's token stage alone, as long."""
    from megatron_patch.training.arguments import parse_args

    repro = _reproduce_small()
    tokenizer = tiny_corpus["tokenizer"]  # the trainer reads its vocabulary size before it starts
    runs = repro.trainer_arguments(
        repro.settings(reduced, cpu),
        tmp_path / "train_text_document",
        tokenizer,
        31_000_000 if not reduced else 16 * 64 * 24,
        cpu,
        seed=3,
    )
    assert list(runs) == list(repro.RUN_NAMES)
    plans = {name: stages(parse_args([str(flag) for flag in flags], world_size=1)) for name, flags in runs.items()}
    assert list(plans["token-only"]) == ["token"]
    for name in repro.FRACTIONS:
        assert list(plans[name]) == ["patch", "token"] and plans[name]["patch"][0] == repro.PATCH_SIZE
        assert plans[f"control-{name}"] == {"token": plans[name]["token"]}
        flags = [str(flag) for flag in runs[f"control-{name}"]]
        assert "--pretrained-checkpoint" not in flags and flags[flags.index("--seed") + 1] == "3"


def test_a_stopped_training_run_is_not_taken_for_done(tmp_path, capsys):
    """reproduce_small trains through the pipeline's train_command (--load of the run's own --save)
    and run_step (tested in tests/test_quickstart.py), with the environment left as it is (a trainer
    stand-in writes the summary)."""
    repro = _reproduce_small()
    save = tmp_path / "lambda-2_3"
    launcher = [sys.executable, "-c", STAND_IN]

    def train(how):
        repro._run("train lambda-2_3", repro.train_command(launcher, [how], save), save, finished=repro.trained)

    with pytest.raises(UserError, match="step 'train lambda-2_3' stopped before its end; re-run to resume it"):
        train("stopped")
    train("finished")
    train("stopped")  # not run again
    assert "== train lambda-2_3: done already" in capsys.readouterr().out and repro.trained(save)


def test_a_process_count_that_splits_no_patch_batch_is_refused(tmp_path):
    result = subprocess.run(
        [sys.executable, "examples/reproduce_small.py", "--workdir", str(tmp_path), "--nproc", "3"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert (
        "--nproc 3: the global batch of 32 sequences must split into K=4 x micro-batch 8 x 3 processes" in result.stderr
    )
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def reduced_data(tmp_path_factory, tiny_jsonl):
    """A --data-dir for --reduced from the bundled corpus: all of it to train on, two slices of it
    standing in for the held-out set and WikiText-103 (the test checks the pipeline, not the numbers)."""
    folder = tmp_path_factory.mktemp("repro-data")
    shutil.copyfile(tiny_jsonl, folder / "tiny.jsonl.xz")
    with lzma.open(tiny_jsonl, "rt", encoding="utf-8") as stream:
        lines = stream.readlines()
    for name, part in (("valid", lines[:4]), ("wikitext103_test", lines[4:7])):
        with lzma.open(folder / f"{name}.jsonl.xz", "wt", encoding="utf-8") as stream:
            stream.writelines(part)
    return folder


def test_missing_data_is_one_line_and_leaves_nothing(tmp_path):
    result = subprocess.run(
        [sys.executable, "examples/reproduce_small.py", "--workdir", str(tmp_path / "w"), "--data-dir", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert f"{tmp_path / 'train.jsonl.xz'} not found; pass the folder holding train.jsonl.xz" in result.stderr
    assert not (tmp_path / "w").exists()


def test_reduced_reproduction_runs_and_reports(tmp_path, reduced_data):
    work = tmp_path / "repro"
    command = [
        sys.executable,
        "examples/reproduce_small.py",
        "--reduced",
        "--cpu",
        "--workdir",
        str(work),
        "--data-dir",
        str(reduced_data),
    ]
    result = subprocess.run(
        command + ["--runs", "token-only,lambda-2_3,control-lambda-2_3"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = (work / "report.md").read_text()
    assert report.startswith("# Small-scale reproduction, --reduced smoke run (")
    scored = {
        data: json.loads((work / f"eval_token-only_{data}.json").read_text()) for data in ("valid", "wikitext103")
    }
    assert (
        f"model tiny trained in float32; one pass over the training documents, split by documents between the "
        f"stages; seeds 1; held-out token-level loss on {scored['valid']['documents']} documents of valid.jsonl.xz "
        f"({scored['valid']['tokens']:,} tokens) and {scored['wikitext103']['documents']} documents of "
        f"wikitext103_test.jsonl.xz ({scored['wikitext103']['tokens']:,} tokens) (--reduced scores only the first 4"
    ) in report
    # tokens, the trainer's cost against the run's own tokens (lambda/K + 1 - lambda at K=4; 1 for the
    # control, which trains a third of the tokens), and model FLOPs against token-only's
    assert "| token-only | 1 | 24,576 | 1.000 | 1.000 |" in report
    assert "| lambda-2_3 | 1 | 24,576 | 0.500 | 0.500 |" in report
    assert "| control-lambda-2_3 | 1 | 8,192 | 1.000 | 0.333 |" in report
    loss = {
        run: json.loads((work / f"eval_{run}_valid.json").read_text())["loss"]
        for run in ("token-only", "lambda-2_3", "control-lambda-2_3", "lambda-2_3-seed2", "control-lambda-2_3-seed2")
        if (work / f"eval_{run}_valid.json").exists()
    }
    assert f"| lambda-2_3 | 1 | {loss['control-lambda-2_3'] - loss['lambda-2_3']:.4f} |" in report  # transfer, valid
    assert "![validation loss](loss_curves.png)" in report
    assert (work / "loss_curves.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    curves = json.loads((work / "curves.json").read_text())
    for run, points in curves.items():  # the last validation comes after the run's last step
        summary = json.loads((work / run / "summary.json").read_text())
        assert points[-1]["tokens"] == summary["total_tokens"]
        assert math.isclose(points[-1]["flops"], sum(s["flops"] for s in summary["stages"].values()), rel_tol=1e-9)

    # a second seed of the pair: seed 1 is not trained again; the report gives the spread over seeds
    again = subprocess.run(
        command + ["--runs", "lambda-2_3,control-lambda-2_3", "--seeds", "2"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert (
        "== train lambda-2_3: done already" in again.stdout
        and "== train control-lambda-2_3: done already" in again.stdout
    )
    assert "== train lambda-2_3-seed2: " in again.stdout
    seed2 = {
        run: json.loads((work / f"eval_{run}-seed2_valid.json").read_text())["loss"]
        for run in ("lambda-2_3", "control-lambda-2_3")
    }
    transfers = [loss["control-lambda-2_3"] - loss["lambda-2_3"], seed2["control-lambda-2_3"] - seed2["lambda-2_3"]]
    report = (work / "report.md").read_text()
    assert (
        f"| lambda-2_3 | 1, 2 | {statistics.fmean(transfers):.4f} ± {statistics.stdev(transfers):.4f} "
        f"[{min(transfers):.4f}, {max(transfers):.4f}] |"
    ) in report
    # every finished run of the workdir: token-only too, trained by the first invocation
    assert "| token-only | 1 | 24,576 |" in report and "; seeds 1, 2; " in report
    assert "over every finished run in the workdir (token-only from earlier invocations)" in again.stdout
    # the multi-epoch recipe refuses this one-pass workdir, whose finished runs it would report
    epochs = subprocess.run(command + ["--epochs", "2"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert epochs.returncode == 2 and "== " not in epochs.stdout, epochs.stdout[-2000:]
    assert "holds outputs of reproduce_small made with other settings (epochs None -> 2.0)" in epochs.stderr


def test_unknown_run_names_are_refused(tmp_path):
    result = subprocess.run(
        [sys.executable, "examples/reproduce_small.py", "--workdir", str(tmp_path), "--runs", "token-only,lambda-3_4"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "--runs 'token-only,lambda-3_4': unknown run lambda-3_4; choose from" in result.stderr
    assert not any(tmp_path.iterdir())  # nothing created before the flags are checked
