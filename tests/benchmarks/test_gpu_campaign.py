"""The GPU campaign (issue 16) rehearsed on CPU: the main device command of benchmarks/README.md,
run as written there with ``--cpu`` appended (tiny preset, few steps), on a corpus prepared by the
campaign's own ``--prepare``; the cost part's fallback without levers; the size of what the device
call carries; the time limits, the rerun line and the flag errors. Speed is never asserted."""

import importlib.util
import json
import math
import os
import re
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
ALL_PARTS = "tests,throughput,cost,activations"
# makes the cost part's two-stage run with levers exit with an error at its start, as a lever's failed
# compile would: a sitecustomize.py on the campaign's PYTHONPATH (its runs inherit it); nothing in the
# campaign knows of it
FAILING_LEVERS = """import os, sys
if sys.argv[:1] and sys.argv[0].endswith("pretrain_patch_gpt.py") and "both" in sys.argv:
    if "--bias-swiglu-fusion" in sys.argv:
        sys.stderr.write("error: injected by test_gpu_campaign.py: the fused SwiGLU failed to compile\\n")
        sys.stderr.flush()
        os._exit(1)
"""


def _load():
    spec = importlib.util.spec_from_file_location("benchmarks_gpu_campaign", REPO_ROOT / CAMPAIGN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_campaign = _load()
# imported by gpu_campaign from benchmarks/
campaign_carry, campaign_corpus, campaign_logs = (sys.modules[f"campaign_{m}"] for m in ("carry", "corpus", "logs"))
campaign_options, campaign_parts, campaign_summary = (
    sys.modules[f"campaign_{m}"] for m in ("options", "parts", "summary")
)


def device_command():
    """The README's one main device command: ``(install prefix, campaign arguments)``."""
    lines = [
        line.strip()
        for line in README.read_text().splitlines()
        if line.strip().startswith("python3 -m pip install") and f"{CAMPAIGN} --parts" in line
    ]
    assert len(lines) == 1, "benchmarks/README.md should hold the campaign's one main device command"
    prefix, found, campaign = lines[0].partition(f"; python3 {CAMPAIGN} ")
    assert found, lines[0]
    return prefix, shlex.split(campaign)


def device_call_settings():
    """The main call's ``kind``, ``carry`` and ``timeout_s`` as the README gives them before its command."""
    text = README.read_text()
    intro = text[text.index("The main call, all four parts") : text.index(f"{CAMPAIGN} --parts {ALL_PARTS}")]
    found = re.search(r"`kind`: `([\w-]+)`.*?`carry`:\s*(.*?);\s*`timeout_s`\s+(\d+)", intro, re.S)
    assert found, intro
    return found[1], re.findall(r"`([^`]+)`", found[2]), int(found[3])


def _rehearsal_argv(args, out, data_dir):
    """The device command's arguments with ``--cpu`` and, since a shared CPU can be far slower than
    the GPU its time limits are sized for, those limits scaled up (the budget test keeps them)."""
    swap = {"$OUT": str(out), DATA_DIR: str(data_dir)}
    return [sys.executable, CAMPAIGN, *[swap.get(a, a) for a in args], "--cpu", "--time-scale", "10"]


def _run(argv, **kw):
    return subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800, check=False, **kw)


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """Prepare the bundled corpus, then the main device command beside the cost part alone with the
    levers made to fail (two processes for the two cores)."""
    root = tmp_path_factory.mktemp("campaign")
    _, args = device_command()
    data = root / "data"
    prepare = [sys.executable, CAMPAIGN, "--prepare", "--cpu", "--corpus", "examples/data/tiny.jsonl.xz"]
    prepared = _run([*prepare, "--data-dir", str(data)])
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    hook = root / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAILING_LEVERS)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook), env.get("PYTHONPATH")]))
    fallback_args = ["--parts", "cost", "--data-dir", DATA_DIR, "--out", "$OUT"]
    with open(root / "fallback.txt", "w") as printed:
        fallback = subprocess.Popen(
            _rehearsal_argv(fallback_args, root / "fallback", data),
            cwd=REPO_ROOT,
            env=env,
            stdout=printed,
            stderr=subprocess.STDOUT,
        )
        try:
            main = _run(_rehearsal_argv(args, root / "out", data))
            fallback.wait(timeout=1800)
        finally:
            if fallback.poll() is None:
                fallback.kill()
    return {
        "root": root,
        "out": root / "out",
        "fallback_out": root / "fallback",
        "prepare": prepared.stdout,
        "code": main.returncode,
        "output": main.stdout + main.stderr,
        "fallback_code": fallback.returncode,
        "fallback_output": (root / "fallback.txt").read_text(),
    }


