"""Checkpoints through megatron's dist_checkpointing (torch_dist), written atomically.

Layout of ``--save DIR`` (its folders and tracker: ``folders.py``)::

    DIR/latest_checkpointed_iteration.txt   the tracker: the newest complete checkpoint
    DIR/iter_0000100/                        one checkpoint (dist_checkpointing files)
    DIR/iter_0000100/megatron_patch.json     progress, model shape and arguments (plain JSON)
    DIR/iter_0000100/manifest.json           every file's size and CRC-32 (``manifest.py``)

A checkpoint is written to ``iter_N.tmp`` and renamed to ``iter_N`` only after every rank has
finished; the tracker is then replaced atomically. An interrupted save therefore leaves the
previous checkpoint and a tracker pointing to it; a kill between the rename and the tracker
write leaves a complete ``iter_N`` newer than the tracker, which resuming takes (and the next
save's tracker write names). Every file of the checkpoint, and the ``--save`` folder after the
rename, are flushed to disk before the tracker is written, so a power loss cannot leave a tracker
naming a checkpoint the disk lacks. Existing complete checkpoints are never overwritten. Loading checks
the files against the manifest first (``verify=False`` skips that).

Data-parallel replicas hold the same model weights (and, without the distributed optimizer, the
same optimizer state). By default each replicated shard is written by one replica, the shards
spread evenly over them (megatron's fully parallel save, as Megatron-LM's
``--ckpt-fully-parallel-save``), so no single rank writes the whole replicated state while the
others wait; ``fully_parallel_load`` likewise has each replica read a share and exchange the rest
over the data-parallel group. Either way the files are the same ``torch_dist`` checkpoint, loadable
at any layout.

Saving (the trainer's and the conversion tool's, through ``write_sharded``) runs in this process:
megatron's torch_dist writer would otherwise collect its results through a ``multiprocessing``
Manager process that a SIGTERM to the process group kills, which made the save on the pre-emption
path fail (``_use_write_results_queue``). With ``--async-save`` the shards are written by a forked
process while training goes on, and the checkpoint is completed (metadata, manifest, rename,
tracker) once every rank's writer has ended (``async_save.py``).
"""

import functools
import json
import logging
import os
import queue
import shutil
import time
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import (
    get_default_load_sharded_strategy,
    get_default_save_sharded_strategy,
)
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelLoadStrategyWrapper,
    FullyParallelSaveStrategyWrapper,
)
from torch.distributed.checkpoint.api import CheckpointException

