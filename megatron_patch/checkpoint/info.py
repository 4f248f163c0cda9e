"""A checkpoint as the tools see it: its model, read from its metadata, built at any TP/PP.

The model shape comes from the checkpoint's ``megatron_patch.json`` (``args.model`` names the
preset, ``args.seq_length`` is T, ``model_shape.vocab_size`` the padded vocabulary), so the
tools never ask for flags the checkpoint already records. A ``--model`` given anyway must agree.
"""

import logging
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from megatron_patch.architecture.build import ModelSettings, build_model_chunks, padded_vocab_size
from megatron_patch.architecture.presets import ModelPreset, get_preset
from megatron_patch.architecture.presets import check_layout as check_preset_layout
from megatron_patch.architecture.specs import transformer_engine_available
from megatron_patch.checkpoint import folders
from megatron_patch.checkpoint import store as ckpt
from megatron_patch.checkpoint.model_record import check_model_shape, model_shape
from megatron_patch.errors import ArgumentError, CheckpointError, DataError
from megatron_patch.runtime import cpu_mode, parallel

logger = logging.getLogger(__name__)


@dataclass
class CheckpointInfo:
    """What the tools need to know about one checkpoint directory.

    Attributes:
        path: the checkpoint directory (``ROOT/iter_N`` or a converted checkpoint's).
        meta: its ``megatron_patch.json``.
        preset: the model preset it was trained with.
        seq_length: T, the positions the model saw in training (tokens at the token stage).
        padded_vocab_size: rows of the embedding and output layer (the tokenizer's vocabulary padded).
        bf16: whether its weights are stored in bf16 (else fp32).
    """

    path: str
    meta: dict
    preset: ModelPreset
    seq_length: int
    padded_vocab_size: int
    bf16: bool

    @property
    def args(self) -> dict:
        return self.meta.get("args", {})

    @property
    def shape(self) -> dict:
        return self.meta["model_shape"]

    @property
    def progress(self) -> dict:
        return self.meta.get("progress", {})

    @property
    def weights_stage(self) -> Optional[str]:
        """The stage that trained its weights ("patch" or "token"; None when unrecorded): for a
        converted checkpoint (token stage, iteration 0 in :attr:`progress`) its source's, see
        :func:`weights_stage`. What a tool reports as the checkpoint's stage."""
        return weights_stage(self.meta)[0]

    @property
    def conversion(self) -> Optional[dict]:
        """tools/convert_checkpoint.py's record of a converted checkpoint (its ``source`` and more);
        None for a checkpoint the trainer saved."""
        record = self.meta.get("conversion")
        return record if isinstance(record, dict) else None

    @property
    def layout(self) -> dict:
        return self.meta.get("layout", {})

    @property
    def tokenizer_model(self) -> Optional[str]:
        return self.args.get("tokenizer_model")

    @property
    def tokenizer_vocab_sha256(self) -> Optional[str]:
        """The trained tokenizer's :attr:`~megatron_patch.data.tokenizer.SentencePieceTokenizer.vocab_sha256`
        (None for checkpoints written before it was recorded)."""
        return self.args.get("tokenizer_vocab_sha256")

    @property
    def divisible_by(self) -> int:
        return int(self.args.get("make_vocab_size_divisible_by", 128))

    @property
    def trained_tensor_parallel(self) -> int:
        """The TP the checkpoint was saved at (its args, else its layout; 1 when it records neither):
        with :attr:`divisible_by`, the multiple its vocabulary was padded to."""
        return int(self.args.get("tensor_model_parallel_size", self.layout.get("tensor", 1)))

    @property
    def transformer_impl(self) -> str:
        return self.args.get("transformer_impl", "auto")


def read_checkpoint(path: str, flag: str = "--load", model: Optional[str] = None) -> CheckpointInfo:
    """Resolve ``path`` (a ``--save`` root or one checkpoint) and read its metadata.

    Raises ``CheckpointError`` for a missing or corrupt checkpoint and for one of another model
    shape than ``model`` (a preset name given on the command line), one line each.
    """
    if not path:
        raise ArgumentError(f"{flag} is empty: name a checkpoint folder")
    found = folders.resolve_checkpoint(path)
    meta = ckpt.read_metadata(found)
    file = os.path.join(found, folders.METADATA)
    args, shape = meta.get("args"), meta.get("model_shape")
    if not isinstance(args, dict) or not isinstance(shape, dict) or "model" not in args or "vocab_size" not in shape:
        raise CheckpointError(
            f"{file}: no args.model or model_shape.vocab_size; the checkpoint is corrupt "
            f"or was not written by megatron_patch"
        )
    try:
        preset = get_preset(args["model"])
    except ValueError as error:
        raise CheckpointError(f"{file}: {error}") from None
    vocab_size = int(shape["vocab_size"])
    # the metadata must describe the preset it names (else it was edited or is corrupt)
    check_model_shape(found, meta, model_shape(preset, vocab_size))
    if model is not None and model != preset.name:
        try:
            expected = model_shape(get_preset(model), vocab_size)
        except ValueError as error:
            raise ArgumentError(f"--model: {error}") from None
        check_model_shape(found, meta, expected)
        logger.warning("--model %s has the shape of the checkpoint's preset %s", model, preset.name)
    seq_length = int(args.get("seq_length") or preset.seq_length)
    return CheckpointInfo(found, meta, preset, seq_length, vocab_size, bool(args.get("bf16", False)))