def _part(out, name):
    return json.loads((out / f"{name}.json").read_text())


def test_device_command_installs_the_wheel_and_runs_every_part_in_one_call():
    prefix, args = device_command()
    # the wheel from the carried .whl onto PYTHONPATH, or stop
    assert "--no-index" in prefix and "export PYTHONPATH=/tmp/site" in prefix and "|| exit" in prefix
    (pattern,) = [word for word in prefix.split() if word.startswith(".whl/")]
    assert pattern.startswith(".whl/megatron_core-") and pattern.endswith(".whl")
    if (REPO_ROOT / ".whl").is_dir():  # downloaded here: the pattern names it, and only it
        wheels = sorted(REPO_ROOT.glob(pattern))
        assert len(wheels) == 1 and "-cp312-" in wheels[0].name and "x86_64" in wheels[0].name, wheels
    assert args[args.index("--parts") + 1] == ALL_PARTS  # every part, in the campaign's order
    assert args[args.index("--out") + 1] == "$OUT" and args[args.index("--data-dir") + 1] == DATA_DIR
    deadline = float(args[args.index("--deadline-s") + 1])
    # the parts' reserved budgets fill the deadline less the 10 s kept for the summary, no more
    assert sum(campaign_options.BUDGETS.values()) == deadline - 10
    kind, carry, timeout_s = device_call_settings()
    assert kind == "nvidia-h200" and carry == [".whl", DATA_DIR]
    # the install and imports (~10 s) before the clock, 5 s to stop after, within the device's 600 s per
    # command; with the slowest start (2 minutes) a minute of the 15 is left
    assert deadline + 15 + 10 <= timeout_s <= 600
    assert 120 + timeout_s <= 15 * 60 - 60


def test_the_gpu_tests_default_is_every_file_with_a_gpu_mark():
    """--test-paths names exactly the test files that hold GPU-marked tests, so a new GPU test is
    never left out, and pytest collects nothing else."""
    mark = "pytest.mark." + "gpu"  # spelled apart, so that this file is not among them
    files = {
        str(path.relative_to(REPO_ROOT))
        for path in (REPO_ROOT / "tests").rglob("*.py")
        if mark in path.read_text(errors="replace")
    }
    assert files and set(campaign_options.GPU_TEST_FILES) == files
    assert len(campaign_options.GPU_TEST_FILES) == len(files)  # no file twice
    opts = gpu_campaign.parse_options(["--parts", "tests", "--out", "o"])
    assert opts.test_paths.split(",") == list(campaign_options.GPU_TEST_FILES)


@CPU_ONLY
def test_rehearsal_runs_every_part_and_writes_its_outputs(rehearsal):
    assert rehearsal["code"] == 0, rehearsal["output"][-3000:]
    out = rehearsal["out"]
    files = {"summary.md", "campaign.log", "tests.json", "throughput.json", "cost.json", "activations.json"}
    assert {p.name for p in out.iterdir()} == files and len(files) <= 8  # the device returns at most 8 files
    tests = _part(out, "tests")
    command = tests["runs"][0]["command"].split()
    assert tests["runs"][0]["status"] == "ok" and command[1:4] == ["-m", "pytest", "-m"]
    assert "--continue-on-collection-errors" in command and "missing_paths" not in tests
    assert command[-len(campaign_options.GPU_TEST_FILES) :] == list(campaign_options.GPU_TEST_FILES)
    counts = tests["counts"]
    # every GPU test found, and skipped on CPU; nothing else collected into the run
    assert counts["failed"] == counts["errors"] == counts["passed"] == 0 and counts["skipped"] >= 5
    log = (out / "campaign.log").read_text()
    assert [line for line in log.splitlines() if line.startswith("===== part ")] == [
        f"===== part {part}" for part in ALL_PARTS.split(",")
    ]
    text = (out / "summary.md").read_text()
    for heading in ("## Tests", "## Throughput", "## End-to-end cost", "## Activations", "## Targets"):
        assert heading in text, heading
    assert "## Not finished" not in text and "Fallback" not in text


