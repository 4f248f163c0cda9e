"""The benchmark scripts on a GPU, tiny sizes: MFU and peak memory are measured, phase times come from
CUDA events. Skipped without CUDA; speed is never asserted."""

import json

import pytest

from tests.benchmarks.script_helpers import TINY_STEPS, load_script, positive

throughput = load_script("throughput")
loss_benchmark = load_script("loss_benchmark")


@pytest.mark.gpu
def test_scripts_on_gpu_tiny(tmp_path):
    out = tmp_path / "tp.json"
    assert (
        throughput.main(
            [
                "--model",
                "tiny",
                *TINY_STEPS,
                "--patch-sizes",
                "1,2",
                "--output-json",
                str(out),
            ]
        )
        == 0
    )
    for r in json.loads(out.read_text())["results"]:
        assert positive(r["tflops"]) and positive(r["mfu"]) and positive(r["peak_memory_gib"])
        assert "phases_ms" not in r  # off by default
    assert (
        throughput.main(
            [
                "--model",
                "tiny",
                *TINY_STEPS,
                "--patch-sizes",
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
        assert positive(phases["forward-backward"]) and positive(phases["optimizer-inner-step"])
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
        assert positive(r["peak_above_base_bytes"]) and r["grad_error_vs_fp64"] < 2e-2
