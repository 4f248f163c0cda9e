"""CPU mode and process-group setup, each in a fresh interpreter (both are process-global)."""

import os
import subprocess
import sys
import textwrap

from tests.conftest import REPO_ROOT


def _python(code, **env):
    full_env = dict(os.environ, TORCHDYNAMO_DISABLE="1", **env)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in env:
            full_env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO_ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
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


def test_slurm_variables_name_the_rank():
    result = _python(
        """
        import torch.distributed as dist
        from megatron_patch.runtime import parallel
        parallel.init_distributed(cpu=True)
        print("rank", dist.get_rank(), "of", dist.get_world_size())
    """,
        SLURM_PROCID="0",
        SLURM_NTASKS="1",
        SLURM_LOCALID="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="29731",
    )
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
