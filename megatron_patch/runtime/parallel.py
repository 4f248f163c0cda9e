"""Process groups: torch.distributed and megatron's model-parallel state, on GPU or CPU, and the
virtual pipeline stages (model chunks) of a rank.

With V virtual stages (megatron's interleaved schedule), each of the PP ranks holds V model
chunks of L/(PP*V) layers: chunk v of rank p runs global stage v*PP + p. megatron's interleaved
schedule takes one data iterator per chunk and needs the micro-batches of a step in whole groups
of PP (``microbatch_group_size_per_vp_stage``, PP by default).
"""

import contextlib
import itertools
import logging
import os
from datetime import timedelta
from typing import Iterator, List, Optional, Union

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
    # megatron's recommendation for its TP/SP communication overlap, read when CUDA starts: set for
    # the trainer and the benchmarks alike, so their timings compare (a value set by the launcher
    # wins; on CPU it only silences megatron's reminder)
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    if cpu:
        cpu_mode.enable()
    elif not torch.cuda.is_available():
        raise ArgumentError("no CUDA device found: run with --cpu for CPU mode (gloo), or on a GPU node")
    if dist.is_initialized():
        return
    if "RANK" not in os.environ and "SLURM_STEP_NUM_TASKS" in os.environ and "MASTER_ADDR" in os.environ:
        # `srun python ...`, one task per GPU: SLURM's variables of the step name the rank (a batch
        # script's own shell has SLURM_PROCID and SLURM_NTASKS but no step: a python run there is alone)
        os.environ.update(
            RANK=os.environ["SLURM_PROCID"],
            WORLD_SIZE=os.environ["SLURM_STEP_NUM_TASKS"],
            LOCAL_RANK=os.environ["SLURM_LOCALID"],
        )
        os.environ.setdefault("MASTER_PORT", "29500")
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
        local_rank, visible = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local_rank >= visible and visible != 1:  # one visible GPU: a task of srun --gpus-per-task=1
            raise ArgumentError(
                f"local rank {local_rank} but this node shows {visible} GPU(s) (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start at most {visible} processes per node"
            )
        torch.cuda.set_device(local_rank if local_rank < visible else 0)
    dist.init_process_group(backend=backend, timeout=timeout)