@CPU_ONLY
def test_rehearsal_throughput_runs_each_lever_and_the_accumulated_step(rehearsal):
    """all-accum, base and all at both micro-batch sizes; each lever alone at the first."""
    runs = {run["name"]: run for run in _part(rehearsal["out"], "throughput")["runs"]}
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
        assert all(r["step_s_min"] <= r["step_s_median"] <= r["step_s_max"] for r in rows)
    # the summary gives each row's min-max beside its median, and each lever's gain over base with its noise
    text = (rehearsal["out"] / "summary.md").read_text()
    assert "| step ms (median) | step ms (min-max) | vs base |" in text
    row = next(r for r in runs["rope"]["payload"]["results"] if r["patch_size"] == 4)
    spread = f"{1e3 * row['step_s_min']:.1f}-{1e3 * row['step_s_max']:.1f}"
    assert re.search(
        rf"\| rope \| 1 \| 2 \| 4 \| [\d.]+ \| {re.escape(spread)} \| [+-][\d.]+% \(noise [\d.]+%\) \|", text
    )


@CPU_ONLY
def test_rehearsal_cost_compares_two_stages_with_token_only_on_the_same_tokens(rehearsal):
    cost = _part(rehearsal["out"], "cost")
    runs = {run["name"]: run for run in cost["runs"]}
    assert list(runs) == ["two-stage", "token-only"]
    both, only = runs["two-stage"]["summary"], runs["token-only"]["summary"]
    assert {k: v["iterations"] for k, v in both["stages"].items()} == {"patch": 4, "token": 2}  # λ = 2/3 of 6 steps
    assert {k: v["iterations"] for k, v in only["stages"].items()} == {"token": 6}
    assert both["total_tokens"] == only["total_tokens"] == cost["tokens_per_run"] == 6 * 16 * 64
    for flag in ("--bias-swiglu-fusion", "--rope-fusion", "--cross-entropy-fusion", "--torch-adam-impl fused"):
        assert all(flag in run["command"] for run in runs.values())  # the levers reach the trainer
    assert "fallback" not in cost and [run["role"] for run in runs.values()] == list(runs)
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
    runs = {run["name"]: run for run in _part(rehearsal["out"], "activations")["runs"]}
    assert list(runs) == ["370m", "370m-swiglu", "370m-all"]  # 6.7b and 13b only when named
    for name, run in runs.items():
        assert run["status"] == "ok", run
        records = run["payload"]["layer_activations"]
        modes = {r["recompute"] for r in records}
        assert modes == ({"none"} if name in ("370m-swiglu", "370m-all") else {"none", "selective", "full"})
        assert all("error" not in r and r["layers_built"] == 4 for r in records)
    assert runs["370m-all"]["payload"]["settings"]["cross_entropy_fusion"] is True


@CPU_ONLY
def test_the_cost_part_falls_back_to_no_levers_when_the_two_stage_run_fails(rehearsal):
    """The two-stage run with levers exits with an error at its start (made to, above): token-only
    with levers is not run, both runs run again with --cost-levers none, and the part's JSON and the
    summary say which levers and why; the figures come from the runs without levers."""
    assert rehearsal["fallback_code"] == 1, rehearsal["fallback_output"][-3000:]  # a run failed
    out = rehearsal["fallback_out"]
    cost = _part(out, "cost")
    runs = cost["runs"]
    assert [(r["name"], r["role"], r["status"]) for r in runs] == [
        ("two-stage", "two-stage", "failed (exit 1)"),
        ("two-stage (no levers)", "two-stage", "ok"),
        ("token-only (no levers)", "token-only", "ok"),
    ]
    assert "--bias-swiglu-fusion" in runs[0]["command"] and runs[0]["levers"] != "none"
    for run in runs[1:]:
        assert run["levers"] == "none" and "fusion" not in run["command"] and "fused" not in run["command"]
    fallback = cost["fallback"]
    assert fallback["cost_levers"] == ["all"] and fallback["rerun_with"] == "none"
    assert fallback["flags"] == campaign_options.ALL_LEVERS and cost["levers"] == []
    assert fallback["reason"].startswith("the two-stage run failed (exit 1) after ")
    assert fallback["reason"].endswith("error: injected by test_gpu_campaign.py: the fused SwiGLU failed to compile")
    assert {k: v["iterations"] for k, v in runs[1]["summary"]["stages"].items()} == {"patch": 4, "token": 2}
    for key in ("wall_ratio", "steady_ratio", "trainer_ratio"):
        assert cost["figures"][key] > 0, key
    text = (out / "summary.md").read_text()
    assert "Fallback: with --cost-levers all (--bias-swiglu-fusion" in text and "injected by" in text
    assert "## Targets" in text and "## Not finished" not in text  # a failed run is not rerun


