"""The GPU campaign's pieces without a rehearsal run: the time limits of a part and of the cudnn
canary, the rerun line of what did not finish, the lever and wall-time figures read from the runs'
output, the cost part's fallback (its runs stood in for by a shell script), and the one-line errors
of its flags, its data folder and a missing wheel."""

import shlex
import sys
import types

import pytest

from tests.benchmarks.campaign_helpers import (
    ALL_PARTS,
    CAMPAIGN,
    CPU_ONLY,
    README,
    campaign_carry,
    campaign_logs,
    campaign_options,
    campaign_parts,
    campaign_summary,
    gpu_campaign,
    read_part,
    run_campaign,
    stand_in_campaign,
    stand_in_python,
)

# a throughput run with cuDNN's attention hangs; every other run ends at once
HANGING_CUDNN = """case " $* " in
*" --sdpa-backend cudnn "*) echo "cuDNN attention: compiling"; exec sleep 120;;
esac
"""
# a run with data loader workers fails as a worker's crash would; every other run ends at once
FAILING_WORKERS = """case " $* " in
*" --num-workers 2 "*) echo "RuntimeError: DataLoader worker (pid 4242) is killed by signal: Bus error." >&2; exit 1;;
esac
"""


def test_a_run_fails_over_to_no_levers_only_when_it_failed_with_levers():
    failure = campaign_parts.lever_failure
    levers = campaign_parts.lever_flags(["all"])
    assert levers == campaign_options.ALL_LEVERS and campaign_parts.lever_flags(["none"]) == []
    assert campaign_parts.lever_flags(["rope", "adam"]) == ["--rope-fusion", "--torch-adam-impl", "fused"]
    assert failure({"status": "failed (exit 1)"}, levers) and failure({"status": "failed (exit -11)"}, levers)
    for status in ("ok", "timed out after 40 s", "skipped (no time left)", "stopped (SIGTERM)"):
        assert not failure({"status": status}, levers), status
    assert not failure({"status": "failed (exit 1)"}, [])  # without levers there is nothing to fall back from


def test_a_canary_that_hangs_is_a_failed_lever_and_leaves_the_mfu_runs_their_time(tmp_path, monkeypatch):
    """The cudnn run, first, is stopped at its own cap (90 s, x --time-scale above 1), not at the part's end,
    and counts as a failed lever: all-accum, base and the cost part run without it, and both parts'
    JSON and the summary say why."""
    for scale, cap in (("0.5", 90), ("2", 180)):  # a smaller window does not make the canary faster
        assert gpu_campaign.parse_options(["--parts", "tests", "--out", "o", "--time-scale", scale]).canary_s == cap
    stand_in_python(monkeypatch, tmp_path, HANGING_CUDNN)
    campaign = stand_in_campaign(tmp_path, ["--parts", "throughput,cost", "--throughput-runs", "cudnn,all-accum,base"])
    assert campaign.opts.canary_s == 90 and campaign.opts.throughput_budget_s == 230
    campaign.opts.canary_s = 1  # the test's own cap, so that it waits one second, not 90
    campaign_parts.part_throughput(campaign)
    campaign_parts.part_cost(campaign)
    campaign.save()
    runs = read_part(campaign.out, "throughput")["runs"]
    assert [(r["name"], r["status"]) for r in runs] == [
        ("cudnn", "failed (over its 1 s cap)"),
        ("all-accum", "ok"),
        ("base", "ok"),
    ]
    assert runs[0]["seconds"] < 10  # stopped at the cap: SIGTERM to its process group
    assert "--sdpa-backend" not in runs[1]["command"] and "--rope-fusion" in runs[1]["command"]
    why = "the cudnn run failed (over its 1 s cap): cuDNN attention: compiling"
    assert read_part(campaign.out, "throughput")["dropped_levers"] == {"cudnn": why}
    cost = read_part(campaign.out, "cost")
    assert cost["dropped_levers"] == {"cudnn": why} and [r["status"] for r in cost["runs"]] == ["ok", "ok"]
    assert not any("cudnn" in r["command"] for r in cost["runs"]) and "fallback" not in cost
    text = (campaign.out / "summary.md").read_text()
    assert text.count(f"Left out after its own run failed: cudnn ({why}).") == 2
    assert "## Not finished" not in text  # a failed canary is not rerun: it would hang again


