"""Patch-stage checkpoint (any TP/PP/V) -> token-stage starting checkpoint (any TP/PP/V).

Only the weights travel: the optimizer, the LR schedule and the RNG states are dropped, and the
result is iteration 0 of the token stage (start it with ``--stage token --pretrained-checkpoint
DST``). Patch mode adds no parameter, so the weights are a plain GPT's; resharding is megatron's
own: the source is loaded into a model built at the target layout (dist_checkpointing reshards
on load) and saved from there. V, the virtual pipeline stages per rank, is part of the layout:
each tensor is keyed by its global name (layers by their global number), so only the nesting of
the state dict (``model`` or ``model0``, ``model1``, ...) depends on it.

Output layout (a ``--save`` root, readable by ``--pretrained-checkpoint`` and ``--load`` tools)::

    DST/latest_checkpointed_iteration.txt     "0"
    DST/iter_0000000/                          dist_checkpointing files, model weights only
    DST/iter_0000000/megatron_patch.json       progress.stage "token", stage_iteration 0, and a
                                               "conversion" entry (source, K, lambda, tokens, layout)

The source holds patch-stage weights: a patch-stage checkpoint, or a converted one (converted
again to change its layout; its ``conversion`` entry's source stage is carried forward and the
entry itself kept as ``previous_conversion``).

The converted checkpoint checks itself before it is renamed into place: the logits of the
source loaded at TP=1 PP=1 (the reference: every rank holds the whole model, in fp32) and the
logits of the converted checkpoint re-read from disk at the target layout (fp32) must agree on a
fixed batch within ``tolerance`` (max absolute difference).

A write that fails (a full disk, a folder without permission: in megatron's write of the shards,
the manifest, the metadata, the tracker or the final rename) is one CheckpointError, the same on
every rank; the staged folder is removed and ``--save`` is left as it was. One exception:
megatron-core 0.16.1 writes ``common.pt`` on rank 0 alone before its collectives, so a failure
there is rank 0's line while the other ranks wait in megatron's save until the launcher (torchrun)
ends them (the trainer's saves share this).
"""

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from megatron_patch.architecture.build import padded_vocab_size
from megatron_patch.checkpoint import folders, manifest
from megatron_patch.checkpoint import info as checkpoint_info
from megatron_patch.checkpoint import store as ckpt
from megatron_patch.checkpoint.model_record import describe_layout, layout_of
from megatron_patch.errors import ArgumentError, CheckpointError, VerificationError, last_line
from megatron_patch.evaluation.logits import fixed_tokens, forward_logits
from megatron_patch.runtime import atomic_file
from megatron_patch.runtime.parallel import collective_device
from megatron_patch.runtime.rank_zero import on_rank_zero
from megatron_patch.runtime.staged_folder import StagedFolder, check_output_folder

logger = logging.getLogger(__name__)

VERIFY_BATCH = 2
VERIFY_MAX_LENGTH = 64  # tokens per verification sequence (capped by T)


