"""The GPU campaign (issue 16) rehearsed on CPU: the main device command of benchmarks/README.md,
run as written there with ``--cpu`` appended (tiny preset, few steps), on a corpus prepared by the
campaign's own ``--prepare``; the cost part's fallback without levers; the size of what the device
call carries. (The time limits, the cudnn canary's cap, the fallback without the data loader's
workers, the rerun line, the figures and the flag errors, without a rehearsal:
test_gpu_campaign_summary.py.) Speed is never asserted."""

import json
import math
import os
import re
import subprocess
import sys

import pytest

from tests.benchmarks.campaign_helpers import (
    ALL_PARTS,
    CAMPAIGN,
    CPU_ONLY,
    DATA_DIR,
    MIB,
    campaign_carry,
    campaign_corpus,
    campaign_options,
    campaign_parts,
    device_call_settings,
    device_command,
    gpu_campaign,
    read_part,
    rehearsal_argv,
    run_campaign,
)
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow  # whole-pipeline subprocess runs: scheduled first (tests/conftest.py)

# makes the cudnn throughput run and the cost part's two-stage run with levers exit with an error at
# their start, as a kernel's failure or a lever's failed compile would: a sitecustomize.py on the
# campaign's PYTHONPATH (its runs inherit it); nothing in the campaign knows of it
FAILING_LEVERS = """import os, sys
def fail(why):
    sys.stderr.write("error: injected by test_gpu_campaign.py: " + why + "\\n")
    sys.stderr.flush()
    os._exit(1)
if sys.argv[:1] and sys.argv[0].endswith("pretrain_patch_gpt.py") and "both" in sys.argv:
    if "--bias-swiglu-fusion" in sys.argv:
        fail("the fused SwiGLU failed to compile")
if sys.argv[:1] and sys.argv[0].endswith("throughput.py") and "cudnn" in sys.argv:
    fail("cuDNN's attention failed")
"""


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """Prepare the bundled corpus, then the main device command beside the cost part alone with the
    levers made to fail (two processes for the two cores)."""
    root = tmp_path_factory.mktemp("campaign")
    _, args = device_command()
    data = root / "data"
    prepare = [sys.executable, CAMPAIGN, "--prepare", "--cpu", "--corpus", "examples/data/tiny.jsonl.xz"]
    prepared = run_campaign([*prepare, "--data-dir", str(data)])
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    hook = root / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAILING_LEVERS)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook), env.get("PYTHONPATH")]))
    fallback_args = ["--parts", "throughput,cost", "--throughput-runs", "cudnn,base", "--micro-batch-sizes", "2"]
    fallback_args += ["--data-dir", DATA_DIR, "--out", "$OUT"]
    with open(root / "fallback.txt", "w") as printed:
        fallback = subprocess.Popen(
            rehearsal_argv(fallback_args, root / "fallback", data),
            cwd=REPO_ROOT,
            env=env,
            stdout=printed,
            stderr=subprocess.STDOUT,
        )
        try:
            main = run_campaign(rehearsal_argv(args, root / "out", data))
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
    # pytest runs them in this order: the trainer's (fused Adam) and the benchmark scripts' first, the
    # files whose tests compile kernels last, so that a run cut at the part's limit loses those
    first, compiling = campaign_options.GPU_TEST_FILES[:2], campaign_options.GPU_TEST_FILES[-2:]
    assert first == ("tests/training/test_trainer.py", "tests/benchmarks/test_benchmarks_on_gpu.py")
    assert compiling == ("tests/unit/test_rope.py", "tests/unit/test_fused_cross_entropy.py")


