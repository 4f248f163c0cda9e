"""The benchmark scripts' flag errors: one ``error:`` line and exit code 2, also for GPU mode without a
GPU."""

import pytest

from tests.benchmarks.script_helpers import CPU_ONLY, load_script

throughput = load_script("throughput")
loss_benchmark = load_script("loss_benchmark")
memory_plan = load_script("memory_plan")


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