from megatron_patch.architecture.build import unwrap
from megatron_patch.checkpoint import manifest
from megatron_patch.checkpoint.async_save import PendingSave, failed_save
from megatron_patch.checkpoint.folders import (
    METADATA,
    TRACKER,
    checkpoint_dir,
    prune,
    remove_partial_saves,
    repair_tracker,
    resolve_checkpoint,
)
from megatron_patch.checkpoint.model_record import check_model_shape, describe_layout, layout_record, parallel_sizes
from megatron_patch.errors import CheckpointError, last_line
from megatron_patch.runtime import atomic_file
from megatron_patch.runtime.rank_zero import on_rank_zero
from megatron_patch.training.builders import (
    prepare_optimizer_state_for_loading,
    restore_adam_step_counters,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
# what dist_checkpointing's torch_dist format needs besides the ranks' __R_I.distcp shards
REQUIRED_FILES = ("common.pt", "metadata.json", ".metadata")


def read_metadata(ckpt: str) -> dict:
    path = os.path.join(ckpt, METADATA)
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({error}); the checkpoint is corrupt") from None
    if not isinstance(meta, dict):
        raise CheckpointError(
            f"{path}: holds a JSON {type(meta).__name__}, not checkpoint metadata; the checkpoint is corrupt"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    return meta


def model_keys(model) -> list:
    """Keys of the model chunks in a checkpoint's state dict, as Megatron-LM names them: ``model``
    for one chunk, ``model0``, ``model1``, ... for one per virtual pipeline stage. Only the
    nesting differs: inside, dist_checkpointing keys each tensor by its global name (transformer
    layers by their global layer number), so a checkpoint loads at any PP and V whatever it was
    saved at."""
    return ["model"] if len(model) == 1 else [f"model{index}" for index in range(len(model))]


def model_sharded_state(model) -> dict:
    """``{key: sharded state dict}`` of every model chunk (``model_keys``)."""
    return {key: unwrap(chunk).sharded_state_dict() for key, chunk in zip(model_keys(model), model)}


def _rng_object(data) -> ShardedObject:
    offset = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
    )
    return ShardedObject("rng_state", data, parallel_sizes(), offset, replica_id=0)


def _rng_states() -> dict:
    from megatron.core import tensor_parallel

    states = {"cpu": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _sharded_state(model, optimizer=None, scheduler=None, with_rng=False, is_loading=False) -> dict:
    state = model_sharded_state(model)
    if optimizer is not None:
        # dp_reshardable: every rank writes its own optimizer shard, no gather; a resume keeps the
        # layout (conversions drop the optimizer), so resharding across data parallelism suffices.
        # The optimizer finds its parameters' sharded keys in every chunk's state.
        state["optimizer"] = optimizer.sharded_state_dict(
            dict(state), is_loading=is_loading, metadata={"distrib_optim_sharding_type": "dp_reshardable"}
        )
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    if with_rng:
        state["rng_state"] = _rng_object(None if is_loading else _rng_states())
    return state


def _data_parallel_group():
    """The group of this rank's data-parallel replicas, or None when there is only one."""
    if parallel_state.get_data_parallel_world_size(with_context_parallel=True) == 1:
        return None
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def save_strategy(fully_parallel: bool = True):
    """The sharded save strategy for ``dist_checkpointing.save``: with ``fully_parallel`` and more
    than one data-parallel replica, torch_dist wrapped so the replicas share the writing of
    replicated shards; otherwise None (dist_checkpointing's default, torch_dist)."""
    group = _data_parallel_group()
    if not fully_parallel or group is None:
        return None
    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), group)


def load_strategy(ckpt: str, fully_parallel: bool = False):
    """The sharded load strategy for ``ckpt``: with ``fully_parallel`` and more than one
    data-parallel replica, each replica reads a share of the replicated shards and receives the rest
    from the others; otherwise None (the strategy the checkpoint names)."""
    group = _data_parallel_group()
    if not fully_parallel or group is None:
        return None
    return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(ckpt), group)


def write_sharded(state: dict, folder: str, fully_parallel: bool = True) -> None:
    """Write the sharded ``state`` into the existing ``folder`` (collective, every rank) in this
    process: the one call of ``dist_checkpointing.save`` for the trainer's checkpoints and the
    conversion tool's. ``fully_parallel``: see :func:`save_strategy`."""
    _use_write_results_queue(queue.SimpleQueue())
    dist_checkpointing.save(state, folder, save_strategy(fully_parallel))


def save_checkpoint(
    root,
    iteration,
    model,
    optimizer,
    scheduler,
    progress,
    flags,
    shape,
    keep_last,
    fully_parallel=True,
    retain=(),
    pending: Optional[PendingSave] = None,
) -> Optional[str]:
    """Write ``root/iter_N`` atomically on every rank; returns its path, or None where a complete
    ``iter_N`` exists (the checkpoint this run resumed from, identical by construction), which is
    kept. Then only the ``keep_last`` newest checkpoints are kept (0: all), besides those of the
    iterations in ``retain``, which are never removed. ``fully_parallel``: see :func:`save_strategy`.

    With ``pending`` the save first waits for the one in flight, then hands the writing of the
    shards to a forked process and returns; ``pending`` completes the checkpoint later
    (``async_save.py``). The returned path is then where the checkpoint will be."""
    if pending is not None:
        pending.wait()  # its completion removes partial saves: it must not meet this one's
    started = time.perf_counter()
    final = checkpoint_dir(root, iteration)
    if on_rank_zero(_existing, root, final):  # rank 0's view of the shared folder decides for all
        logger.info("checkpoint %s exists and is complete; not writing it again", final)
        return None
    partial_dir = final + ".tmp"
    meta = {
        "format_version": FORMAT_VERSION,
        "iteration": iteration,
        "progress": progress,
        "model_shape": shape,
        "layout": layout_record(model),
        "args": {key: value for key, value in flags.items() if _is_plain(value)},
        "manifest": True,  # written with one: loading refuses the checkpoint without it (check_files)
    }
    state = _sharded_state(model, optimizer, scheduler, with_rng=True)
    complete = functools.partial(_complete_save, root, partial_dir, final, meta, keep_last, tuple(retain))
    try:
        on_rank_zero(_new_partial_dir, root, partial_dir)
        if pending is None:
            write_sharded(state, partial_dir, fully_parallel)
            complete()
        else:
            _use_write_results_queue(pending.results_queue())
            request = dist_checkpointing.save(
                state, partial_dir, save_strategy(fully_parallel), async_sharded_save=True
            )
            pending.start(request, complete, final, started)
    except (OSError, CheckpointException) as error:  # torch's CheckpointException is a BaseException
        raise failed_save(final, error) from None
    return final