def init_model_parallel(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    virtual_pipeline_parallel: Optional[int] = None,
    seed: int = 1234,
) -> None:
    """(Re)build megatron's model-parallel groups and seed every RNG stream (``seed_all``: each
    pipeline stage from its own seed).

    The world size must be a multiple of ``tensor_parallel * pipeline_parallel``; the rest is data
    parallelism. ``virtual_pipeline_parallel``: V model chunks per pipeline rank (None: one, the
    plain schedule). Safe to call again with another layout (tests switch TP/PP inside one world).
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


def resolve_virtual_pipeline(
    num_layers: int,
    pipeline_parallel: int,
    virtual_size: Optional[int] = None,
    layers_per_stage: Optional[int] = None,
    where: str = "",
) -> Optional[int]:
    """V, the virtual pipeline stages per pipeline rank, from megatron's flags: either
    ``--virtual-pipeline-model-parallel-size V`` or ``--num-layers-per-virtual-pipeline-stage N``
    (V = L / (PP * N)). None when neither is given or V is 1 (the plain schedule).

    Raises ``ArgumentError`` (one line, naming the flag values and the fix) unless V >= 1, PP > 1
    for V > 1, and PP * V divides the ``num_layers`` layers (``where``: the model they belong to,
    for the message).
    """
    if virtual_size is not None and layers_per_stage is not None:
        raise ArgumentError(
            f"--virtual-pipeline-model-parallel-size {virtual_size} and --num-layers-per-virtual-pipeline-stage "
            f"{layers_per_stage} say the same thing: give one"
        )
    per_rank = num_layers // pipeline_parallel  # layers of one pipeline rank (PP divides L: checked before)
    if layers_per_stage is not None:
        flag = f"--num-layers-per-virtual-pipeline-stage {layers_per_stage}"
        if layers_per_stage < 1 or per_rank % layers_per_stage:
            divisors = ", ".join(str(n) for n in range(1, per_rank + 1) if per_rank % n == 0)
            raise ArgumentError(
                f"{flag} does not divide the {per_rank} layers of each of the --pipeline-model-parallel-size "
                f"{pipeline_parallel} stages{where}: use one of {divisors}"
            )
        virtual_size = per_rank // layers_per_stage
    elif virtual_size is None:
        return None
    else:
        flag = f"--virtual-pipeline-model-parallel-size {virtual_size}"
        if virtual_size < 1:
            raise ArgumentError(f"{flag} must be >= 1 (1: the plain pipeline schedule)")
    if virtual_size == 1:
        return None
    if pipeline_parallel == 1:
        raise ArgumentError(
            f"{flag} needs --pipeline-model-parallel-size > 1 (virtual stages interleave the layers of "
            f"several pipeline ranks): raise PP or drop the flag"
        )
    if per_rank % virtual_size:
        choices = [str(v) for v in range(2, per_rank + 1) if per_rank % v == 0]
        fix = f"use one of {', '.join(choices)}" if choices else "drop the flag (one layer per pipeline rank)"
        raise ArgumentError(
            f"{flag}: --pipeline-model-parallel-size {pipeline_parallel} x {virtual_size} virtual stages does "
            f"not divide the {num_layers} layers{where}: {fix}"
        )
    return virtual_size


def chunk_iterators(iterator: Iterator, model: List[torch.nn.Module]) -> Union[Iterator, List[Iterator]]:
    """The ``data_iterator`` argument of megatron's schedules for ``model`` (this rank's chunks).

    One chunk: ``iterator`` itself. V chunks: V iterators over the same micro-batches, as the
    interleaved schedule expects one per chunk; each chunk's forward reads every micro-batch once,
    in order (the first chunk its tokens, the last its labels). The copies share one source, so
    the micro-batches are read once; the source advances by one step's micro-batches per schedule
    run, as with one chunk.
    """
    if len(model) == 1:
        return iterator
    return list(itertools.tee(iterator, len(model)))


def microbatch_multiple(model: List[torch.nn.Module]) -> int:
    """What the micro-batches of one schedule run must be a multiple of: PP with virtual stages
    (megatron's interleaved schedule runs them in groups of PP), else 1."""
    if len(model) == 1:
        return 1
    return parallel_state.get_pipeline_model_parallel_world_size()


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


PIPELINE_SEED_STRIDE = 100  # Megatron-LM's _set_random_seed: seed + 100 x pipeline rank


def seed_all(seed: int) -> None:
    """Seed torch (CPU and CUDA) and megatron's model-parallel RNG tracker for this rank.

    Each pipeline stage draws from its own streams, seeded ``seed + 100 * pipeline rank`` as in
    Megatron-LM (its ``_set_random_seed``); otherwise every stage would initialise its layers from
    the same random numbers. Tensor- and data-parallel ranks of one stage share the seed (megatron's
    tracker then offsets the tensor-parallel stream per TP rank). Call after megatron's groups exist
    (``init_model_parallel`` does); without them the rank counts as pipeline rank 0.
    """
    pipeline_rank = 0
    if parallel_state.model_parallel_is_initialized():
        pipeline_rank = parallel_state.get_pipeline_model_parallel_rank()
    stage_seed = seed + PIPELINE_SEED_STRIDE * pipeline_rank
    if cpu_mode.is_enabled():
        cpu_mode.seed_model_parallel_rng(stage_seed)
    else:
        torch.manual_seed(stage_seed)
        tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


@contextlib.contextmanager
def distributed_world(cpu: bool, timeout_minutes: int = 30) -> Iterator[int]:
    """Join (or form) the process group for a command's lifetime; yields the world size.

    A group this call created is torn down at the end, megatron's model-parallel state with it; a
    group that already existed (a test session, a tool called from another tool) is left alone.
    In CPU mode every ``torch.compile``'d function (megatron's ``jit_fuser``: the opt-in fusions)
    runs eagerly inside the context, also those wrapped at import, before it began, and those
    already compiled: torch's ``force_eager`` stance, restored at the end.
    Raises ArgumentError when the world cannot be formed (no GPU without CPU mode, CPU mode beside
    a GPU).
    """
    owns_process_group = not dist.is_initialized()
    # TORCHDYNAMO_DISABLE set here would come too late: it only acts when torch.compile wraps a function
    eager = torch.compiler.set_stance("force_eager") if cpu else contextlib.nullcontext()
    with eager:
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