def test_a_run_fails_over_to_no_levers_only_when_it_failed_with_levers():
    failure = campaign_parts.lever_failure
    levers = campaign_parts.lever_flags(["all"])
    assert levers == campaign_options.ALL_LEVERS and campaign_parts.lever_flags(["none"]) == []
    assert campaign_parts.lever_flags(["rope", "adam"]) == ["--rope-fusion", "--torch-adam-impl", "fused"]
    assert failure({"status": "failed (exit 1)"}, levers) and failure({"status": "failed (exit -11)"}, levers)
    for status in ("ok", "timed out after 40 s", "skipped (no time left)", "stopped (SIGTERM)"):
        assert not failure({"status": status}, levers), status
    assert not failure({"status": "failed (exit 1)"}, [])  # without levers there is nothing to fall back from


@CPU_ONLY
def test_what_travels_fits_the_device_limit(rehearsal):
    """What the one device call carries: the working tree and the README's carry list, the wheel
    where it is downloaded and the GPU data as --prepare sizes them (2 bytes per token, checked on
    the rehearsal's data; measured too where prepared here): under 64 MiB."""
    _, carry, _ = device_call_settings()
    assert carry == [".whl", DATA_DIR]
    data_dir = rehearsal["root"] / "data"
    manifest = json.loads((data_dir / "manifest.json").read_text())
    bin_bytes = (data_dir / f"{manifest['prefix']}.bin").stat().st_size
    assert bin_bytes == 2 * manifest["tokens"]
    # one pass over its documents covers both stages of the rehearsal's cost runs (the trainer's λ cut)
    lengths = campaign_corpus.indexed_lengths(data_dir / manifest["prefix"])
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
    # the carried folders are git-ignored, so the tree does not count them twice
    for path in carry:
        assert _run(["git", "check-ignore", "-q", "--no-index", f"{path}/x"]).returncode == 0, path
    assert tree + data + wheel < 64 * MIB, (tree, data, wheel)
    prepared = REPO_ROOT / DATA_DIR
    if (prepared / "manifest.json").exists() and not json.loads((prepared / "manifest.json").read_text())["cpu"]:
        real = campaign_carry.folder_bytes(prepared)  # prepared here for the GPU: measure it too
        carried = sum(campaign_carry.folder_bytes(REPO_ROOT / path) for path in carry)
        assert real < data and tree + carried < 64 * MIB
        lines = campaign_carry.carry_lines(REPO_ROOT, prepared)
        assert not any(line.startswith("error") for line in lines), lines


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
    text = (out / "summary.md").read_text()
    assert "| throughput | base | timed out after 2 s |" in text
    # what did not finish, and the flags that run just that in a second call
    assert "## Not finished (timed out, skipped or stopped)" in text and "throughput: base, adam." in text
    (line,) = [line for line in text.splitlines() if line.startswith("`python3 benchmarks/gpu_campaign.py ")]
    args = shlex.split(line.strip("`"))[2:]
    assert args[-4:] == ["--out", "$OUT", "--deadline-s", "N"]
    assert args[args.index("--parts") + 1 :][:4] == ["throughput", "--throughput-runs", "base,adam", "--out"]
    swap = {"$OUT": str(tmp_path / "again"), "N": "120"}
    opts = gpu_campaign.parse_options([swap.get(a, a) for a in args])
    assert opts.parts == ["throughput"] and opts.throughput_runs == ["base", "adam"] and opts.deadline_s == 120
    assert opts.throughput_budget_s == 2 and opts.cpu  # the call's other flags kept