def weights_stage(meta: dict) -> Tuple[Optional[str], Optional[bool]]:
    """(stage, stage complete) of the weights a checkpoint's metadata ``meta`` describes: its own
    progress, or for the conversion tool's output (iteration 0 of the token stage) the trainer's
    checkpoint it was converted from, followed through a chain of conversions."""
    conversion = meta.get("conversion")
    if not isinstance(conversion, dict):
        progress = meta.get("progress", {})
        return progress.get("stage"), progress.get("stage_complete")
    while isinstance(conversion.get("previous_conversion"), dict):  # the first one read the trainer's
        conversion = conversion["previous_conversion"]
    return conversion.get("source_stage"), conversion.get("source_stage_complete")


def patch_stage_end(root: str) -> Optional[str]:
    """The last patch-stage checkpoint of the run whose ``--save`` is ``root`` (at the stage
    boundary when the patch stage is complete: pruning keeps it), or None when it holds none."""
    for iteration in reversed(folders.complete_iterations(root)):
        found = folders.checkpoint_dir(root, iteration)
        try:
            meta = ckpt.read_metadata(found)
        except CheckpointError:
            continue
        if "conversion" not in meta and meta.get("progress", {}).get("stage") == "patch":
            return found
    return None


def check_tokenizer(tokenizer, info: CheckpointInfo) -> None:
    """ArgumentError unless ``tokenizer`` is the one ``info``'s model was trained with: its
    vocabulary pads to the model's rows and its pieces are the same, compared through the digest
    the checkpoint records or, for older checkpoints, with the recorded tokenizer file when it is
    at hand (else with a warning that they cannot be compared)."""
    from megatron_patch.data.tokenizer import SentencePieceTokenizer

    recorded, rows = info.tokenizer_model, info.padded_vocab_size
    padded = padded_vocab_size(tokenizer.vocab_size, info.divisible_by, info.trained_tensor_parallel)
    if tokenizer.vocab_size > rows or padded != rows:
        raise ArgumentError(
            f"tokenizer {tokenizer.model_path} has {tokenizer.vocab_size} pieces (padded: {padded}) but "
            f"checkpoint {info.path} has {rows} vocabulary rows: pass the tokenizer the model "
            f"was trained with{f' ({recorded})' if recorded else ''} as --tokenizer-model"
        )
    if info.tokenizer_vocab_sha256 is not None:
        if tokenizer.vocab_sha256 != info.tokenizer_vocab_sha256:
            raise ArgumentError(
                f"tokenizer {tokenizer.model_path} has another vocabulary than the one checkpoint {info.path} "
                f"was trained with ({recorded}, pieces sha256 {info.tokenizer_vocab_sha256[:12]}): pass that "
                f"one as --tokenizer-model"
            )
        return
    if not recorded or recorded == tokenizer.model_path:
        return
    try:
        original = SentencePieceTokenizer(recorded)
    except ValueError:
        logger.warning("cannot read the checkpoint's tokenizer %s to compare vocabularies", recorded)
        return
    if original.vocab != tokenizer.vocab:
        shared = min(original.vocab_size, tokenizer.vocab_size)
        differing = next((i for i in range(shared) if original.piece(i) != tokenizer.piece(i)), shared)
        raise ArgumentError(
            f"tokenizer {tokenizer.model_path} has another vocabulary than the one checkpoint {info.path} "
            f"was trained with ({recorded}; first difference at id {differing}): pass that one as --tokenizer-model"
        )


def load_tokenizer(infos: Sequence[CheckpointInfo], tokenizer_model: Optional[str] = None):
    """The SentencePiece tokenizer of the checkpoints ``infos``: ``tokenizer_model`` (the tool's
    ``--tokenizer-model``), else the one they were all trained with.

    Raises ``ArgumentError`` when a checkpoint records no tokenizer or they record different ones,
    and ``DataError`` for a file that cannot be read; when that file is the recorded one (the usual
    cause: the checkpoint was copied to another machine, or the tokenizer moved), the line names
    the checkpoint and says to pass the tokenizer's path with ``--tokenizer-model``.
    """
    from megatron_patch.data.tokenizer import SentencePieceTokenizer

    if tokenizer_model:
        return SentencePieceTokenizer(tokenizer_model)
    for info in infos:
        if not info.tokenizer_model:
            raise ArgumentError(f"checkpoint {info.path} records no tokenizer: pass --tokenizer-model")
    recorded = sorted({info.tokenizer_model for info in infos})
    if len(recorded) > 1:
        raise ArgumentError(
            f"--load: the checkpoints were trained with different tokenizers ({', '.join(recorded)}); "
            "pass --tokenizer-model, or evaluate them in separate calls"
        )
    path, checkpoint = recorded[0], infos[0].path
    if not os.path.isfile(path):
        raise DataError(
            f"tokenizer {path}, recorded in checkpoint {checkpoint}, does not exist (it moved, or the checkpoint "
            f"was copied from another machine): pass the tokenizer's path with --tokenizer-model"
        )
    try:
        return SentencePieceTokenizer(path)
    except DataError as error:
        raise DataError(f"checkpoint {checkpoint}'s tokenizer: {error}") from None