def _new_partial_dir(root: str, partial_dir: str) -> None:
    """An empty ``partial_dir`` (one left by a killed save of the same iteration is replaced)."""
    os.makedirs(root, exist_ok=True)
    shutil.rmtree(partial_dir, ignore_errors=True)
    os.makedirs(partial_dir)


def _complete_save(root, partial_dir, final, meta, keep_last, retain) -> None:
    """After every rank's shards are written: the metadata, the manifest, the rename, the tracker,
    the removal of killed saves and pruning (collective). An ``OSError`` of any rank (a full disk)
    is the same one-line CheckpointError on every rank, and leaves the checkpoint an ``iter_N.tmp``."""
    dist.barrier()
    try:
        on_rank_zero(
            functools.partial(atomic_file.write_json, sort_keys=True), os.path.join(partial_dir, METADATA), meta
        )
        manifest.write_manifest(partial_dir)  # every rank checksums its own shards
        on_rank_zero(_publish, root, partial_dir, final, meta["iteration"], keep_last, retain)
    except OSError as error:
        raise failed_save(final, error) from None


def _publish(root, partial_dir, final, iteration, keep_last, retain) -> None:
    """Rename the complete ``partial_dir`` into place, point the tracker at it, then remove killed
    saves and prune (rank 0's work)."""
    os.replace(partial_dir, final)
    atomic_file.sync_folder(root)  # the rename on disk before the tracker names it
    atomic_file.write_text(os.path.join(root, TRACKER), f"{iteration}\n")
    remove_partial_saves(root)
    prune(root, keep_last, retain)


def _existing(root: str, final: str) -> bool:
    """True when ``final`` is a complete checkpoint (then the tracker is made to name the newest
    complete one); an incomplete ``final`` (no metadata: not written by this code) is an error."""
    if not os.path.exists(final):
        return False
    if not os.path.exists(os.path.join(final, METADATA)):
        raise CheckpointError(
            f"{final} exists but holds no {METADATA} (not a complete checkpoint): move it away "
            f"or delete it, then resume"
        )
    repair_tracker(root)
    return True


def _use_write_results_queue(results) -> None:
    """Set the queue megatron's torch_dist writer returns each save's write results through.

    megatron-core 0.16.1 (``strategies/filesystem_async.py``) takes it from a module global that it
    fills, at the first save, with the queue of a ``multiprocessing`` Manager it spawns; that
    helper lives in the trainer's process group until the trainer exits, so a SIGTERM to the group
    (scancel, a time limit, torchrun's forwarding) kills it and the save on the pre-emption path
    fails with BrokenPipeError; a kill -9 of the trainer leaves it running. A synchronous save puts
    and gets the results in this process (its forked writers report through a queue of their own),
    so it is given a plain queue; an async save's writer is a forked process, so it is given the
    queue of the Manager that ``async_save.results_queue`` starts with the stop signals ignored.
    """
    filesystem_async._results_queue = results


def _is_plain(value) -> bool:
    return (
        value is None
        or isinstance(value, (str, int, float, bool))
        or (isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value))
    )


