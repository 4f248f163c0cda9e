"""The GPU campaign (issue 16) rehearsed on CPU: the two device commands of benchmarks/README.md,
run as written there with ``--cpu`` appended (tiny preset, few steps), on a corpus prepared by the
campaign's own ``--prepare``; the size of what the device call carries; the time limits and the
flag errors. Speed is never asserted."""

import importlib.util
import json
import math
import shlex
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="--cpu rehearsal refuses to run beside a GPU")
README = REPO_ROOT / "benchmarks" / "README.md"
CAMPAIGN = "benchmarks/gpu_campaign.py"
DATA_DIR = ".campaign"  # the README's --data-dir, carried to the device
MIB = 2**20


def _load():
    spec = importlib.util.spec_from_file_location("benchmarks_gpu_campaign", REPO_ROOT / CAMPAIGN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_campaign = _load()
# imported by gpu_campaign from benchmarks/
campaign_carry, campaign_corpus, campaign_logs = (sys.modules[f"campaign_{m}"] for m in ("carry", "corpus", "logs"))


def device_commands():
    """The README's two device commands: ``(install prefix, campaign arguments)`` each."""
    lines = [
        line.strip()
        for line in README.read_text().splitlines()
        if line.strip().startswith("python3 -m pip install") and f"{CAMPAIGN} --parts" in line
    ]
    assert len(lines) == 2, "benchmarks/README.md should hold the campaign's two device commands"
    commands = []
    for line in lines:
        prefix, found, campaign = line.partition(f"; python3 {CAMPAIGN} ")
        assert found, line
        commands.append((prefix, shlex.split(campaign)))
    return commands


def _rehearsal_argv(args, out, data_dir):
    """The device command's arguments with ``--cpu`` and, since a shared CPU can be far slower than
    the GPU its time limits are sized for, those limits scaled up (the budget test keeps them)."""
    swap = {"$OUT": str(out), DATA_DIR: str(data_dir)}
    return [sys.executable, CAMPAIGN, *[swap.get(a, a) for a in args], "--cpu", "--time-scale", "10"]


def _run(argv, **kw):
    return subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800, check=False, **kw)


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """Prepare the bundled corpus, then both device commands, the first beside the preparation and
    the second (which reads the data) after it: two processes for the two cores."""
    root = tmp_path_factory.mktemp("campaign")
    (_, first), (_, second) = device_commands()
    outs = [root / "out1", root / "out2"]
    with open(root / "call1.txt", "w") as printed:
        one = subprocess.Popen(
            _rehearsal_argv(first, outs[0], root / "data"), cwd=REPO_ROOT, stdout=printed, stderr=subprocess.STDOUT
        )
        try:
            prepared = _run(
                [
                    sys.executable,
                    CAMPAIGN,
                    "--prepare",
                    "--cpu",
                    "--corpus",
                    "examples/data/tiny.jsonl.xz",
                    "--data-dir",
                    str(root / "data"),
                ]
            )
            assert prepared.returncode == 0, prepared.stdout + prepared.stderr
            two = _run(_rehearsal_argv(second, outs[1], root / "data"))
            one.wait(timeout=1800)
        finally:
            if one.poll() is None:
                one.kill()
    return {
        "root": root,
        "outs": outs,
        "prepare": prepared.stdout,
        "codes": [one.returncode, two.returncode],
        "outputs": [(root / "call1.txt").read_text(), two.stdout + two.stderr],
    }


def _part(out, name):
    return json.loads((out / f"{name}.json").read_text())


def test_device_commands_install_the_wheel_and_name_their_parts():
    (prefix1, first), (prefix2, second) = device_commands()
    for prefix in (prefix1, prefix2):  # the wheel from the carried .whl onto PYTHONPATH, or stop
        assert "--no-index" in prefix and "export PYTHONPATH=/tmp/site" in prefix and "|| exit" in prefix
        (pattern,) = [word for word in prefix.split() if word.startswith(".whl/")]
        assert pattern.startswith(".whl/megatron_core-") and pattern.endswith(".whl")
        if (REPO_ROOT / ".whl").is_dir():  # downloaded here: the pattern names it, and only it
            wheels = sorted(REPO_ROOT.glob(pattern))
            assert len(wheels) == 1 and "-cp312-" in wheels[0].name and "x86_64" in wheels[0].name, wheels
    parts = [args[args.index("--parts") + 1] for args in (first, second)]
    assert parts == ["tests,throughput", "cost,activations"]  # every part, in the campaign's order
    budgets = sys.modules["campaign_options"].BUDGETS
    for args in (first, second):
        deadline = float(args[args.index("--deadline-s") + 1])
        assert args[args.index("--out") + 1] == "$OUT"
        # two calls within 11 minutes: the install and imports (~10 s) before the clock, 5 s to stop after
        assert 2 * (deadline + 15) <= 11 * 60
        # the parts' reserved budgets fill the deadline less the 10 s kept for the summary, no more
        assert sum(budgets[part] for part in args[args.index("--parts") + 1].split(",")) == deadline - 10
    assert second[second.index("--data-dir") + 1] == DATA_DIR


