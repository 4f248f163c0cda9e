"""``benchmarks/loss_benchmark.py`` smoke-tested in-process on tiny sizes (CPU mode). Speed is never
asserted."""

import json

from tests.benchmarks.script_helpers import CPU_ONLY, load_script, positive

loss_benchmark = load_script("loss_benchmark")


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
        assert positive(r["ms_median"]) and positive(r["time_vs_token"])
        assert r["peak_above_base_bytes"] is None  # CPU
        # every method is the same function of the bf16 logits: fp32 loss, bf16-rounded gradient
        assert r["loss_error_vs_fp64"] < 1e-5 and r["grad_error_vs_fp64"] < 2e-2
