"""``throughput.py --measure-layer-activations`` (``benchmarks/layer_activations.py``) on CPU: the model
it builds, the bytes it measures against the memory formula, and those figures fed to the planner."""

import json

import pytest

from tests.benchmarks.script_helpers import CPU_ONLY, load_module, load_script, positive

throughput = load_script("throughput")
memory_plan = load_script("memory_plan")
memory_model = load_module("memory_model")


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
        assert all(positive(v) for v in r["layer_bytes"]) and positive(r["post_bytes"])
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
    formula = memory_model.formula_activations(get_preset("tiny"), s, 512, "none").layer
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