@CPU_ONLY
def test_rehearsal_runs_every_part_and_writes_its_outputs(rehearsal):
    for output, code in zip(rehearsal["outputs"], rehearsal["codes"]):
        assert code == 0, output[-3000:]
    out1, out2 = rehearsal["outs"]
    expected = [
        {"summary.md", "tests.json", "tests.log", "throughput.json", "throughput.log"},
        {"summary.md", "cost.json", "cost.log", "activations.json", "activations.log"},
    ]
    for out, files in zip((out1, out2), expected):
        assert {p.name for p in out.iterdir()} == files  # the device returns at most 8 files
    tests = _part(out1, "tests")
    assert tests["runs"][0]["status"] == "ok" and tests["runs"][0]["command"].split()[1:4] == ["-m", "pytest", "-m"]
    counts = tests["counts"]
    assert counts["failed"] == counts["errors"] == 0 and counts["skipped"] >= 1  # GPU tests found, skipped on CPU
    summary1, summary2 = (out / "summary.md" for out in (out1, out2))
    assert "## Throughput" in summary1.read_text() and "## Tests" in summary1.read_text()
    text2 = summary2.read_text()
    assert "## End-to-end cost" in text2 and "## Activations" in text2 and "## Targets" in text2


@CPU_ONLY
def test_rehearsal_throughput_runs_each_lever_and_the_accumulated_step(rehearsal):
    """all-accum, base and all at both micro-batch sizes; each lever alone at the first."""
    runs = {run["name"]: run for run in _part(rehearsal["outs"][0], "throughput")["runs"]}
    assert list(runs) == ["all-accum", "base", "all", "swiglu", "rope", "ce", "adam"]
    levers = {"swiglu": "bias_swiglu_fusion", "rope": "rope_fusion", "ce": "cross_entropy_fusion"}
    for name, run in runs.items():
        assert run["status"] == "ok", run
        settings = run["payload"]["settings"]
        sizes = [2, 4] if name in ("all-accum", "base", "all") else [2]
        assert settings["micro_batch_size"] == sizes and settings["patch_sizes"] == [1, 4]
        assert settings["num_microbatches"] == (8 if name == "all-accum" else 1)
        on = {"swiglu", "rope", "ce", "adam"} if name in ("all", "all-accum") else {name}
        for lever, key in levers.items():
            assert settings[key] is (lever in on), (name, key)
        assert settings["torch_adam_impl"] == ("fused" if "adam" in on else "foreach")
        rows = run["payload"]["results"]
        assert [(r["micro_batch_size"], r["patch_size"]) for r in rows] == [(b, k) for b in sizes for k in (1, 4)]
        assert all("error" not in r and r["tokens_per_s"] > 0 for r in rows)


@CPU_ONLY
def test_rehearsal_cost_compares_two_stages_with_token_only_on_the_same_tokens(rehearsal):
    cost = _part(rehearsal["outs"][1], "cost")
    runs = {run["name"]: run for run in cost["runs"]}
    assert list(runs) == ["two-stage", "token-only"]
    both, only = runs["two-stage"]["summary"], runs["token-only"]["summary"]
    assert {k: v["iterations"] for k, v in both["stages"].items()} == {"patch": 4, "token": 2}  # λ = 2/3 of 6 steps
    assert {k: v["iterations"] for k, v in only["stages"].items()} == {"token": 6}
    assert both["total_tokens"] == only["total_tokens"] == cost["tokens_per_run"] == 6 * 16 * 64
    for flag in ("--bias-swiglu-fusion", "--rope-fusion", "--cross-entropy-fusion", "--torch-adam-impl fused"):
        assert all(flag in run["command"] for run in runs.values())  # the levers reach the trainer
    assert "--micro-batch-size 2 --global-batch-size 16" in runs["two-stage"]["command"]
    # every log window parsed: one per step at --cost-log-interval 1
    assert [w["stage"] for w in runs["two-stage"]["windows"]] == ["patch"] * 4 + ["token"] * 2
    assert [w["stage"] for w in runs["token-only"]["windows"]] == ["token"] * 6
    figures = cost["figures"]
    assert figures["theory"] == pytest.approx(0.5)
    wall = sum(s["seconds"] for s in both["stages"].values()) / sum(s["seconds"] for s in only["stages"].values())
    assert figures["wall_ratio"] == pytest.approx(wall)
    for key in ("steady_ratio", "trainer_ratio", "trainer_ratio_vs_token_only"):
        assert figures[key] > 0 and math.isfinite(figures[key]), key


