"""PatchGPTModel: megatron.core's GPTModel with a patch mode chosen per forward call.

Patch mode (``patch_size`` K > 1) changes three things and adds no parameter:

1. first pipeline stage: the ``[K*T, b, h]`` token embeddings are averaged into ``[T, b, h]``
   patch embeddings (``aggregate_patches``) and fed to the decoder as ``decoder_input``; RoPE
   then gives the patches positions 0..T-1, since megatron derives them from the decoder length;
2. every stage: the decoder runs on T positions (pipeline schedules are given T, not K*T);
3. last stage: the loss is the K-way cross-entropy of each position against the K tokens of the
   next patch, ``[b, T, K]`` per target (``compute_language_model_loss`` is the override).

The caller builds the next-patch targets (``loss.patch_targets``) and passes them as ``labels``;
the model never derives them. At K=1 ``forward`` is GPTModel's own, bit for bit. The sharded state
dict is a GPTModel's, so a checkpoint written in patch mode loads into token mode (and into stock
GPTModel) as is.
"""

from typing import Optional

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from megatron_patch.architecture.specs import get_decoder_block_spec
from megatron_patch.embedding import aggregate_patches, check_patch_size
from megatron_patch.loss import vocab_parallel_patch_cross_entropy

ROPE_BASE = 10000  # the paper's (LLaMA's) rotary base