@pytest.mark.parametrize("cost_levers", ["all", "none"])
def test_the_cost_fallback_also_drops_the_data_loader_workers(tmp_path, monkeypatch, cost_levers):
    """A two-stage run that fails in its data loader's workers, with or without levers: both runs again
    with no levers and --num-workers 0, which the part's JSON, the summary and the rerun line say."""
    stand_in_python(monkeypatch, tmp_path, FAILING_WORKERS)
    campaign = stand_in_campaign(tmp_path, ["--parts", "cost", "--cost-levers", cost_levers])
    campaign_parts.part_cost(campaign)
    campaign.save()
    cost = read_part(campaign.out, "cost")
    runs = cost["runs"]
    assert [(r["name"], r["status"]) for r in runs] == [
        ("two-stage", "failed (exit 1)"),
        ("two-stage (no levers)", "ok"),
        ("token-only (no levers)", "ok"),
    ]
    assert "--num-workers 2" in runs[0]["command"]
    assert all("--num-workers 0" in r["command"] and "fusion" not in r["command"] for r in runs[1:])
    fallback = cost["fallback"]
    assert fallback["changed"] == "--cost-levers none and --num-workers 0" and fallback["rerun_num_workers"] == 0
    assert fallback["num_workers"] == 2 and fallback["reason"].endswith("is killed by signal: Bus error.")
    text = (campaign.out / "summary.md").read_text()
    flags = " ".join(campaign_parts.lever_flags([cost_levers])) or "no flags"
    assert f"Fallback: with --cost-levers {cost_levers} ({flags}) and 2 data loader workers, the two-stage" in text
    assert "both runs ran again with --cost-levers none and --num-workers 0: the figures" in text
    # a rerun of the cost part after the fallback runs as the fallback did
    argv = campaign_summary.rerun_argv(campaign.state, {"cost": ["token-only"]})
    assert argv[argv.index("--cost-levers") :][:4] == ["--cost-levers", "none", "--cost-num-workers", "0"]
    assert gpu_campaign.parse_options(["--cpu", "--parts", "tests", "--out", "o", "--cost-num-workers", "0"])


def test_a_time_scale_shrinks_every_part_where_a_lower_deadline_starves_the_last(tmp_path, monkeypatch):
    """benchmarks/README.md's advice for less device time: --time-scale S gives each part its budget
    x S within the deadline 560 x S (less the 10 s kept for the summary, which the last part pays),
    where --deadline-s alone leaves the earlier parts their whole budgets and the later ones nothing."""
    runner = sys.modules["campaign_runner"]
    clock = [1000.0]
    monkeypatch.setattr(runner, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))

    def part_seconds(argv):
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        out.mkdir()
        opts = gpu_campaign.parse_options(["--parts", "tests,throughput,activations", "--out", str(out), *argv])
        opts.parts = list(campaign_options.PARTS)  # cost too, without its data: only its budget is read
        campaign, seconds = runner.Campaign(opts, argv, tmp_path), {}
        for part in opts.parts:  # each part runs until its end
            start = clock[0]
            campaign.begin(part)
            clock[0] = max(start, campaign.part_end)
            seconds[part] = clock[0] - start
        return seconds

    assert part_seconds(["--deadline-s", "560"]) == campaign_options.BUDGETS
    scaled = {"tests": 30, "throughput": 115, "cost": 112.5, "activations": 17.5 - 5}  # 5 = 10 - 10 x 0.5
    assert part_seconds(["--deadline-s", "560", "--time-scale", "0.5"]) == pytest.approx(scaled)
    assert part_seconds(["--deadline-s", "280"]) == {"tests": 60, "throughput": 210, "cost": 0, "activations": 0}