@CPU_ONLY
def test_rehearsal_activations_measure_every_run(rehearsal):
    runs = {run["name"]: run for run in _part(rehearsal["outs"][1], "activations")["runs"]}
    assert list(runs) == ["370m", "370m-swiglu", "370m-all"]  # 6.7b and 13b only when named
    for name, run in runs.items():
        assert run["status"] == "ok", run
        records = run["payload"]["layer_activations"]
        modes = {r["recompute"] for r in records}
        assert modes == ({"none"} if name in ("370m-swiglu", "370m-all") else {"none", "selective", "full"})
        assert all("error" not in r and r["layers_built"] == 4 for r in records)
    assert runs["370m-all"]["payload"]["settings"]["cross_entropy_fusion"] is True


@CPU_ONLY
def test_what_travels_fits_the_device_limit(rehearsal):
    """The GPU data as --prepare sizes them (2 bytes per token, checked on the rehearsal's data),
    the working tree, and the wheel where it is downloaded: under 64 MiB."""
    manifest = json.loads((rehearsal["root"] / "data" / "manifest.json").read_text())
    bin_bytes = (rehearsal["root"] / "data" / f"{manifest['prefix']}.bin").stat().st_size
    assert bin_bytes == 2 * manifest["tokens"]
    # one pass over its documents covers both stages of the rehearsal's cost runs (the trainer's λ cut)
    lengths = campaign_corpus.indexed_lengths(rehearsal["root"] / "data" / manifest["prefix"])
    assert len(lengths) == manifest["documents"] and campaign_corpus.shortfall(lengths, manifest["plan"]) <= 1
    opts = gpu_campaign.parse_options(["--prepare", "--corpus", "c.jsonl.xz", "--data-dir", "d"])  # GPU sizes
    plan = gpu_campaign.cost_plan(opts)
    tokens = plan["steps"] * plan["global_batch"] * plan["seq_length"]
    assert tokens == 45 * 128 * 2048  # part c's 45 steps of 128 x 2048 tokens
    # what --prepare keeps: a run's tokens with 5% to spare, a stage's share one document off λ, the
    # first cut's overshoot (the 32k tokenizer's 3.9 bytes per token against the 4.2 guessed): within
    # 20% more; index and tokenizer under 2 MiB
    data = 2 * tokens * 1.2 + 2 * MIB
    tree = campaign_carry.tree_bytes(REPO_ROOT)
    assert tree is not None, "git sizes the working tree that travels"
    wheels = list((REPO_ROOT / ".whl").glob("megatron_core-*-cp312-*.whl"))
    wheel = sum(p.stat().st_size for p in wheels) if wheels else 3 * MIB  # not downloaded: the 2.6 MB it was
    assert tree + data + wheel < 64 * MIB, (tree, data, wheel)
    prepared = REPO_ROOT / DATA_DIR
    if (prepared / "manifest.json").exists() and not json.loads((prepared / "manifest.json").read_text())["cpu"]:
        real = campaign_carry.folder_bytes(prepared)  # prepared here for the GPU: measure it too
        assert tree + real + wheel < 64 * MIB
        assert real < data


@CPU_ONLY
def test_a_part_past_its_budget_stops_its_run_and_still_writes_the_summary(tmp_path):
    out = tmp_path / "out"
    done = _run(
        [
            sys.executable,
            CAMPAIGN,
            "--cpu",
            "--parts",
            "throughput",
            "--throughput-runs",
            "base,adam",
            "--throughput-budget-s",
            "2",
            "--out",
            str(out),
        ]
    )  # less than its imports take
    assert done.returncode == 1
    runs = _part(out, "throughput")["runs"]
    assert [r["status"] for r in runs] == ["timed out after 2 s", "skipped (no time left)"]
    assert runs[0]["seconds"] < 30 and runs[0]["partial_rows"] == []  # stopped, not waited for
    assert "| throughput | base | timed out after 2 s |" in (out / "summary.md").read_text()