class PatchGPTModel(GPTModel):
    """GPTModel whose forward takes the patch size K of the batch (``patch_size=1``: stock GPT).

    Takes GPTModel's constructor arguments plus ``fused_cross_entropy`` (default False: megatron's
    CE at K=1 and the unfused K-way CE in patch mode).
    """

    def __init__(self, *args, fused_cross_entropy: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused_cross_entropy = fused_cross_entropy

    def check_patch_mode(self, patch_size: int) -> None:
        """ValueError unless this model can run at ``patch_size`` (RoPE or no position embedding,
        no multi-token prediction when K > 1)."""
        check_patch_size(patch_size)
        if patch_size == 1:
            return
        if self.position_embedding_type not in ("rope", "none"):
            raise ValueError(
                f"patch mode needs rotary or no position embeddings, not {self.position_embedding_type!r}: "
                f"build the model with position_embedding_type='rope'"
            )
        if self.config.mtp_num_layers:
            raise ValueError("patch mode does not combine with multi-token prediction: set mtp_num_layers=None")

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: Optional[torch.Tensor],
        attention_mask: Optional[torch.Tensor],
        decoder_input: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        *,
        patch_size: int = 1,
        **kwargs,
    ) -> torch.Tensor:
        """Forward pass of a batch of samples of K*T tokens.

        Args:
            input_ids: ``[b, K*T]`` token ids (first stage).
            position_ids: ``[b, K*T]`` or None; unused by RoPE.
            attention_mask: None for causal attention (the usual case), else megatron's mask
                over the decoder's positions (patches in patch mode).
            decoder_input: ``[T, b, h]`` to skip the embedding (as in GPTModel).
            labels: last stage: ``[b, T, K]`` next-patch targets from ``loss.patch_targets`` (any
                K, 1 included), or ``[b, s]`` token labels at K=1 as GPTModel takes them; other
                shapes raise ValueError.
            patch_size: K, tokens per decoder position of this batch.

        Returns:
            last stage with labels: fp32 losses of the labels' shape (per target); without labels:
            logits ``[b, T, V/tp]``; other stages: hidden states ``[T, b, h]``.
        """
        self.check_patch_mode(patch_size)
        targets_shaped = labels is not None and labels.dim() == 3 and labels.shape[-1] == patch_size
        token_labels = labels is not None and labels.dim() == 2 and patch_size == 1  # GPTModel's [b, s]
        if labels is not None and not (targets_shaped or token_labels):
            raise ValueError(
                f"labels of shape {list(labels.shape)} at patch_size K={patch_size}: patch mode takes next-patch "
                f"targets [b, T, K={patch_size}]; build them from the token labels with "
                f"megatron_patch.loss.patch_targets(labels, loss_mask, {patch_size})"
            )
        if patch_size == 1:
            per_target = targets_shaped
            # [b, s, 1] -> [b, s]: GPTModel's own labels, so K=1 is stock megatron bit for bit
            output = super().forward(
                input_ids,
                position_ids,
                attention_mask,
                decoder_input=decoder_input,
                labels=labels.squeeze(-1) if per_target else labels,
                **kwargs,
            )
            return output.unsqueeze(-1) if per_target and self.post_process else output  # [b, s] -> [b, s, 1]
        if decoder_input is None and self.pre_process:
            token_embeddings = self.embedding(input_ids=input_ids, position_ids=position_ids)  # [K*T, b, h]
            decoder_input = aggregate_patches(
                token_embeddings, patch_size, sequence_parallel=self.config.sequence_parallel
            )  # [T, b, h]
        return super().forward(input_ids, None, attention_mask, decoder_input=decoder_input, labels=labels, **kwargs)

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Labels ``[b, s]`` (token mode) or ``[b, T, K]`` (patch mode), logits ``[T, b, V/tp]`` ->
        per-target fp32 losses of the labels' shape. Token mode uses megatron's own CE unless
        ``fused_cross_entropy``."""
        if labels.dim() == 2 and not self.fused_cross_entropy:
            return super().compute_language_model_loss(labels, logits)
        targets = labels if labels.dim() == 3 else labels.unsqueeze(-1)  # [b, s] -> [b, s, 1]
        losses = vocab_parallel_patch_cross_entropy(
            logits,
            targets.transpose(0, 1),  # [b, T, K] -> [T, b, K], sequence first as the logits
            tp_group=self.pg_collection.tp,
            fused=self.fused_cross_entropy,
            # no range check, which waits for the device every micro-batch: the trainer's data is
            # checked against the vocabulary when its datasets are built (data/vocab_check.py)
            check_targets=False,
        )  # [T, b, K]
        losses = losses.transpose(0, 1).contiguous()  # [T, b, K] -> [b, T, K], batch first as GPTModel returns
        return losses if labels.dim() == 3 else losses.squeeze(-1)


def build_patch_gpt_model(
    config: TransformerConfig,
    vocab_size: int,
    seq_length: int,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    use_transformer_engine: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    fused_rope: bool = False,
    fused_cross_entropy: bool = False,
    sdpa_backend: str = "auto",
) -> PatchGPTModel:
    """A PatchGPTModel in the paper's architecture for this pipeline stage.

    Args:
        config: from ``presets.transformer_config``.
        vocab_size: padded vocabulary (a multiple of the tensor-parallel size).
        seq_length: T, positions the decoder sees.
        fused_rope: apply RoPE inside the SDPA core attention as one fused kernel
            (``rope.apply_rotary``) instead of megatron's unfused RoPE in ``SelfAttention``; the
            same function of the same weights (local spec only; checkpoints are interchangeable).
        fused_cross_entropy: score with ``fused_cross_entropy``'s K-way CE in both modes (no fp32
            logits-sized buffer; at K=1 instead of megatron's CE, equal to it within rounding).
        sdpa_backend: the SDPA kernel the core attention tries first (``attention.SDPAttention``;
            "auto": torch's order; local spec only).
    """
    if vocab_size % config.tensor_model_parallel_size:
        raise ValueError(
            f"vocabulary of {vocab_size} is not divisible by --tensor-model-parallel-size "
            f"{config.tensor_model_parallel_size}: pad it (--make-vocab-size-divisible-by)"
        )
    return PatchGPTModel(
        config=config,
        transformer_layer_spec=get_decoder_block_spec(
            config,
            use_transformer_engine,
            vp_stage,
            fused_rope_base=ROPE_BASE if fused_rope else None,
            sdpa_backend=sdpa_backend,
        ),
        vocab_size=vocab_size,
        max_sequence_length=seq_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=False,
        position_embedding_type="none" if fused_rope else "rope",  # fused: the core attention rotates
        rotary_base=ROPE_BASE,
        vp_stage=vp_stage,
        fused_cross_entropy=fused_cross_entropy,
    )