@dataclass
class ConversionPlan:
    """What to convert and where: target layout, output folder, check tolerance."""

    source: checkpoint_info.CheckpointInfo
    save: str  # absolute output folder
    tensor_parallel: int
    pipeline_parallel: int
    tolerance: float = 1e-3
    make_vocab_size_divisible_by: Optional[int] = None  # default: the source run's
    tokenizer_vocab_size: Optional[int] = None
    verify: bool = True  # check the source's files against its manifest before loading
    virtual_pipeline: Optional[int] = None  # target V (None: one chunk per rank)
    layers_per_virtual_stage: Optional[int] = None  # or the target's layers per virtual stage
    force: bool = False  # replace an existing output folder (a tool's output, never the source)

    def __post_init__(self) -> None:
        if not self.tolerance >= 0:
            raise ArgumentError(f"--tolerance {self.tolerance} must be >= 0 (max absolute logit difference)")
        self.virtual_pipeline = checkpoint_info.check_layout(
            self.source,
            self.tensor_parallel,
            self.pipeline_parallel,
            self.virtual_pipeline,
            self.layers_per_virtual_stage,
        )
        self.layers_per_virtual_stage = None  # resolved into virtual_pipeline
        self._check_vocabulary_padding()
        self.check_replaceable(self.save)

    def check_replaceable(self, folder: str) -> None:
        """ArgumentError unless ``--force`` may replace ``folder`` (the source, a training run or other
        files than an earlier conversion's are never replaced)."""
        sources = (self.source.path, os.path.dirname(self.source.path))
        folders.check_replaceable(folder, "--save", sources, folders.CONVERTED_OUTPUT, folders.is_converted_output)

    def _check_vocabulary_padding(self) -> None:
        """The trainer at the target TP pads the tokenizer's vocabulary to a multiple of
        ``divisible_by * TP``; that must give the source's rows, or the token stage cannot load it."""
        if self.tokenizer_vocab_size is None:
            return
        divisible_by = self.make_vocab_size_divisible_by or self.source.divisible_by
        target = padded_vocab_size(self.tokenizer_vocab_size, divisible_by, self.tensor_parallel)
        if target != self.source.padded_vocab_size:
            raise ArgumentError(
                f"--tensor-model-parallel-size {self.tensor_parallel} pads the tokenizer's {self.tokenizer_vocab_size} "
                f"pieces to {target} rows (multiples of --make-vocab-size-divisible-by {divisible_by} x TP), but "
                f"checkpoint {self.source.path} has {self.source.padded_vocab_size}: pick a TP for which they "
                f"agree, or pass a --make-vocab-size-divisible-by that gives {self.source.padded_vocab_size} here "
                f"and in the token-stage run"
            )


@dataclass
class ConversionResult:
    checkpoint: str  # the converted checkpoint directory (DST/iter_0000000)
    max_abs_diff: float
    tolerance: float
    seconds: float
    metadata: dict = field(default_factory=dict)


