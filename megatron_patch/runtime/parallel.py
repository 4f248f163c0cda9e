"""Process groups: torch.distributed and megatron's model-parallel state, on GPU or CPU."""

import contextlib
import logging
import os
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_patch.errors import ArgumentError
from megatron_patch.runtime import cpu_mode

logger = logging.getLogger(__name__)


def init_distributed(cpu: bool, timeout_minutes: int = 30) -> None:
    """Join the torchrun world (NCCL on GPU, gloo on CPU); a lone process forms a world of one.

    On GPU each process takes ``cuda:LOCAL_RANK``. On CPU, CPU mode is enabled first.
    """
    if cpu:
        cpu_mode.enable()
    elif not torch.cuda.is_available():
        raise ArgumentError("no CUDA device found: run with --cpu for CPU mode (gloo), or on a GPU node")
    if dist.is_initialized():
        return
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "MASTER_ADDR" in os.environ:
        # `srun python ...`, one task per GPU: SLURM's variables name the rank
        os.environ.update(
            RANK=os.environ["SLURM_PROCID"],
            WORLD_SIZE=os.environ["SLURM_NTASKS"],
            LOCAL_RANK=os.environ["SLURM_LOCALID"],
        )
    backend = "gloo" if cpu else "nccl"
    timeout = timedelta(minutes=timeout_minutes)
    if "RANK" not in os.environ:
        # plain `python script.py`: a world of one on a private store (the environment is left
        # alone, so processes this one starts do not inherit a rendezvous meant for it)
        if not cpu:
            torch.cuda.set_device(0)
        store = dist.HashStore()
        dist.init_process_group(backend=backend, store=store, rank=0, world_size=1, timeout=timeout)
        return
    if not cpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timeout)


def init_model_parallel(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    virtual_pipeline_parallel: int = None,
    seed: int = 1234,
) -> None:
    """(Re)build megatron's model-parallel groups and seed every RNG stream.

    The world size must be a multiple of ``tensor_parallel * pipeline_parallel``; the rest is data
    parallelism. Safe to call again with another layout (tests switch TP/PP inside one world).
    """
    world = dist.get_world_size()
    if world % (tensor_parallel * pipeline_parallel):
        raise ArgumentError(
            f"world size {world} is not a multiple of tensor ({tensor_parallel}) x pipeline "
            f"({pipeline_parallel}) parallel sizes: launch a multiple of "
            f"{tensor_parallel * pipeline_parallel} processes"
        )
    destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline_parallel,
    )
    seed_all(seed)


def destroy_model_parallel() -> None:
    """Tear down megatron's model-parallel state and the process groups it created.

    ``parallel_state.destroy_model_parallel`` only forgets its groups; each gloo group keeps its
    threads polling until the process ends, so a process that rebuilds layouts (tests, tools
    called from tools) would otherwise pile up hundreds of them. The default group is kept. Every
    rank destroys the groups in the same order (that of parallel_state's attributes).
    """
    if not parallel_state.model_parallel_is_initialized():
        return
    groups = _megatron_process_groups()
    parallel_state.destroy_model_parallel()
    for group in groups:
        try:
            dist.destroy_process_group(group)
        except ValueError:  # an alias of a group destroyed just before
            pass


def _megatron_process_groups() -> list:
    """Every process group held by megatron's parallel_state (singly, in lists or in dicts)."""
    found = {}
    pending = list(vars(parallel_state).values())
    while pending:
        value = pending.pop()
        if isinstance(value, dist.ProcessGroup):
            found[id(value)] = value
        elif isinstance(value, (list, tuple)):
            pending.extend(value)
        elif isinstance(value, dict):
            pending.extend(value.values())
    found.pop(id(dist.group.WORLD), None)
    return list(found.values())


def collective_device() -> torch.device:
    """Where a tensor must live to enter a collective of the world's backend: the current CUDA
    device under NCCL (which has no CPU tensors), the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def seed_all(seed: int) -> None:
    """Seed torch (CPU and CUDA) and megatron's model-parallel RNG tracker."""
    if cpu_mode.is_enabled():
        cpu_mode.seed_model_parallel_rng(seed)
    else:
        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


@contextlib.contextmanager
def distributed_world(cpu: bool, timeout_minutes: int = 30) -> Iterator[int]:
    """Join (or form) the process group for a command's lifetime; yields the world size.

    A group this call created is torn down at the end, megatron's model-parallel state with it; a
    group that already existed (a test session, a tool called from another tool) is left alone.
    Raises ArgumentError when the world cannot be formed (no GPU without CPU mode, CPU mode beside
    a GPU).
    """
    owns_process_group = not dist.is_initialized()
    if cpu:
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    init_distributed(cpu=cpu, timeout_minutes=timeout_minutes)
    try:
        yield dist.get_world_size()
    finally:
        if owns_process_group and dist.is_initialized():
            # destroying the world shuts every group down, in torch's own order (NCCL's abort was
            # collective in some versions), so megatron's groups are only forgotten here
            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