@pytest.mark.parametrize("unit", ["TFLOP/s/GPU", "TFLOP/s"])  # the trainer's line now, and before it said per GPU
def test_partial_output_is_read_back(unit):
    rows = campaign_logs.throughput_partial_rows(
        "  recompute=none b=16 K=4: 285.4 ms, 459,327 tok/s, 301.1 TFLOP/s, loss 1 -> 2\n"
    )
    assert rows[0]["tokens_per_s"] == 459327 and rows[0]["patch_size"] == 4 and rows[0]["partial"]
    line = (
        "12:00:00 [rank 0] [token] iter 10/20 (global 50) | tokens 5.243M | loss 5.1 | lr 3.0e-04 | grad norm 0.5 "
        f"| skipped 0 | 117,195 tok/s | 307.3 {unit} MFU 38.9% | peak mem 26.89 GiB\n"
    )
    (window,) = campaign_logs.trainer_windows(line)
    assert window == {
        "stage": "token",
        "iteration": 10,
        "stage_iters": 20,
        "tokens_per_s": 117195.0,
        "tflops_per_gpu": 307.3,
        "mfu": pytest.approx(0.389),
        "peak_memory_gib": 26.89,
    }


def test_a_stopped_pytest_run_is_counted_from_its_log():
    log = (
        "tests/unit/test_rope.py::test_fused_rope_on_gpu PASSED                   [ 14%]\n"
        "tests/unit/test_loss.py::test_a PASSED [ 28%]\n"
        "tests/training/test_trainer.py::test_fused_torch_adam_resumes_on_gpu FAILED [ 42%]\n"
        "tests/unit/test_model.py::test_b[cpu] SKIPPED (no GPU) [ 57%]\n"
    )
    counts = campaign_logs.pytest_log_counts(log)
    assert counts == {
        "passed": 2,
        "failed": 1,
        "errors": 0,
        "skipped": 1,
        "failures": ["tests/training/test_trainer.py::test_fused_torch_adam_resumes_on_gpu"],
        "partial": True,
    }
    assert campaign_logs.pytest_log_counts("collecting ...\n") is None


def test_the_wall_target_is_judged_at_the_steady_rates():
    """The sums of step times hold each stage's one-off compiles (two sets in the two-stage run):
    the target takes the steady ratio and shows the sums' ratio beside it."""
    figures = sys.modules["campaign_figures"]
    parts = {"cost": {"figures": {"theory": 0.5, "wall_ratio": 0.58, "steady_ratio": 0.512}}}
    value, note = figures.target_values(parts, "all-accum")["wall_ratio"]
    assert value == 0.512 and note == "theory 0.500; sums of all step times 0.580"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--parts", "tests,bogus", "--out", "o"], "'tests,bogus': use a comma list of"),
        (["--parts", "nope", "--out", "o"], "activations (see benchmarks/gpu_campaign.py --help)"),
        (["--parts", "cost", "--out", "o"], "the cost part needs --data-dir"),
        (["--parts", "cost", "--out", "o", "--data-dir", "nowhere"], "no manifest.json"),
        (["--out", "o", "--cost-steps", "10"], "--cost-steps 10: use a multiple of 3"),
        (["--parts", "tests"], "--out DIR is required"),
        (["--prepare", "--corpus", "c.jsonl"], "--prepare needs --data-dir"),
    ],
)
def test_bad_flags_give_one_line_and_exit_2(argv, message, capsys):
    assert gpu_campaign.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_unusable_corpus_or_data_dir_is_one_line(tmp_path, capsys):
    """--prepare's checks of the corpus and the data folder, and a manifest that is not JSON: one
    ``error:`` line each, exit code 2, nothing created."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{")
    cases = [
        (["--prepare", "--corpus", str(tmp_path / "none.jsonl"), "--data-dir", str(tmp_path / "d")], "no such file"),
        (["--prepare", "--corpus", str(tmp_path / "none.jsonl"), "--data-dir", str(bad)], "is not JSON"),
        (["--parts", "cost", "--out", str(tmp_path / "o"), "--data-dir", str(bad)], "is not JSON"),
    ]
    for argv, message in cases:
        assert gpu_campaign.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]