@CPU_ONLY
def test_rehearsal_runs_every_part_and_writes_its_outputs(rehearsal):
    assert rehearsal["code"] == 0, rehearsal["output"][-3000:]
    out = rehearsal["out"]
    files = {"summary.md", "campaign.log", "tests.json", "throughput.json", "cost.json", "activations.json"}
    assert {p.name for p in out.iterdir()} == files and len(files) <= 8  # the device returns at most 8 files
    tests = read_part(out, "tests")
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
    runs = {run["name"]: run for run in read_part(rehearsal["out"], "throughput")["runs"]}
    assert list(runs) == ["cudnn", "all-accum", "base", "all", "swiglu", "rope", "ce", "adam"]
    levers = {"swiglu": "bias_swiglu_fusion", "rope": "rope_fusion", "ce": "cross_entropy_fusion"}
    for name, run in runs.items():
        assert run["status"] == "ok", run
        settings = run["payload"]["settings"]
        sizes = [2, 4] if name in ("all-accum", "base", "all") else [2]
        assert settings["micro_batch_size"] == sizes and settings["patch_sizes"] == [1, 4]
        assert settings["num_microbatches"] == (8 if name == "all-accum" else 1)
        on = {"cudnn", "swiglu", "rope", "ce", "adam"} if name in ("all", "all-accum") else {name}
        for lever, key in levers.items():
            assert settings[key] is (lever in on), (name, key)
        assert settings["sdpa_backend"] == ("cudnn" if "cudnn" in on else "auto"), name
        assert settings["transformer_impl"] == "local", name  # never TE, where it imports
        assert settings["torch_adam_impl"] == ("fused" if "adam" in on else "foreach")
        rows = run["payload"]["results"]
        assert [(r["micro_batch_size"], r["patch_size"]) for r in rows] == [(b, k) for b in sizes for k in (1, 4)]
        assert all("error" not in r and r["tokens_per_s"] > 0 for r in rows)
        assert all(r["step_s_min"] <= r["step_s_median"] <= r["step_s_max"] for r in rows)
        profiled = [(r["micro_batch_size"], r["patch_size"]) for r in rows if r.get("kernel_profile")]
        assert profiled == ([(2, 1), (2, 4)] if name in ("base", "all") else []), name  # where the time goes
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
    cost = read_part(rehearsal["out"], "cost")
    runs = {run["name"]: run for run in cost["runs"]}
    assert list(runs) == ["two-stage", "token-only"]
    both, only = runs["two-stage"]["summary"], runs["token-only"]["summary"]
    assert {k: v["iterations"] for k, v in both["stages"].items()} == {"patch": 4, "token": 2}  # λ = 2/3 of 6 steps
    assert {k: v["iterations"] for k, v in only["stages"].items()} == {"token": 6}
    assert both["total_tokens"] == only["total_tokens"] == cost["tokens_per_run"] == 6 * 16 * 64
    levers = ("--sdpa-backend cudnn", "--bias-swiglu-fusion", "--rope-fusion", "--cross-entropy-fusion")
    for flag in (*levers, "--torch-adam-impl fused", "--num-workers 2", "--transformer-impl local"):
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
    runs = {run["name"]: run for run in read_part(rehearsal["out"], "activations")["runs"]}
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
    cost = read_part(out, "cost")
    runs = cost["runs"]
    assert [(r["name"], r["role"], r["status"]) for r in runs] == [
        ("two-stage", "two-stage", "failed (exit 1)"),  # without cudnn, which failed alone before
        ("two-stage (no levers)", "two-stage", "ok"),
        ("token-only (no levers)", "token-only", "ok"),
    ]
    assert "--bias-swiglu-fusion" in runs[0]["command"] and runs[0]["levers"] != "none"
    assert "cudnn" not in runs[0]["command"] and list(cost["dropped_levers"]) == ["cudnn"]
    for run in runs[1:]:
        assert run["levers"] == "none" and "fusion" not in run["command"] and "fused" not in run["command"]
        assert "--num-workers 0" in run["command"]  # and without the data loader's workers
    fallback = cost["fallback"]
    assert fallback["cost_levers"] == ["all"] and fallback["rerun_with"] == "none"
    assert fallback["changed"] == "--cost-levers none and --num-workers 0"
    without_cudnn = campaign_parts.lever_flags(["all"], without={"cudnn"})
    assert fallback["flags"] == without_cudnn and cost["levers"] == []
    assert fallback["reason"].startswith("the two-stage run failed (exit 1) after ")
    assert fallback["reason"].endswith("error: injected by test_gpu_campaign.py: the fused SwiGLU failed to compile")
    assert {k: v["iterations"] for k, v in runs[1]["summary"]["stages"].items()} == {"patch": 4, "token": 2}
    for key in ("wall_ratio", "steady_ratio", "trainer_ratio"):
        assert cost["figures"][key] > 0, key
    text = (out / "summary.md").read_text()
    assert f"Fallback: with --cost-levers all ({' '.join(without_cudnn)}" in text
    assert "injected by" in text
    assert "## Targets" in text and "## Not finished" not in text  # a failed run is not rerun


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
        assert run_campaign(["git", "check-ignore", "-q", "--no-index", f"{path}/x"]).returncode == 0, path
    assert tree + data + wheel < 64 * MIB, (tree, data, wheel)
    prepared = REPO_ROOT / DATA_DIR
    if (prepared / "manifest.json").exists() and not json.loads((prepared / "manifest.json").read_text())["cpu"]:
        real = campaign_carry.folder_bytes(prepared)  # prepared here for the GPU: measure it too
        carried = sum(campaign_carry.folder_bytes(REPO_ROOT / path) for path in carry)
        assert real < data and tree + carried < 64 * MIB
        lines = campaign_carry.carry_lines(REPO_ROOT, prepared)
        assert not any(line.startswith("error") for line in lines), lines


@CPU_ONLY
def test_a_lever_that_fails_alone_is_left_out_of_the_later_runs(rehearsal):
    """cudnn runs first and alone (made to fail, above): the part records why, the summary says so,
    and base still runs; the cost part's runs leave it out (test above)."""
    throughput = read_part(rehearsal["fallback_out"], "throughput")
    runs = {run["name"]: run for run in throughput["runs"]}
    assert [(name, run["status"]) for name, run in runs.items()] == [("cudnn", "failed (exit 1)"), ("base", "ok")]
    why = throughput["dropped_levers"]["cudnn"]
    assert why.startswith("the cudnn run failed (exit 1): ")
    assert why.endswith("injected by test_gpu_campaign.py: cuDNN's attention failed")
    text = (rehearsal["fallback_out"] / "summary.md").read_text()
    assert text.count("Left out after its own run failed: cudnn (the cudnn run failed (exit 1)") == 2  # both parts
