"""The one model builder of the trainer and the checkpoint tools, and the vocabulary padding.

Names say which vocabulary they mean: ``tokenizer_vocab_size`` counts the tokenizer's pieces,
``padded_vocab_size`` the rows of the embedding and the output layer (the pieces rounded up to a
multiple of ``--make-vocab-size-divisible-by`` x TP, as Megatron-LM pads them). The padding is
computed here and only here; a checkpoint records the padded size, so the tools build the model
from it without padding again.
"""

from dataclasses import dataclass
from typing import List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module

from megatron_patch.architecture.presets import ModelPreset, transformer_config
from megatron_patch.model import PatchGPTModel, build_patch_gpt_model

TRANSFORMER_IMPLS = {"auto": None, "local": False, "transformer_engine": True}  # --transformer-impl -> use TE


def padded_vocab_size(tokenizer_vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Round the tokenizer's vocabulary up to a multiple of ``divisible_by * tensor_parallel``."""
    if tokenizer_vocab_size < 1 or divisible_by < 1 or tensor_parallel < 1:
        raise ValueError(
            f"tokenizer_vocab_size={tokenizer_vocab_size}, divisible_by={divisible_by}, "
            f"tensor_parallel={tensor_parallel}: all must be >= 1"
        )
    multiple = divisible_by * tensor_parallel
    return -(-tokenizer_vocab_size // multiple) * multiple


@dataclass(frozen=True)
class ModelSettings:
    """What shapes and runs one rank's model chunk: the preset, T, the padded vocabulary, the
    parallel layout, the precision and the opt-in layer implementations (flags of the same names)."""

    preset: ModelPreset
    seq_length: int  # T, positions the decoder sees
    padded_vocab_size: int  # rows of the embedding and the output layer
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline_parallel: Optional[int] = None  # V chunks per pipeline rank (None: one)
    sequence_parallel: bool = False
    bf16: bool = False
    recompute: str = "none"
    transformer_impl: str = "auto"  # auto | local | transformer_engine
    bias_swiglu_fusion: bool = False
    rope_fusion: bool = False  # local layers: RoPE inside the SDPA core attention; TE: megatron's apply_rope_fusion
    cross_entropy_fusion: bool = False
    sdpa_backend: str = "auto"  # the SDPA kernel tried first (local layers; attention.SDPAttention)
    hidden_dropout: float = 0.0  # megatron's dropout after attention and MLP, and on the embeddings
    attention_dropout: float = 0.0  # on the attention probabilities

    @property
    def attention_rope_fusion(self) -> bool:
        """``--rope-fusion`` as the local layers take it (RoPE inside the SDPA core attention);
        with Transformer Engine it is megatron's ``apply_rope_fusion`` instead."""
        return self.rope_fusion and self.transformer_impl != "transformer_engine"

    def transformer_config(self, cpu: bool) -> TransformerConfig:
        """megatron's config of this model; the loss is a sum over targets plus their count
        (``calculate_per_token_loss``), as the trainer and the evaluation reduce it.

        With virtual pipeline stages the pipeline's sends and receives are issued one by one and
        overlapped with compute (``overlap_p2p_comm``), not batched: Megatron-LM's default for
        the interleaved schedule. It is also what keeps PP=2 right on gloo: there a batched
        exchange posts an activation and a gradient to the same neighbour in one group, and the
        receiver, matching messages in order, swapped them (PP=2 x V=2 training losses were off
        from the third micro-batch on, megatron-core 0.16.1); one by one, megatron sends one
        direction over a second group when the pipeline has two ranks.
        """
        interleaved = {}
        if self.virtual_pipeline_parallel is not None:
            interleaved = dict(overlap_p2p_comm=True, batch_p2p_comm=False)
        return transformer_config(
            self.preset,
            tensor_parallel=self.tensor_parallel,
            pipeline_parallel=self.pipeline_parallel,
            sequence_parallel=self.sequence_parallel,
            bf16=self.bf16,
            cpu=cpu,
            recompute=self.recompute,
            calculate_per_token_loss=True,
            bias_activation_fusion=self.bias_swiglu_fusion,  # megatron's fused SwiGLU (no biases here)
            apply_rope_fusion=self.rope_fusion and not self.attention_rope_fusion,  # TE's kernel
            hidden_dropout=self.hidden_dropout,
            attention_dropout=self.attention_dropout,
            virtual_pipeline_model_parallel_size=self.virtual_pipeline_parallel,
            **interleaved,
        )


def build_model(
    settings: ModelSettings, config: TransformerConfig, cpu: bool, vp_stage: Optional[int] = None
) -> torch.nn.Module:
    """This rank's chunk of the model (megatron's groups already at the settings' layout), on its
    device, in ``Float16Module`` when bf16 (as megatron trains and evaluates it)."""
    model: PatchGPTModel = build_patch_gpt_model(
        config,
        settings.padded_vocab_size,
        settings.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        use_transformer_engine=TRANSFORMER_IMPLS[settings.transformer_impl],
        vp_stage=vp_stage,
        fused_rope=settings.attention_rope_fusion,
        fused_cross_entropy=settings.cross_entropy_fusion,
        sdpa_backend=settings.sdpa_backend,
    )
    if not cpu:
        model.cuda(torch.cuda.current_device())
    if settings.bf16:
        model = Float16Module(config, model)
    return model


def build_model_chunks(settings: ModelSettings, config: TransformerConfig, cpu: bool) -> List[torch.nn.Module]:
    """This rank's chunks of the model, one per virtual pipeline stage (``vp_stage`` 0..V-1, each
    L/(PP*V) layers; chunk v of pipeline rank p holds global layers from (v*PP + p) * L/(PP*V)),
    or ``[chunk]`` without virtual stages. megatron's groups must be at the settings' layout."""
    if settings.virtual_pipeline_parallel is None:
        return [build_model(settings, config, cpu)]
    return [build_model(settings, config, cpu, vp_stage) for vp_stage in range(settings.virtual_pipeline_parallel)]


def unwrap(model_chunk: torch.nn.Module) -> PatchGPTModel:
    """The model inside megatron's DDP / Float16Module wrappers."""
    from megatron.core.distributed import DistributedDataParallel

    while isinstance(model_chunk, (DistributedDataParallel, Float16Module)):
        model_chunk = model_chunk.module
    return model_chunk