def check_layout(
    info: CheckpointInfo,
    tensor_parallel: int,
    pipeline_parallel: int,
    virtual_size: Optional[int] = None,
    layers_per_virtual_stage: Optional[int] = None,
) -> Optional[int]:
    """ArgumentError unless TP divides the heads, query groups, FFN width and vocabulary and PP the
    layers, and the virtual-pipeline flags (``--virtual-pipeline-model-parallel-size`` or
    ``--num-layers-per-virtual-pipeline-stage``, at most one) fit PP and the layers. Returns V, the
    virtual pipeline stages per rank (None: one chunk per rank). The sizes: ``presets.check_layout``."""
    preset = info.preset
    where = f"checkpoint {info.path} (model {preset.name!r})"
    check_preset_layout(preset, tensor_parallel, pipeline_parallel, where, padded_vocab_size=info.padded_vocab_size)
    return parallel.resolve_virtual_pipeline(
        preset.num_layers,
        pipeline_parallel,
        virtual_size,
        layers_per_virtual_stage,
        f" of {where}",
    )


def check_world(world_size: int, tensor_parallel: int, pipeline_parallel: int) -> None:
    if world_size % (tensor_parallel * pipeline_parallel):
        product = tensor_parallel * pipeline_parallel
        raise ArgumentError(
            f"world size {world_size} is not a multiple of TP x PP = {product}: "
            f"launch a multiple of {product} processes with torchrun"
        )


def check_same_checkpoints(infos: Sequence[CheckpointInfo]) -> None:
    """Collective: the same CheckpointError on every rank unless every rank read the same checkpoint
    for each ``--load``. Each rank resolves a ``--save`` folder's tracker on its own before the world
    is joined, so a training run that saves or prunes in that folder meanwhile can give the ranks
    different checkpoints, whose shards would then be mixed."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return
    paths = [info.path for info in infos]
    every_rank = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every_rank, paths)
    for rank, other in enumerate(every_rank):
        for first, this in zip(every_rank[0], other):
            if this != first:
                raise CheckpointError(
                    f"--load resolved to {first} on rank 0 but to {this} on rank {rank} (a run saved or pruned "
                    f"in that folder as this tool started): name the checkpoint folder itself (iter_N), or run again"
                )


def build_model(
    info: CheckpointInfo,
    tensor_parallel: int,
    pipeline_parallel: int,
    bf16: Optional[bool] = None,
    seed: int = 1234,
    virtual_pipeline: Optional[int] = None,
) -> List[torch.nn.Module]:
    """(Re)initialise megatron's groups at TP x PP (x V virtual stages) and build this rank's chunks
    of the checkpoint's model (the trainer's builder), in eval mode; ``bf16`` defaults to the
    checkpoint's dtype.

    Returns the chunks, one per virtual stage (``[chunk]`` without; a ``Float16Module`` around the
    model in bf16, as the trainer runs it).
    """
    if info.transformer_impl == "transformer_engine" and not transformer_engine_available():
        raise CheckpointError(
            f"checkpoint {info.path} was trained with --transformer-impl transformer_engine, whose layers "
            f"cannot be built here (transformer_engine does not import): run this where "
            f"transformer-engine[pytorch] is installed"
        )
    settings = ModelSettings(
        preset=info.preset,
        seq_length=info.seq_length,
        padded_vocab_size=info.padded_vocab_size,
        tensor_parallel=tensor_parallel,
        pipeline_parallel=pipeline_parallel,
        virtual_pipeline_parallel=virtual_pipeline,
        bf16=info.bf16 if bf16 is None else bf16,
        transformer_impl=info.transformer_impl,
    )
    parallel.init_model_parallel(tensor_parallel, pipeline_parallel, virtual_pipeline, seed=seed)
    cpu = cpu_mode.is_enabled()
    model = build_model_chunks(settings, settings.transformer_config(cpu), cpu)
    for chunk in model:
        chunk.eval()
    return model


def load_weights(
    model: List[torch.nn.Module], info: CheckpointInfo, path: Optional[str] = None, verify: bool = True
) -> None:
    """Load the model weights of ``path`` (default: ``info.path``) into ``model``, resharding
    from whatever layout they were saved at (dist_checkpointing); ``verify``: check the files
    against the checkpoint's manifest first (``--no-checkpoint-verify`` turns it off)."""
    ckpt.load_checkpoint(path or info.path, model, info.shape, restore_rng=False, verify=verify)