def test_the_rerun_line_names_just_what_did_not_finish():
    """Timed-out, skipped and stopped runs, and parts never begun, are rerun; failed runs are not; the
    cost part whole, by its runs' roles, with --cost-levers none after a fallback."""
    state = {
        "argv": ["--parts", ALL_PARTS, "--data-dir", ".campaign", "--out", "/o", "--deadline-s=560"],
        "plan": {
            "tests": ["pytest -m gpu"],
            "throughput": ["all-accum", "base", "rope", "ce"],
            "cost": ["two-stage", "token-only"],
            "activations": ["370m", "370m-all"],
        },
        "parts": {
            "tests": {"runs": [{"name": "pytest -m gpu", "status": "failed (exit 1)"}]},
            "throughput": {
                "runs": [
                    {"name": "all-accum", "status": "ok"},
                    {"name": "base", "status": "failed (exit 1)"},
                    {"name": "rope", "status": "timed out after 30 s"},
                    {"name": "ce", "status": "skipped (no time left)"},
                ]
            },
            "cost": {
                "fallback": {"cost_levers": ["all"]},
                "runs": [
                    {"name": "two-stage", "role": "two-stage", "status": "failed (exit 1)"},
                    {"name": "two-stage (no levers)", "role": "two-stage", "status": "ok"},
                    {"name": "token-only (no levers)", "role": "token-only", "status": "stopped (SIGTERM)"},
                ],
            },
        },
    }
    left = campaign_summary.unfinished(state)
    assert left == {"throughput": ["rope", "ce"], "cost": ["token-only"], "activations": ["370m", "370m-all"]}
    assert campaign_summary.rerun_argv(state, left) == [
        "--data-dir",
        ".campaign",
        "--parts",
        "throughput,cost,activations",
        "--throughput-runs",
        "rope,ce",
        "--activations-runs",
        "370m,370m-all",
        "--cost-levers",
        "none",
        "--out",
        "$OUT",
        "--deadline-s",
        "N",
    ]
    state["parts"]["cost"]["runs"][-1]["status"] = "ok"
    del state["plan"]["activations"], state["plan"]["throughput"]
    assert campaign_summary.unfinished(state) == {}


def test_the_throughput_table_judges_each_lever_against_the_noise():
    """min-max beside the median; vs base: the gain at the same b and K (not against a row of other
    micro-batches per step), with the larger of the two rows' spreads over base's median as noise."""

    def row(median, low, high, b=16, K=1):
        return {"micro_batch_size": b, "patch_size": K, "stage": "token", "tokens_per_s": 1.0, "tflops": 1.0}, dict(
            step_s_median=median, step_s_min=low, step_s_max=high, mfu=0.4, peak_memory_gib=40.0, ratio_vs_token=1.0
        )

    def run(name, rows, micro=1):
        return {"name": name, "num_microbatches": micro, "payload": {"results": [{**a, **b} for a, b in rows]}}

    part = {
        "runs": [
            run("all-accum", [row(2.0, 1.9, 2.1)], micro=8),
            run("base", [row(0.300, 0.298, 0.303)]),
            run("rope", [row(0.285, 0.284, 0.290)]),  # 5.3% faster, noise 6 ms / 300 ms = 2.0%
            run("adam", [row(0.299, 0.290, 0.301)]),  # 0.3% faster, noise 11 ms / 300 ms = 3.7%
        ]
    }
    gains = sys.modules["campaign_figures"].gain_vs_base(sys.modules["campaign_figures"].throughput_rows(part))
    assert set(gains) == {("rope", 16, 1), ("adam", 16, 1)}  # all-accum has 8 micro-batches per step
    assert gains[("rope", 16, 1)] == pytest.approx((0.300 / 0.285 - 1, 0.006 / 0.300))
    assert gains[("adam", 16, 1)] == pytest.approx((0.300 / 0.299 - 1, 0.011 / 0.300))
    lines = "\n".join(campaign_summary._throughput_lines(part))
    assert "| rope | 1 | 16 | 1 | 285.0 | 284.0-290.0 | +5.3% (noise 2.0%) |" in lines
    assert "| adam | 1 | 16 | 1 | 299.0 | 290.0-301.0 | +0.3% (noise 3.7%) |" in lines
    assert "| base | 1 | 16 | 1 | 300.0 | 298.0-303.0 |  |" in lines
    assert "A lever helps where its gain, at K=1 and at K=4, exceeds both its noise and 1%" in lines


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