def check_files(ckpt: str, verify: bool = True, meta: Optional[dict] = None) -> None:
    """CheckpointError (one line, on every rank alike) unless ``ckpt`` holds the files
    dist_checkpointing reads and, with ``verify``, every file matches the checkpoint's manifest
    (size and CRC-32, the files split over the ranks), which a checkpoint whose metadata says it
    was written with one must have (one without it was copied in part; ``meta``: its metadata, when
    the caller has read it already). Collective when ``verify`` is set."""
    if verify:
        meta = read_metadata(ckpt) if meta is None else meta
        try:
            manifest.verify(ckpt, required=meta.get("manifest") is True)
        except manifest.ManifestError as error:
            raise CheckpointError(str(error)) from None
    for name in REQUIRED_FILES:
        if not os.path.isfile(os.path.join(ckpt, name)):
            raise CheckpointError(
                f"{os.path.join(ckpt, name)} is missing (deleted or never written): the checkpoint "
                f"is incomplete; load an earlier one"
            )


def _check_optimizer_layout(ckpt: str, meta: dict, layout: dict, optimizer) -> None:
    """The distributed optimizer's state (saved ``dp_reshardable``) resumes across data
    parallelism only: CheckpointError when the tensor, pipeline or virtual pipeline sizes differ."""
    saved = meta.get("layout") or {}
    distributed = bool(meta.get("args", {}).get("use_distributed_optimizer")) or bool(
        getattr(getattr(optimizer, "config", None), "use_distributed_optimizer", False)
    )
    model_parallel = ("tensor", "pipeline", "virtual_pipeline")
    if distributed and any(saved.get(key) != layout.get(key) for key in model_parallel):
        raise CheckpointError(
            f"checkpoint {ckpt} was saved at {describe_layout(saved)} with the distributed optimizer, whose state "
            f"resumes at the same tensor and pipeline sizes only (this run: {describe_layout(layout)}): resume at "
            f"{describe_layout(saved)}"
        )


def load_checkpoint(
    path, model, shape, optimizer=None, scheduler=None, restore_rng=True, verify=True, fully_parallel=False
) -> dict:
    """Load model weights (and, when given, optimizer, scheduler and RNG) from ``path`` (a ``--save``
    root or one checkpoint). Returns the checkpoint's metadata (``progress`` and ``args``).

    With ``verify`` (the default) every file is first checked against the checkpoint's manifest
    (``manifest.py``: sizes and CRC-32, about 0.5 s per GB on the slowest rank), so a truncated or
    overwritten shard is named before dist_checkpointing reads it; ``verify=False`` skips that (the
    tools' ``--no-checkpoint-verify``). A checkpoint without a manifest loads with a warning.
    ``fully_parallel``: see :func:`load_strategy`."""
    ckpt = resolve_checkpoint(path)
    meta = read_metadata(ckpt)
    check_model_shape(ckpt, meta, shape)
    check_files(ckpt, verify, meta)
    same_layout = meta.get("layout") == layout_record(model)
    if optimizer is not None:
        _check_optimizer_layout(ckpt, meta, layout_record(model), optimizer)
    with_rng = restore_rng and same_layout
    if restore_rng and not same_layout and (not dist.is_initialized() or dist.get_rank() == 0):
        logger.info(
            "%s was saved at %s, this run is at %s: the RNG states (one per rank) are not restored, so dropout "
            "draws other masks than the uninterrupted run would",
            ckpt,
            describe_layout(meta.get("layout") or {}),
            describe_layout(layout_record(model)),
        )
    if optimizer is not None:
        prepare_optimizer_state_for_loading(optimizer)
    request = _sharded_state(model, optimizer, scheduler, with_rng=with_rng, is_loading=True)
    try:
        state = dist_checkpointing.load(request, ckpt, load_strategy(ckpt, fully_parallel))
    except (Exception, CheckpointException) as error:  # torch's CheckpointException is a BaseException
        raise CheckpointError(
            f"checkpoint {ckpt} could not be loaded ({last_line(error)}): it is corrupt "
            f"or incomplete; load an earlier one"
        ) from None
    for key, chunk in zip(model_keys(model), model):
        unwrap(chunk).load_state_dict(state[key], strict=True)
    if optimizer is not None:
        with torch.no_grad():  # the distributed optimizer copies into views of fp32 weights in place
            optimizer.load_state_dict(state["optimizer"])
        restore_adam_step_counters(optimizer)
    if scheduler is not None:
        scheduler.load_state_dict(state["opt_param_scheduler"])
    if with_rng:
        from megatron.core import tensor_parallel

        rng = state["rng_state"]
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
    logger.info("loaded %s from %s", "weights" if optimizer is None else "full state", ckpt)
    return meta
