"""The benchmark scripts' flag errors: one ``error:`` line and exit code 2, also for GPU mode without a
GPU."""

import pytest

from tests.benchmarks.script_helpers import CPU_ONLY, load_script

throughput = load_script("throughput")
loss_benchmark = load_script("loss_benchmark")
memory_plan = load_script("memory_plan")


SCRIPTS = {"throughput": throughput, "loss_benchmark": loss_benchmark, "memory_plan": memory_plan}


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("throughput", ["--patch-sizes", "0"], "argument --patch-sizes: '0': every value must be an integer >= 1"),
        ("throughput", ["--model", "nope"], "--model nope: choose one of tiny,"),
        ("throughput", ["--layers", "2"], "--layers is for --measure-layer-activations"),
        ("throughput", ["--phase-times", "--measure-layer-activations"], "drop it with --measure-layer-activations"),
        ("loss_benchmark", ["--vocab-sizes", "x"], "argument --vocab-sizes: 'x' is not a comma-separated list"),
        ("memory_plan", ["--budget-gib", "90"], "--budget-gib 90.0 must lie in (0, --gpu-memory-gib 80.0]"),
        ("memory_plan", ["--measured", "/nonexistent.json"], "--measured /nonexistent.json: "),
    ],
)
def test_bad_flags_exit_2_with_one_line(script, argv, message, capsys):
    assert SCRIPTS[script].main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_argparse_errors_name_the_script_help(script, capsys):
    """The package's ArgumentParser: argparse's own errors end by pointing at the script's --help."""
    assert SCRIPTS[script].main(["--no-such-flag"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: unrecognized arguments: --no-such-flag (see benchmarks/{script}.py --help)"


@CPU_ONLY
@pytest.mark.parametrize("script", ["throughput", "loss_benchmark"])
def test_gpu_mode_without_a_gpu_exits_2(script, capsys):
    assert SCRIPTS[script].main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "run with --cpu" in err and "\n" not in err