@CPU_ONLY
def test_a_part_past_its_budget_stops_its_run_and_still_writes_the_summary(tmp_path):
    out = tmp_path / "out"
    done = run_campaign(
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
    runs = read_part(out, "throughput")["runs"]
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
    cost part whole, by its runs' roles, with --cost-levers none after a fallback; without the call's
    --time-scale, which would multiply the N seconds left."""
    state = {
        "argv": [
            "--parts",
            ALL_PARTS,
            "--data-dir",
            ".campaign",
            "--out",
            "/o",
            "--deadline-s=560",
            "--time-scale",
            "0.7",
        ],
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


def test_the_mfu_target_also_gives_the_mfu_counting_causal_attention_as_half():
    row = {"micro_batch_size": 16, "patch_size": 1, "stage": "token", "tokens_per_s": 1.0, "tflops": 400.0}
    row.update(mfu=0.5, flops_per_position=100.0, flops_per_position_causal=88.0, ratio_vs_token=1.0)
    parts = {"throughput": {"runs": [{"name": "all-accum", "num_microbatches": 8, "payload": {"results": [row]}}]}}
    value, note = sys.modules["campaign_figures"].target_values(parts, "all-accum")["token_mfu"]
    assert value == 0.5 and note == "b=16; 0.440 counting causal attention as half"


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


@pytest.mark.parametrize(
    "tokens, rate, unit, peak",
    [
        ("stage tokens", "tok/s (all GPUs)", "TFLOP/s/GPU", "peak mem (max over ranks)"),  # the trainer's line now
        ("tokens", "tok/s", "TFLOP/s/GPU", "peak mem"),  # before the units were spelled out
        ("tokens", "tok/s", "TFLOP/s", "peak mem"),  # before the figure was per GPU
    ],
)
def test_partial_output_is_read_back(tokens, rate, unit, peak):
    rows = campaign_logs.throughput_partial_rows(
        "  recompute=none b=16 K=4: 285.4 ms, 459,327 tok/s, 301.1 TFLOP/s, loss 1 -> 2\n"
    )
    assert rows[0]["tokens_per_s"] == 459327 and rows[0]["patch_size"] == 4 and rows[0]["partial"]
    line = (
        f"12:00:00 [rank 0] [token] iter 10/20 (global 50) | {tokens} 5.243M | loss 5.1 | lr 3.0e-04 | grad norm 0.5 "
        f"| skipped 0 | 117,195 {rate} | 307.3 {unit} MFU 38.9% | {peak} 26.89 GiB\n"
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


def test_prepare_for_the_gpu_without_the_wheel_ends_with_one_error_line(tmp_path, monkeypatch, capsys):
    """--prepare (data for the GPU) ends with one ``error:`` line and exit 1 when the wheel folder holds
    no megatron-core cp312 wheel: the folder, and the README's download command to run; the rehearsal's
    --prepare --cpu (its data never travels) notes it; with the wheel, no error."""
    readme = " ".join(README.read_text().replace("\\\n", " ").split())  # its lines joined
    assert campaign_carry.WHEEL_DOWNLOAD in readme
    monkeypatch.setattr(gpu_campaign, "prepare_corpus", lambda *args: None)  # the corpus: not this test's
    monkeypatch.setattr(gpu_campaign, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(campaign_carry, "tree_bytes", lambda repo: 0)
    argv = ["--prepare", "--corpus", "c.jsonl.xz", "--data-dir", str(tmp_path / "data")]
    assert gpu_campaign.main(argv) == 1
    printed = capsys.readouterr()
    assert printed.out.startswith("carry: ") and printed.out.count("\n") == 1
    folder = tmp_path / ".whl"
    assert printed.err == (
        f"error: no megatron_core-*-cp312-*.whl in {folder}, which the device call installs; "
        f"in {tmp_path}, run: {campaign_carry.WHEEL_DOWNLOAD}\n"
    )
    assert gpu_campaign.main([*argv, "--cpu"]) == 0
    assert "note: no megatron_core-*-cp312-*.whl" in capsys.readouterr().out
    folder.mkdir()
    (folder / "megatron_core-0.16.1-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl").write_bytes(b"")
    assert gpu_campaign.main(argv) == 0
    printed = capsys.readouterr()
    assert printed.err == "" and printed.out.count("\n") == 1


def test_the_trainers_own_log_line_is_read_back(caplog):
    """The line metrics.py writes now, not a copy of it."""
    from types import SimpleNamespace

    from megatron_patch.training.metrics import MetricsWriter

    writer = MetricsWriter(SimpleNamespace(summary_json=None), None, enabled=True)
    step = dict(stage="patch", iteration=5, stage_iteration=5, stage_iters=40, patch_size=4, tokens=1311000)
    step.update(run_tokens=1311000, loss=6.5, lr=3e-4, grad_norm=1.0, skipped=0, tokens_per_s=412345.0)
    step.update(tflops_per_gpu=300.1, peak_tflops=789.0, peak_memory=27.01)
    with caplog.at_level("INFO", logger="megatron_patch.train"):
        writer.log_step(**step)
    (window,) = campaign_logs.trainer_windows(caplog.text)
    assert window["tokens_per_s"] == 412345.0 and window["tflops_per_gpu"] == 300.1
    assert window["mfu"] == pytest.approx(0.380, abs=1e-3) and window["peak_memory_gib"] == 27.01
