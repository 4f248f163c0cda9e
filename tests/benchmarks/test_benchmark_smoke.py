"""The GPU benchmark scripts, smoke-tested in-process on tiny sizes (CPU mode), and the memory
planner's and the FLOP/MFU arithmetic against hand computations. Speed is never asserted."""

import importlib.util
import json
import math
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="--cpu smoke mode refuses to run beside a GPU")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


throughput = _load("throughput")
loss_benchmark = _load("loss_benchmark")
memory_plan = _load("memory_plan")
phase_timers = _load("phase_timers")


def _positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


# --------------------------------------------------------------------------- throughput.py
@CPU_ONLY
def test_throughput_cpu_smoke(tmp_path, capsys):
    out = tmp_path / "tp.json"
    code = throughput.main(
        [
            "--cpu",
            "--micro-batch-size",
            "2",
            "--patch-sizes",
            "1,4",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--output-json",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| recompute | stage | K | b | step ms (median) |" in printed
    assert "python benchmarks/throughput.py --cpu" in printed and "megatron-core" in printed
    assert "Step phases" not in printed  # --phase-times is off by default
    payload = json.loads(out.read_text())
    assert payload["environment"]["torch"] == torch.__version__
    rows = payload["results"]
    assert [(r["stage"], r["patch_size"]) for r in rows] == [("token", 1), ("patch", 4)]
    from megatron_patch.architecture.presets import get_preset
    from megatron_patch.training.flops import flops_per_position

    for r in rows:
        assert "error" not in r, r
        assert "phases_ms" not in r
        for key in ("step_s_median", "step_s_mean", "tokens_per_s", "tflops", "loss_first", "loss_last"):
            assert _positive(r[key]), (key, r[key])
        assert r["tokens_per_step"] == 2 * r["patch_size"] * 64  # b x K x T
        assert r["mfu"] is None and r["peak_memory_gib"] is None  # CPU: no matmul peak, no CUDA allocator
        # the TFLOP/s are flops.py's formula (vocab 512 is already a multiple of 128)
        expected = flops_per_position(get_preset("tiny"), 64, 512) * 2 * 64 / r["step_s_median"] / 1e12
        assert r["tflops"] == pytest.approx(expected, rel=1e-12)
    assert _positive(rows[1]["ratio_vs_token"])


@CPU_ONLY
def test_throughput_phase_times_from_megatron_timers(tmp_path, capsys):
    out = tmp_path / "tp.json"
    code = throughput.main(
        [
            "--cpu",
            "--phase-times",
            "--micro-batch-size",
            "2",
            "--patch-sizes",
            "1,4",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--output-json",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "### Step phases (median ms per step)" in printed
    assert "| recompute | K | b | step ms (median) | forward-backward |" in printed
    assert "outside timed phases |" in printed
    rows = json.loads(out.read_text())["results"]
    assert len(rows) == 2
    for r in rows:
        assert "error" not in r, r
        phases = r["phases_ms"]
        for name in (
            "forward-backward",
            "forward-compute",
            "backward-compute",
            "all-grads-sync",
            "optimizer-inner-step",
        ):
            assert _positive(phases[name]), (name, phases)
        # nesting (megatron-core 0.16.1): compute and the grad sync lie inside forward-backward, which
        # with the optimizer phases lies inside the step (medians of 2 steps: a small tolerance)
        inner = phases["forward-compute"] + phases["backward-compute"] + phases["all-grads-sync"]
        assert inner <= phases["forward-backward"] * 1.01 + 0.05, phases
        step_ms = 1e3 * r["step_s_median"]
        assert phases["forward-backward"] < step_ms
        top = sum(phases.get(name, 0.0) for name in phase_timers.TOP_LEVEL_PHASES)
        assert r["phases_outside_ms"] == pytest.approx(step_ms - top)


def test_phase_timers_sum_intervals_per_step_and_uninstall():
    import types

    timers = phase_timers.PhaseTimers(cuda=False)
    model_config, optimizer_config = types.SimpleNamespace(timers=None), types.SimpleNamespace(timers=None)
    with phase_timers.installed(timers, [model_config, model_config, optimizer_config]):
        assert model_config.timers is timers and optimizer_config.timers is timers
        for _ in range(2):  # megatron's calls: a log level and barrier= on start, a bare stop
            model_config.timers("forward-backward", log_level=1).start(barrier=True)
            for _ in range(3):  # one interval per micro-batch, summed per step
                model_config.timers("forward-compute", log_level=2).start()
                model_config.timers("forward-compute").stop()
            model_config.timers("forward-backward").stop()
            optimizer_config.timers("some-new-phase", log_level=1).start(barrier=False)
            optimizer_config.timers("some-new-phase").stop()
            timers.end_step()
        with pytest.raises(RuntimeError, match="started twice"):
            timers("x").start()
            timers("x").start()
    assert model_config.timers is None and optimizer_config.timers is None
    steps = timers.per_step_ms()
    assert [sorted(step) for step in steps] == [["forward-backward", "forward-compute", "some-new-phase"]] * 2
    assert all(step["forward-compute"] <= step["forward-backward"] for step in steps)
    medians = phase_timers.phase_medians(steps, ["forward-backward", "forward-compute", "some-new-phase", "unseen"])
    assert list(medians) == ["forward-backward", "forward-compute", "some-new-phase"]
    assert phase_timers.outside_ms(
        10.0, {"forward-backward": 6.0, "forward-compute": 5.0, "optimizer-inner-step": 1.5}
    ) == pytest.approx(2.5)


@pytest.mark.parametrize(
    "flags",
    [
        [],
        ["--bias-swiglu-fusion"],
        ["--rope-fusion"],
        ["--bias-swiglu-fusion", "--rope-fusion"],
        ["--torch-adam-impl", "fused"],
        ["--cross-entropy-fusion"],
    ],
)
def test_fusion_flags_reach_the_trainers_arguments(flags):
    """The A/B flags of throughput.py are the trainer's own (builders then build what the trainer does)."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from common import trainer_config

    opts = throughput.parse_options(["--cpu"] + flags)
    config = trainer_config(opts, "none")
    assert config.model.bias_swiglu_fusion is ("--bias-swiglu-fusion" in flags)
    assert config.model.rope_fusion is ("--rope-fusion" in flags)
    assert config.optimizer.torch_adam_impl == ("fused" if "fused" in flags else "foreach")
    assert config.model.cross_entropy_fusion is ("--cross-entropy-fusion" in flags)


def test_activation_measurement_builds_the_model_the_flags_ask_for(monkeypatch, capsys):
    """--measure-layer-activations builds its own (unwrapped) model: the fusion flags must reach it."""
    from megatron_patch import model as model_module

    built = []
    original = model_module.build_patch_gpt_model
    monkeypatch.setattr(model_module, "build_patch_gpt_model", lambda *a, **k: built.append(k) or original(*a, **k))
    assert (
        throughput.main(
            [
                "--cpu",
                "--measure-layer-activations",
                "--layers",
                "1",
                "--micro-batch-size",
                "1",
                "--patch-sizes",
                "1",
                "--recompute-granularity",
                "none",
                "--rope-fusion",
                "--cross-entropy-fusion",
            ]
        )
        == 0
    )
    assert [(k["fused_rope"], k["fused_cross_entropy"]) for k in built] == [(True, True)]


def test_rates_are_the_flops_formula():
    from megatron_patch.architecture.presets import get_preset
    from megatron_patch.training.flops import flops_per_position

    preset = get_preset("370m")
    per_position = flops_per_position(preset, 2048, 32000)
    # the formula written out for 370m: h=1024, f=2752, 16 heads of 64 (MHA), L=24, s=2048, V=32000
    h, f, s, L, V = 1024, 2752, 2048, 24, 32000
    per_layer = 2 * h * (h + 2 * h) + 2 * h * h + 2 * 3 * h * f + 2 * 2 * s * h
    assert per_position == 3 * (L * per_layer + 2 * h * V)
    r = throughput.rates(per_position, positions=16 * 2048, tokens=4 * 16 * 2048, seconds=0.25, peak_tflops=800.0)
    assert r["tflops"] == pytest.approx(per_position * 16 * 2048 / 0.25 / 1e12)
    assert r["mfu"] == pytest.approx(r["tflops"] / 800.0)
    assert r["tokens_per_s"] == pytest.approx(4 * 16 * 2048 / 0.25)
    assert throughput.rates(per_position, 1, 1, 1.0, None)["mfu"] is None


@CPU_ONLY
def test_measured_layer_activations_feed_the_planner(tmp_path, capsys):
    acts = tmp_path / "acts.json"
    code = throughput.main(
        [
            "--cpu",
            "--measure-layer-activations",
            "--micro-batch-size",
            "1,2",
            "--patch-sizes",
            "1,4",
            "--recompute-granularity",
            "none,full",
            "--layers",
            "2",
            "--output-json",
            str(acts),
        ]
    )
    assert code == 0
    assert "| recompute | K | b | layers built |" in capsys.readouterr().out
    records = json.loads(acts.read_text())["layer_activations"]
    assert len(records) == 2 * 2 * 2
    by_key = {(r["recompute"], r["patch_size"], r["micro_batch_size"]): r for r in records}
    for r in records:
        assert r["layers_built"] == 2 and r["dtype"] == "float32" and len(r["layer_bytes"]) == 2
        assert all(_positive(v) for v in r["layer_bytes"]) and _positive(r["post_bytes"])
        assert r["peak_above_base_bytes"] is None  # CPU
    for K in (1, 4):
        none1, none2 = by_key[("none", K, 1)], by_key[("none", K, 2)]
        # saved activations grow with the micro-batch; full recompute keeps far less than none
        assert max(none2["layer_bytes"]) > 1.8 * max(none1["layer_bytes"])
        assert max(by_key[("full", K, 2)]["layer_bytes"]) < 0.25 * max(none2["layer_bytes"])

    # the meter counts exactly the formula's tensors, in fp32 here, with what the CPU adds: its unfused
    # rms_norm keeps fp32 input and output (8sh) and rstd (4s) per norm, and the four RoPE cos/sin
    # tables (4 x s x d x 4 bytes) do not depend on b. tiny: s=64, h=64, d=16, 4 heads.
    from megatron_patch.architecture.presets import get_preset

    s, h, d, lse = 64, 64, 16, 4 * 4 * 64
    formula = memory_plan.formula_activations(get_preset("tiny"), s, 512, "none").layer
    for b in (1, 2):
        expected = b * (2 * (formula - lse) + lse + 2 * (8 * s * h + 4 * s) - 2 * (4 * s * h)) + 4 * s * d * 4
        assert by_key[("none", 1, b)]["layer_bytes"] == [expected, expected], "saved tensors changed: see memory_plan"

    plan = tmp_path / "plan.json"
    code = memory_plan.main(
        [
            "--model",
            "tiny",
            "--gpus",
            "1",
            "--vocab-size",
            "512",
            "--recompute",
            "none",
            "--measured",
            str(acts),
            "--require-measured",
            "--output-json",
            str(plan),
        ]
    )
    assert code == 0
    assert "measured (float32, cpu" in capsys.readouterr().out
    chosen = json.loads(plan.read_text())["chosen"][0]
    # the planner's activations are the measured per-sequence bytes (largest over K and b) times b;
    # without a GPU peak the working memory is the formula's 2 s V
    layer = max(max(r["layer_bytes"]) / r["micro_batch_size"] for r in records if r["recompute"] == "none")
    pre = max(r["pre_bytes"] / r["micro_batch_size"] for r in records if r["recompute"] == "none")
    post = max(r["post_bytes"] / r["micro_batch_size"] for r in records if r["recompute"] == "none")
    b = chosen["micro_batch_size"]
    expected = b * (4 * layer + pre + post + 2 * 64 * 512)
    assert chosen["activation_gib"] * 2**30 == pytest.approx(expected)


# --------------------------------------------------------------------------- memory_plan.py
def test_memory_plan_matches_a_hand_computation():
    from megatron_patch.architecture.presets import get_preset

    tiny = get_preset("tiny")  # L=4, h=64, f=176, 4 heads, T=64
    V = 512
    # one layer: QKV 64*192 + proj 64*64 + SwiGLU 3*64*176 + two norms 2*64 = 50304
    assert memory_plan.layer_parameters(tiny, 1) == 50304
    params = memory_plan.stage_parameters(tiny, V, 1, 1)["first"]
    assert params == 4 * 50304 + 64 + 2 * 512 * 64 == tiny.parameter_count(V) == 266816
    assert memory_plan.static_bytes(params, 1, False) == 18 * 266816  # 2 + 4 + 12 bytes per parameter
    assert memory_plan.static_bytes(params, 2, True) == 12 * 266816  # 2 + 4 + 12/2
    # TP=2, PP=2: matrices halve, norms stay; the embedding goes to the first stage, the output layer
    # and final norm to the last
    split = memory_plan.stage_parameters(tiny, V, 2, 2)
    assert split == {"first": 2 * (25088 + 128) + 512 * 64 / 2, "last": 2 * (25088 + 128) + 512 * 64 / 2 + 64}

    # activations per sequence, bf16, s=64: layer 16sh + 10sf + 4as = 65536 + 112640 + 1024
    acts = memory_plan.formula_activations(tiny, 64, V, "none", patch_size=4)
    assert acts.layer == 179200
    assert acts.pre == 8 * 4 * 64  # int64 token ids, K tokens per position
    assert acts.post == 4 * 64 * 64 + 4 * 64 * 512  # two bf16 [s, h] inputs + the fp32 softmax
    assert acts.working == 2 * 64 * 512  # bf16 logits
    selective = memory_plan.formula_activations(tiny, 64, V, "selective")
    assert selective.layer == 179200 - 4 * 4 * 64  # the fp32 log-sum-exp is recomputed
    full = memory_plan.formula_activations(tiny, 64, V, "full")
    assert full.layer == 2 * 64 * 64 and full.working == 2 * 64 * 512 + 179200

    layout = memory_plan.Layout(tp=1, pp=1, dp=1, micro_batch_size=2, recompute="none")
    memory = memory_plan.stage_memory(tiny, V, layout, acts, distributed_optimizer=False)["first"]
    assert memory["activation_bytes"] == 2 * (4 * 179200 + 2048 + 147456 + 65536)
    assert memory["total_bytes"] == 18 * 266816 + 2 * (4 * 179200 + 2048 + 147456 + 65536)
    # 1F1B with PP=2, TP=2 (sequence parallel): the first stage holds 2 micro-batches of its 2 layers
    layout = memory_plan.Layout(tp=2, pp=2, dp=1, micro_batch_size=1, recompute="none")
    memory = memory_plan.stage_memory(tiny, V, layout, acts, distributed_optimizer=False)
    assert memory["first"]["activation_bytes"] == (2 * (2 * 179200 + 2048) + 65536) / 2
    assert memory["last"]["activation_bytes"] == (2 * 179200 + 147456 + 65536) / 2


def test_memory_plan_prefers_least_model_parallelism(capsys, tmp_path):
    out = tmp_path / "plan.json"
    assert memory_plan.main(["--model", "6.7b,13b", "--gpus", "8,64", "--output-json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| model | GPUs | TP | PP | DP | micro-batch | recompute |" in printed
    payload = json.loads(out.read_text())
    assert len(payload["chosen"]) == 4
    for best in payload["chosen"]:
        assert best["feasible"] and best["total_gib"] <= 72
        same = [r for r in payload["considered"] if r["model"] == best["model"] and r["gpus"] == best["gpus"]]
        assert not any(r["feasible"] and r["tp"] * r["pp"] < best["tp"] * best["pp"] for r in same)
        assert best["activations_from"] == "formula"


# --------------------------------------------------------------------------- loss_benchmark.py
@CPU_ONLY
def test_loss_benchmark_cpu_smoke(tmp_path, capsys):
    out = tmp_path / "loss.json"
    code = loss_benchmark.main(
        [
            "--cpu",
            "--vocab-sizes",
            "256",
            "--patch-sizes",
            "1,4",
            "--repeats",
            "2",
            "--warmup",
            "0",
            "--output-json",
            str(out),
        ]
    )
    assert code == 0
    assert "| V | K | method | fwd+bwd ms (median) |" in capsys.readouterr().out
    rows = json.loads(out.read_text())["results"]
    assert [(r["method"], r["patch_size"]) for r in rows] == [
        ("token CE (megatron)", 1),
        ("patch CE", 1),
        ("fused patch CE", 1),
        ("K x megatron CE", 1),
        ("patch CE", 4),
        ("fused patch CE", 4),
        ("K x megatron CE", 4),
    ]
    for r in rows:
        assert "error" not in r
        assert _positive(r["ms_median"]) and _positive(r["time_vs_token"])
        assert r["peak_above_base_bytes"] is None  # CPU
        # every method is the same function of the bf16 logits: fp32 loss, bf16-rounded gradient
        assert r["loss_error_vs_fp64"] < 1e-5 and r["grad_error_vs_fp64"] < 2e-2


# --------------------------------------------------------------------------- bad flags
@pytest.mark.parametrize(
    "script, argv",
    [
        ("throughput", ["--patch-sizes", "0"]),
        ("throughput", ["--model", "nope"]),
        ("throughput", ["--layers", "2"]),
        ("throughput", ["--phase-times", "--measure-layer-activations"]),
        ("loss_benchmark", ["--vocab-sizes", "x"]),
        ("memory_plan", ["--budget-gib", "90"]),
        ("memory_plan", ["--measured", "/nonexistent.json"]),
    ],
)
def test_bad_flags_exit_2_with_one_line(script, argv, capsys):
    module = {"throughput": throughput, "loss_benchmark": loss_benchmark, "memory_plan": memory_plan}[script]
    assert module.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


@CPU_ONLY
@pytest.mark.parametrize("script", ["throughput", "loss_benchmark"])
def test_gpu_mode_without_a_gpu_exits_2(script, capsys):
    module = {"throughput": throughput, "loss_benchmark": loss_benchmark}[script]
    assert module.main([]) == 2
    assert "run with --cpu" in capsys.readouterr().err


# --------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
def test_scripts_on_gpu_tiny(tmp_path):
    out = tmp_path / "tp.json"
    assert (
        throughput.main(
            [
                "--model",
                "tiny",
                "--micro-batch-size",
                "2",
                "--patch-sizes",
                "1,2",
                "--steps",
                "2",
                "--warmup",
                "1",
                "--output-json",
                str(out),
            ]
        )
        == 0
    )
    for r in json.loads(out.read_text())["results"]:
        assert _positive(r["tflops"]) and _positive(r["mfu"]) and _positive(r["peak_memory_gib"])
        assert "phases_ms" not in r  # off by default
    assert (
        throughput.main(
            [
                "--model",
                "tiny",
                "--micro-batch-size",
                "2",
                "--patch-sizes",
                "1",
                "--steps",
                "2",
                "--warmup",
                "1",
                "--phase-times",
                "--output-json",
                str(out),
            ]
        )
        == 0
    )
    for r in json.loads(out.read_text())["results"]:  # CUDA events around megatron's phases
        phases = r["phases_ms"]
        assert _positive(phases["forward-backward"]) and _positive(phases["optimizer-inner-step"])
        assert phases["forward-compute"] + phases["backward-compute"] <= phases["forward-backward"] * 1.01 + 0.05
    out = tmp_path / "loss.json"
    assert (
        loss_benchmark.main(
            [
                "--seq-length",
                "128",
                "--micro-batch-size",
                "2",
                "--vocab-sizes",
                "1024",
                "--patch-sizes",
                "1,4",
                "--repeats",
                "2",
                "--output-json",
                str(out),
            ]
        )
        == 0
    )
    for r in json.loads(out.read_text())["results"]:
        assert _positive(r["peak_above_base_bytes"]) and r["grad_error_vs_fp64"] < 2e-2
