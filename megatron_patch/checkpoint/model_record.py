"""The model a checkpoint holds, as its metadata records it: the shape that must agree with the
model loading it, and the parallel layout it was saved at.

A checkpoint loads at any layout (dist_checkpointing keys every tensor by its global name); the
layout is recorded to restore per-rank state only where it matches (RNG, the distributed
optimizer's shards) and to name it in messages (``TP=2 PP=1``).
"""

from typing import Optional

from megatron.core import parallel_state

from megatron_patch.errors import CheckpointError


def model_shape(preset, padded_vocab_size: int) -> dict:
    """What must agree between a checkpoint and the model loading it (``preset``: a ModelPreset)."""
    return {
        "num_layers": preset.num_layers,
        "hidden_size": preset.hidden_size,
        "ffn_hidden_size": preset.ffn_hidden_size,
        "num_attention_heads": preset.num_attention_heads,
        "num_query_groups": preset.num_query_groups or preset.num_attention_heads,
        "vocab_size": padded_vocab_size,
    }


def check_model_shape(ckpt: str, meta: dict, expected: dict) -> None:
    """CheckpointError unless the checkpoint's recorded shape (``meta``) is ``expected`` (:func:`model_shape`)."""
    saved = meta.get("model_shape", {})
    differing = [key for key, value in expected.items() if saved.get(key) != value]
    if differing == ["vocab_size"]:
        raise CheckpointError(
            f"checkpoint {ckpt} holds a vocabulary padded to {saved.get('vocab_size')} rows, this run pads to "
            f"{expected['vocab_size']} (the padding depends on the tokenizer, --make-vocab-size-divisible-by and "
            f"the tensor-parallel size): resume with the checkpoint's, or change TP with tools/convert_checkpoint.py"
        )
    if differing:
        diffs = [f"{key} {saved.get(key)} vs {expected[key]}" for key in differing]
        raise CheckpointError(
            f"checkpoint {ckpt} is of another model shape ({'; '.join(diffs)} here): "
            f"use the checkpoint's --model preset and tokenizer"
        )


def parallel_sizes() -> tuple[int, int, int]:
    """This rank's (pipeline, tensor, data-parallel) sizes, from megatron's groups."""
    return (
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_data_parallel_world_size(),
    )


def layout_of(tensor: int, pipeline: int, data: int, virtual_pipeline: Optional[int] = None) -> dict:
    """A layout as checkpoints and tools record it: pipeline, tensor and data-parallel sizes, and
    ``virtual_pipeline`` (V) only with several chunks per rank (so checkpoints without virtual
    stages record what they always did)."""
    record = {"pipeline": pipeline, "tensor": tensor, "data": data}
    if virtual_pipeline is not None and virtual_pipeline > 1:
        record["virtual_pipeline"] = virtual_pipeline
    return record


def layout_record(model) -> dict:
    """This rank's layout (megatron's groups; V = the chunks of ``model``), as :func:`layout_of`."""
    pipeline, tensor, data = parallel_sizes()
    return layout_of(tensor, pipeline, data, len(model))


def describe_layout(layout: dict) -> str:
    """``TP=.. PP=..`` (and ``V=..`` with virtual pipeline stages) of a recorded layout."""
    text = f"TP={layout.get('tensor')} PP={layout.get('pipeline')}"
    return text + (f" V={layout['virtual_pipeline']}" if layout.get("virtual_pipeline") else "")
