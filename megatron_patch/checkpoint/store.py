"""Checkpoints through megatron's dist_checkpointing (torch_dist), written atomically.

Layout of ``--save DIR``::

    DIR/latest_checkpointed_iteration.txt   the tracker: the newest complete checkpoint
    DIR/iter_0000100/                        one checkpoint (dist_checkpointing files)
    DIR/iter_0000100/megatron_patch.json     progress, model shape and arguments (plain JSON)

A checkpoint is written to ``iter_N.tmp`` and renamed to ``iter_N`` only after every rank has
finished; the tracker is then replaced atomically. An interrupted save therefore leaves the
previous checkpoint and a tracker pointing to it. Existing checkpoints are never overwritten.
"""

import json
import logging
import os
import shutil
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from torch.distributed.checkpoint.api import CheckpointException

from megatron_patch.training.builders import (
    prepare_optimizer_state_for_loading,
    restore_adam_step_counters,
    unwrap,
)

logger = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
METADATA = "megatron_patch.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or of another model (one-line message)."""


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_tracker(root: str) -> Optional[int]:
    """The iteration the tracker names, or None when ``root`` holds no checkpoint yet."""
    path = os.path.join(root, TRACKER)
    if not os.path.exists(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path}: tracker holds {text!r}, not an iteration number; fix or delete it")
    return int(text)


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory from either a ``--save`` root (via its tracker) or a checkpoint itself."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path}: no such directory")
    if os.path.exists(os.path.join(path, METADATA)):
        return path
    iteration = read_tracker(path)
    if iteration is None:
        raise CheckpointError(f"{path} holds no checkpoint (no {TRACKER} or {METADATA}): point at a --save directory")
    found = checkpoint_dir(path, iteration)
    if not os.path.exists(os.path.join(found, METADATA)):
        raise CheckpointError(f"{found}: named by {TRACKER} but missing or incomplete; restore it or fix the tracker")
    return found


def read_metadata(ckpt: str) -> dict:
    path = os.path.join(ckpt, METADATA)
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({error}); the checkpoint is corrupt") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    return meta


def model_shape(args, vocab_size: int) -> dict:
    """What must agree between a checkpoint and the model loading it."""
    from megatron_patch.architecture.presets import get_preset

    preset = get_preset(args.model)
    return {
        "num_layers": preset.num_layers,
        "hidden_size": preset.hidden_size,
        "ffn_hidden_size": preset.ffn_hidden_size,
        "num_attention_heads": preset.num_attention_heads,
        "num_query_groups": preset.num_query_groups or preset.num_attention_heads,
        "vocab_size": vocab_size,
    }


def check_model_shape(ckpt: str, meta: dict, expected: dict) -> None:
    saved = meta.get("model_shape", {})
    diffs = [f"{key} {saved.get(key)} vs {value}" for key, value in expected.items() if saved.get(key) != value]
    if diffs:
        raise CheckpointError(
            f"checkpoint {ckpt} is of another model shape ({'; '.join(diffs)} here): "
            f"use the checkpoint's --model preset and tokenizer"
        )


def _layout():
    return (
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_data_parallel_world_size(),
    )


def _rng_object(data) -> ShardedObject:
    offset = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
    )
    return ShardedObject("rng_state", data, _layout(), offset, replica_id=0)


def _rng_states() -> dict:
    from megatron.core import tensor_parallel

    states = {"cpu": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _sharded_state(model, optimizer=None, scheduler=None, with_rng=False, is_loading=False) -> dict:
    state = {"model": unwrap(model[0]).sharded_state_dict()}
    if optimizer is not None:
        # dp_reshardable: every rank writes its own optimizer shard, no gather; a resume keeps the
        # layout (conversions drop the optimizer), so resharding across data parallelism suffices
        state["optimizer"] = optimizer.sharded_state_dict(
            state["model"], is_loading=is_loading, metadata={"distrib_optim_sharding_type": "dp_reshardable"}
        )
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    if with_rng:
        state["rng_state"] = _rng_object(None if is_loading else _rng_states())
    return state


def save_checkpoint(root, iteration, model, optimizer, scheduler, progress, args, shape, keep_last) -> str:
    """Write ``root/iter_N`` atomically on every rank; returns its path. Skips an existing ``iter_N``
    (the checkpoint this run resumed from, identical by construction)."""
    final = checkpoint_dir(root, iteration)
    rank = dist.get_rank()
    if os.path.exists(final):
        logger.info("checkpoint %s exists (resumed from it); not writing it again", final)
        return final
    partial_dir = final + ".tmp"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(partial_dir, ignore_errors=True)
        os.makedirs(partial_dir)
    dist.barrier()
    dist_checkpointing.save(_sharded_state(model, optimizer, scheduler, with_rng=True), partial_dir)
    dist.barrier()
    if rank == 0:
        meta = {
            "format_version": FORMAT_VERSION,
            "iteration": iteration,
            "progress": progress,
            "model_shape": shape,
            "layout": dict(zip(("pipeline", "tensor", "data"), _layout())),
            "args": {key: value for key, value in vars(args).items() if _is_plain(value)},
        }
        _write_atomic(os.path.join(partial_dir, METADATA), json.dumps(meta, indent=1, sort_keys=True))
        os.replace(partial_dir, final)
        _write_atomic(os.path.join(root, TRACKER), f"{iteration}\n")
        _prune(root, keep_last)
    dist.barrier()
    logger.info("saved checkpoint %s", final)
    return final


def _is_plain(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool)) or (
        isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value)
    )


def _write_atomic(path: str, text: str) -> None:
    partial = path + ".tmp"
    with open(partial, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def _prune(root: str, keep_last: int) -> None:
    if keep_last <= 0:
        return
    complete = sorted(
        name for name in os.listdir(root)
        if name.startswith("iter_") and not name.endswith(".tmp") and os.path.exists(os.path.join(root, name, METADATA))
    )
    for name in complete[:-keep_last]:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def load_checkpoint(path, model, shape, optimizer=None, scheduler=None, restore_rng=True) -> dict:
    """Load model weights (and, when given, optimizer, scheduler and RNG) from ``path`` (a ``--save``
    root or one checkpoint). Returns the checkpoint's metadata (``progress`` and ``args``)."""
    ckpt = resolve_checkpoint(path)
    meta = read_metadata(ckpt)
    check_model_shape(ckpt, meta, shape)
    same_layout = meta.get("layout") == dict(zip(("pipeline", "tensor", "data"), _layout()))
    with_rng = restore_rng and same_layout
    if optimizer is not None:
        prepare_optimizer_state_for_loading(optimizer)
    request = _sharded_state(model, optimizer, scheduler, with_rng=with_rng, is_loading=True)
    try:
        state = dist_checkpointing.load(request, ckpt)
    except (Exception, CheckpointException) as error:  # torch's CheckpointException is a BaseException
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        cause = lines[-1][:200] if lines else type(error).__name__
        raise CheckpointError(f"checkpoint {ckpt} could not be loaded ({cause}): it is corrupt "
                              f"or incomplete; load an earlier one") from None
    unwrap(model[0]).load_state_dict(state["model"], strict=True)
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
