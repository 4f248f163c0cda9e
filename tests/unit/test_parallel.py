"""CPU mode and process-group setup, each in a fresh interpreter (both are process-global)."""

import os
import subprocess
import sys
import textwrap

from tests.conftest import REPO_ROOT


def _python(code, argv=(), timeout=120, **env):
    """Run ``code`` in a fresh interpreter (``argv``: its sys.argv[1:]); ``env`` adds variables, a
    None value removes one (TORCHDYNAMO_DISABLE=1 unless told otherwise)."""
    full_env = dict(os.environ, **{"TORCHDYNAMO_DISABLE": "1", **env})
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in env:
            full_env.pop(name, None)
    full_env = {name: value for name, value in full_env.items() if value is not None}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *argv],
        cwd=REPO_ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cpu_mode_is_opt_in_and_refuses_a_gpu():
    result = _python("""
        import torch
        import megatron_patch.model, megatron_patch.training.loop
        from megatron_patch.runtime import cpu_mode
        assert not cpu_mode.is_enabled()          # importing enables nothing
        assert torch.cuda.current_device.__module__ == "torch.cuda"  # not replaced
        torch.cuda.is_available = lambda: True
        try:
            cpu_mode.enable()
        except ValueError as error:  # ArgumentError, a one-line UserError
            print("refused:", error)
        assert not cpu_mode.is_enabled()
    """)
    assert result.returncode == 0, result.stderr
    assert "refused: megatron_patch.runtime.cpu_mode.enable() refused: CUDA is available" in result.stdout


def test_cpu_mode_sends_cuda_allocations_to_the_cpu():
    result = _python("""
        import torch
        from megatron_patch.runtime import cpu_mode
        cpu_mode.enable()
        x = torch.zeros(3, device="cuda")
        assert x.device.type == "cpu" and x.cuda() is x and x.type() == "torch.cuda.FloatTensor"
        print("ok")
    """)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


JOIN_AND_SAY_RANK = """
    import torch.distributed as dist
    from megatron_patch.runtime import parallel
    parallel.init_distributed(cpu=True)
    print("rank", dist.get_rank(), "of", dist.get_world_size())
"""


def test_slurm_variables_name_the_rank():
    slurm = dict(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="1", SLURM_LOCALID="0")
    result = _python(JOIN_AND_SAY_RANK, **slurm, MASTER_ADDR="127.0.0.1", MASTER_PORT="29731")
    assert result.returncode == 0, result.stderr
    assert "rank 0 of 1" in result.stdout  # the step's tasks, not the job's


def test_a_batch_script_shell_is_no_slurm_step():
    """``python tool.py`` in an sbatch script of two nodes (SLURM_PROCID 0, SLURM_NTASKS 2 and an
    exported MASTER_ADDR, but no step): a world of one, not a wait for a second rank that never comes."""
    slurm = dict(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_LOCALID="0", SLURM_STEP_NUM_TASKS=None)
    result = _python(JOIN_AND_SAY_RANK, **slurm, MASTER_ADDR="127.0.0.1")
    assert result.returncode == 0, result.stderr
    assert "rank 0 of 1" in result.stdout


def test_rebuilding_the_layout_releases_the_old_groups(model_parallel):
    """Each gloo group keeps native threads; rebuilding TP/PP must not pile them up."""
    if not os.path.isdir("/proc/self/task"):
        import pytest

        pytest.skip("counts threads through /proc (Linux)")
    model_parallel(1, 1)
    threads_after_first = len(os.listdir("/proc/self/task"))
    for _ in range(3):
        model_parallel(1, 1)
    assert len(os.listdir("/proc/self/task")) <= threads_after_first


def test_cpu_mode_trainer_runs_compiled_functions_eagerly(tiny_corpus):
    """``--cpu`` with every opt-in fusion, in a process started without TORCHDYNAMO_DISABLE: megatron's
    ``jit_fuser`` wrapped the fused functions in torch.compile at import, yet nothing is compiled
    (CPU mode is eager, so its results are the eager functions' bit for bit) while the fused RoPE
    does run."""
    from tests.training.common import trainer_args

    fusions = ["--rope-fusion", "--bias-swiglu-fusion", "--cross-entropy-fusion"]
    result = _python(
        """
        import sys
        import torch
        from megatron_patch.architecture import attention
        from megatron_patch.training import cli
        assert hasattr(attention.apply_rotary, "_torchdynamo_orig_callable"), "jit_fuser did not compile it"
        calls = []
        fused = attention.apply_rotary
        attention.apply_rotary = lambda *args: calls.append(1) or fused(*args)
        code = cli.main(sys.argv[1:])
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        print("exit", code, "fused RoPE calls", len(calls), "compiled graphs", graphs)
    """,
        argv=trainer_args(tiny_corpus, None, *fusions, "--eval-iters", "0", train_iters=3),
        timeout=600,
        TORCHDYNAMO_DISABLE=None,
        OMP_NUM_THREADS="1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("exit 0 fused RoPE calls ") and line.endswith(" compiled graphs 0"), line
    assert int(line.split()[5]) > 0, line