def _layout(plan: ConversionPlan, world_size: int) -> dict:
    """The target layout as a checkpoint records it (``model_record.layout_of``)."""
    tp, pp = plan.tensor_parallel, plan.pipeline_parallel
    return layout_of(tp, pp, world_size // (tp * pp), plan.virtual_pipeline)


def _metadata(plan: ConversionPlan, world_size: int) -> dict:
    """The converted checkpoint's ``megatron_patch.json``."""
    source = plan.source
    progress = source.progress
    stage, complete = checkpoint_info.weights_stage(source.meta)  # a converted source's is its own source's
    tp, pp = plan.tensor_parallel, plan.pipeline_parallel
    args = dict(source.args)
    args.update(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=plan.virtual_pipeline,
        num_layers_per_virtual_pipeline_stage=None,
        world_size=world_size,
        data_parallel_size=world_size // (tp * pp),
        stage="token",
        pretrained_checkpoint=source.path,
        load=None,
        save=plan.save,
    )
    if plan.make_vocab_size_divisible_by:
        args["make_vocab_size_divisible_by"] = plan.make_vocab_size_divisible_by
    conversion = {
        "tool": "tools/convert_checkpoint.py",
        "source": source.path,
        "source_iteration": source.meta.get("iteration"),
        "source_stage": stage,
        "source_stage_complete": complete,
        "source_layout": source.layout,
        "patch_size": progress.get("patch_size", source.args.get("patch_size")),
        "patch_data_fraction": progress.get("patch_data_fraction", source.args.get("patch_data_fraction")),
        "consumed_tokens": progress.get("consumed_tokens", {}),
        "target_layout": _layout(plan, world_size),
        "dropped": ["optimizer", "opt_param_scheduler", "rng_state"],
        "previous_conversion": source.meta.get("conversion"),  # a chain of conversions stays traceable
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return {
        "format_version": ckpt.FORMAT_VERSION,
        "iteration": 0,
        "progress": {
            "stage": "token",
            "stage_iteration": 0,
            "stage_complete": False,
            "consumed_samples": 0,
            "patch_size": conversion["patch_size"],
            "patch_data_fraction": conversion["patch_data_fraction"],
            "consumed_tokens": dict(conversion["consumed_tokens"]),
            "seconds": dict(progress.get("seconds", {})),
        },
        "model_shape": dict(source.shape),
        "layout": conversion["target_layout"],
        "args": args,
        "conversion": conversion,
        "manifest": True,  # see store.save_checkpoint
    }


def _verify(plan: ConversionPlan, converted: str) -> float:
    """Max |logits(converted at target) - logits(source at TP=1 PP=1)| on a fixed batch (fp32)."""
    source = plan.source
    tokens = fixed_tokens(source.padded_vocab_size, VERIFY_BATCH, min(source.seq_length, VERIFY_MAX_LENGTH))
    reference_model = checkpoint_info.build_model(source, 1, 1, bf16=False)
    checkpoint_info.load_weights(reference_model, source, verify=False)  # checked when it was converted
    reference = forward_logits(reference_model, tokens, source.padded_vocab_size)
    del reference_model
    target_model = checkpoint_info.build_model(
        source, plan.tensor_parallel, plan.pipeline_parallel, bf16=False, virtual_pipeline=plan.virtual_pipeline
    )
    checkpoint_info.load_weights(target_model, source, converted)
    logits = forward_logits(target_model, tokens, source.padded_vocab_size)
    del target_model
    difference = torch.tensor(
        [(logits - reference).abs().max().item()], dtype=torch.float64, device=collective_device()
    )  # forward_logits returns CPU logits
    dist.broadcast(difference, src=0)  # rank 0's comparison is the verdict on every rank
    return difference.item()


@contextlib.contextmanager
def _writing(save: str):
    """Around writes of the output ``save``: an ``OSError`` or torch's CheckpointException (a full
    disk, a folder without permission) becomes the one-line CheckpointError naming ``save``, the
    cause and the fix. Rank 0's writes go through ``on_rank_zero`` and megatron's save fails on
    every rank, so every rank raises it (none is left waiting)."""
    try:
        yield
    except (OSError, CheckpointException) as error:  # torch's CheckpointException is a BaseException
        raise CheckpointError(
            f"writing the converted checkpoint {save} failed ({last_line(error)}): {save} is left as it was; "
            f"free space (or fix permissions) in {os.path.dirname(save)}, then run the conversion again"
        ) from None


def _write_metadata(checkpoint: str, meta: dict) -> None:
    """Write ``checkpoint``'s ``megatron_patch.json`` (rank 0's work)."""
    atomic_file.write_json(os.path.join(checkpoint, folders.METADATA), meta, sort_keys=True)


def _write_records(root: str, checkpoint: str, meta: dict) -> None:
    """Write ``checkpoint``'s metadata and ``root``'s tracker naming iteration 0 (rank 0's work)."""
    _write_metadata(checkpoint, meta)
    atomic_file.write_text(os.path.join(root, folders.TRACKER), "0\n")


def convert(plan: ConversionPlan) -> ConversionResult:
    """Reshard ``plan.source``'s weights to the target layout, check them, publish ``plan.save``.

    Collective: every rank of the world calls it. Raises VerificationError (nothing written)
    when the logits differ by more than the tolerance, and CheckpointError (the same on every
    rank, nothing written) when a write of the output fails (:func:`_writing`).
    """
    start = time.perf_counter()
    world_size = dist.get_world_size()
    checkpoint_info.check_world(world_size, plan.tensor_parallel, plan.pipeline_parallel)
    checkpoint_info.check_same_checkpoints([plan.source])
    source = plan.source
    logger.info(
        "converting %s (%s stage, %s, model %s) to %s in %s",
        source.path,
        source.progress.get("stage"),
        describe_layout(source.layout),
        source.preset.name,
        describe_layout(_layout(plan, world_size)),
        plan.save,
    )
    stage, complete = checkpoint_info.weights_stage(source.meta)
    if stage == "patch" and complete is False:
        logger.warning(
            "%s is from the middle of the patch stage (iteration %s of it)",
            source.path,
            source.progress.get("stage_iteration"),
        )
    with StagedFolder(plan.save, force=plan.force, check_replace=plan.check_replaceable) as staged:
        partial_ckpt = folders.checkpoint_dir(staged.path, 0)
        model = checkpoint_info.build_model(
            source, plan.tensor_parallel, plan.pipeline_parallel, virtual_pipeline=plan.virtual_pipeline
        )
        checkpoint_info.load_weights(model, source, verify=plan.verify)
        meta = _metadata(plan, world_size)
        with _writing(plan.save):
            on_rank_zero(os.makedirs, partial_ckpt)
            ckpt.write_sharded(ckpt.model_sharded_state(model), partial_ckpt)
            del model
            dist.barrier()
            manifest.write_manifest(partial_ckpt)  # collective: each rank checksums its own shards
            on_rank_zero(_write_records, staged.path, partial_ckpt, meta)  # every rank waits for them
        difference = _verify(plan, staged.path)
        logger.info(
            "max |logits(converted, %s) - logits(source, TP=1 PP=1)| = %.3e (tolerance %.1e)",
            describe_layout(_layout(plan, world_size)),
            difference,
            plan.tolerance,
        )
        if not difference <= plan.tolerance:
            raise VerificationError(
                f"converted checkpoint disagrees with {source.path}: max absolute logit difference {difference:.3e} "
                f"> --tolerance {plan.tolerance:.1e}; nothing was written to {plan.save}"
            )
        meta["conversion"].update(max_abs_logit_diff=difference, tolerance=plan.tolerance)
        with _writing(plan.save):
            on_rank_zero(_write_metadata, partial_ckpt, meta)  # the check recorded before publishing
            staged.commit()
    return ConversionResult(
        folders.checkpoint_dir(plan.save, 0), difference, plan.tolerance, time.perf_counter() - start, meta
    )


def check_patch_weights(source: checkpoint_info.CheckpointInfo, load: str) -> None:
    """CheckpointError unless ``source``, the checkpoint ``--load`` names, holds the patch stage's
    weights (its own, or those of the checkpoint an earlier conversion read): the token stage
    starts from no other (the trainer's ``--pretrained-checkpoint`` check). The line names the
    run's last patch-stage checkpoint when its folder holds one."""
    stage, _ = checkpoint_info.weights_stage(source.meta)
    if stage == "patch":
        return
    named = load if os.path.normpath(load) == source.path else f"{load} (its latest checkpoint {source.path})"
    boundary = checkpoint_info.patch_stage_end(os.path.dirname(source.path))
    fix = (
        f"pass --load {boundary}, the run's last patch-stage checkpoint"
        if boundary
        else "pass the patch stage's last checkpoint (its --save's iter_N at the stage boundary, which pruning keeps)"
    )
    raise CheckpointError(
        f"--load {named} holds {stage}-stage weights, and the token stage starts from the patch stage's: {fix}"
    )


def plan_from_flags(
    load: str,
    save: str,
    tensor_parallel: int,
    pipeline_parallel: int,
    *,
    force: bool,
    tolerance: float,
    model: Optional[str] = None,
    tokenizer_model: Optional[str] = None,
    make_vocab_size_divisible_by: Optional[int] = None,
    verify: bool = True,
    virtual_pipeline: Optional[int] = None,
    layers_per_virtual_stage: Optional[int] = None,
) -> ConversionPlan:
    """Check the flags against the source checkpoint and its tokenizer (no distributed call);
    ArgumentError/CheckpointError/DataError."""
    info = checkpoint_info.read_checkpoint(load, "--load", model)
    check_patch_weights(info, load)
    final = check_output_folder(save, force, "--save")
    if make_vocab_size_divisible_by is not None and make_vocab_size_divisible_by < 1:
        raise ArgumentError(f"--make-vocab-size-divisible-by {make_vocab_size_divisible_by} must be >= 1")
    tokenizer = checkpoint_info.load_tokenizer([info], tokenizer_model)
    checkpoint_info.check_tokenizer(tokenizer, info)  # the model's own, before the target's padding is checked
    return ConversionPlan(
        info,
        final,
        tensor_parallel,
        pipeline_parallel,
        tolerance=tolerance,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        tokenizer_vocab_size=tokenizer.vocab_size,
        verify=verify,
        virtual_pipeline=virtual_pipeline,
        layers_per_virtual_stage=layers_per_virtual_stage,
        force=force,
    )
