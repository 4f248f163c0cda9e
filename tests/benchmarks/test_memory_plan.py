"""``benchmarks/memory_plan.py`` and its memory model (``memory_model.py``) against hand computations."""

import json

from tests.benchmarks.script_helpers import load_module, load_script

memory_plan = load_script("memory_plan")
memory_model = load_module("memory_model")


def test_memory_plan_matches_a_hand_computation():
    from megatron_patch.architecture.presets import get_preset

    tiny = get_preset("tiny")  # L=4, h=64, f=176, 4 heads, T=64
    V = 512
    # one layer: QKV 64*192 + proj 64*64 + SwiGLU 3*64*176 + two norms 2*64 = 50304
    assert memory_model.layer_parameters(tiny, 1) == 50304
    params = memory_model.stage_parameters(tiny, V, 1, 1)["first"]
    assert params == 4 * 50304 + 64 + 2 * 512 * 64 == tiny.parameter_count(V) == 266816
    assert memory_model.static_bytes(params, 1, False) == 18 * 266816  # 2 + 4 + 12 bytes per parameter
    assert memory_model.static_bytes(params, 2, True) == 12 * 266816  # 2 + 4 + 12/2
    # TP=2, PP=2: matrices halve, norms stay; the embedding goes to the first stage, the output layer
    # and final norm to the last
    split = memory_model.stage_parameters(tiny, V, 2, 2)
    assert split == {"first": 2 * (25088 + 128) + 512 * 64 / 2, "last": 2 * (25088 + 128) + 512 * 64 / 2 + 64}

    # activations per sequence, bf16, s=64: layer 16sh + 10sf + 4as = 65536 + 112640 + 1024
    acts = memory_model.formula_activations(tiny, 64, V, "none", patch_size=4)
    assert acts.layer == 179200
    assert acts.pre == 8 * 4 * 64  # int64 token ids, K tokens per position
    assert acts.post == 4 * 64 * 64 + 4 * 64 * 512  # two bf16 [s, h] inputs + the fp32 softmax
    assert acts.working == 2 * 64 * 512  # bf16 logits
    selective = memory_model.formula_activations(tiny, 64, V, "selective")
    assert selective.layer == 179200 - 4 * 4 * 64  # the fp32 log-sum-exp is recomputed
    full = memory_model.formula_activations(tiny, 64, V, "full")
    assert full.layer == 2 * 64 * 64 and full.working == 2 * 64 * 512 + 179200

    layout = memory_model.Layout(tp=1, pp=1, dp=1, micro_batch_size=2, recompute="none")
    memory = memory_model.stage_memory(tiny, V, layout, acts, distributed_optimizer=False)["first"]
    assert memory["activation_bytes"] == 2 * (4 * 179200 + 2048 + 147456 + 65536)
    assert memory["total_bytes"] == 18 * 266816 + 2 * (4 * 179200 + 2048 + 147456 + 65536)
    # 1F1B with PP=2, TP=2 (sequence parallel): the first stage holds 2 micro-batches of its 2 layers
    layout = memory_model.Layout(tp=2, pp=2, dp=1, micro_batch_size=1, recompute="none")
    memory = memory_model.stage_memory(tiny, V, layout, acts, distributed_optimizer=False)
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
