"""A token-level checkpoint -> a Hugging Face ``LlamaForCausalLM`` folder.

The tensors are read unsharded with dist_checkpointing (no model is built), whatever TP/PP the
checkpoint was saved at; megatron stores the decoder layers stacked, ``[L, ...]``. Mapping:

=============================================  =================================================
megatron (global, unsharded)                   Hugging Face Llama
=============================================  =================================================
embedding.word_embeddings.weight [V, h]        model.embed_tokens.weight
decoder.layers.self_attention.linear_qkv       model.layers.i.input_layernorm.weight
  .layer_norm_weight [L, h]
decoder.layers.self_attention.linear_qkv       q_proj / k_proj / v_proj: rows are grouped per
  .weight [L, g*(H/g + 2)*d, h]                query group, [H/g query heads, 1 key, 1 value] x d
decoder.layers.self_attention.linear_proj      model.layers.i.self_attn.o_proj.weight
  .weight [L, h, H*d]
decoder.layers.mlp.linear_fc1.layer_norm       model.layers.i.post_attention_layernorm.weight
  _weight [L, h]
decoder.layers.mlp.linear_fc1.weight           [gate; up]: rows 0..f-1 are the SwiGLU gate
  [L, 2f, h]                                   (gate_proj), rows f..2f-1 the linear part (up_proj)
decoder.layers.mlp.linear_fc2.weight [L, h, f] model.layers.i.mlp.down_proj.weight
decoder.final_layernorm.weight [h]             model.norm.weight
output_layer.weight [V, h]                     lm_head.weight
=============================================  =================================================

Both use rotate-half RoPE (megatron's ``rotary_interleaved=False``), so q and k need no
permutation. (The local layer spec stores its norms as ``input_layernorm`` / ``pre_mlp_layernorm``
under TE's names; both spellings are read.)

Vocabulary: the padded vocabulary (``model_shape.vocab_size`` rows) is kept by default, so the
exported model computes exactly the distribution Megatron trained and ``tools/evaluate.py``
scores (the padding rows take part in the softmax). ``trim_vocab`` cuts the embedding and the
output layer to the tokenizer's pieces, for tools that expect ``vocab_size == len(tokenizer)``;
the log-probabilities then change by the (tiny) mass the model gives the padding rows.
"""

import json
import logging
import os
import shutil
from collections import OrderedDict
from typing import Dict, Optional

import torch
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException

from megatron_patch.checkpoint import store as ckpt
from megatron_patch.checkpoint.info import CheckpointInfo
from megatron_patch.conversion.hf_folder import PROVENANCE
from megatron_patch.errors import CheckpointError, DataError, UserError, VerificationError, last_line

logger = logging.getLogger(__name__)

ROPE_BASE = 10000.0
RMS_EPS = 1e-6

LAYER_KEYS = {  # megatron key below "decoder.layers." -> (alias, HF suffix or None when split)
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.weight": "linear_qkv.weight",
    "self_attention.linear_proj.weight": "linear_proj.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.weight": "linear_fc1.weight",
    "mlp.linear_fc2.weight": "linear_fc2.weight",
}
ALIASES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
TOP_KEYS = ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight")
# architecture settings other model families would record in args; ours are fixed by the presets
ARCHITECTURE_ARGS = {
    "normalization": "RMSNorm",
    "swiglu": True,
    "position_embedding_type": "rope",
    "rotary_base": 10000,
    "add_bias_linear": False,
    "add_qkv_bias": False,
    "untie_embeddings_and_output_weights": True,
    "rotary_interleaved": False,
    "apply_layernorm_1p": False,
    "num_experts": None,
    "rotary_percent": 1.0,
}


def _refuse(info: CheckpointInfo, reason: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {info.path} is not the paper's LLaMA-style architecture ({reason}); "
        f"export_hf.py writes LlamaForCausalLM only (RMSNorm, SwiGLU, RoPE base 10000, no "
        f"biases, untied embeddings)"
    )


def check_architecture_args(info: CheckpointInfo) -> None:
    """Refuse a checkpoint whose recorded arguments say it is not LLaMA-style."""
    for name, expected in ARCHITECTURE_ARGS.items():
        if name in info.args and info.args[name] != expected:
            raise _refuse(info, f"args.{name} = {info.args[name]!r}, Llama needs {expected!r}")


def read_tensors(info: CheckpointInfo, verify: bool = True) -> Dict[str, torch.Tensor]:
    """The model tensors of ``info.path``, unsharded (optimizer state is not read). Collective.

    The checkpoint's files are checked first (``store.check_files``: present, and with ``verify``
    of the sizes and CRC-32s its manifest records); CheckpointError (one line) otherwise, also for
    a file dist_checkpointing then fails to read."""
    ckpt.check_files(info.path, verify, info.meta)
    try:
        metadata = dist_checkpointing.load_tensors_metadata(info.path)
    except (Exception, CheckpointException) as error:  # torch's CheckpointException is a BaseException
        raise ckpt.CheckpointError(
            f"checkpoint {info.path}: its tensor index could not be read "
            f"({last_line(error)}): it is corrupt; export an earlier one"
        ) from None
    model_keys = [key for key in metadata if not key.startswith(("optimizer.", "rng_state"))]
    unknown = [key for key in model_keys if not _known(key)]
    if unknown:
        raise _refuse(info, f"unexpected tensor {unknown[0]!r}")
    request = {key: metadata[key] for key in model_keys if not key.endswith("_extra_state")}
    try:
        return dist_checkpointing.load(request, info.path, validate_access_integrity=False)
    except (Exception, CheckpointException) as error:
        raise ckpt.CheckpointError(
            f"checkpoint {info.path} could not be loaded ({last_line(error)}): it is "
            f"corrupt or incomplete; export an earlier one"
        ) from None


def _known(key: str) -> bool:
    if key in TOP_KEYS or key.endswith("_extra_state"):
        return True
    prefix = "decoder.layers."
    return key.startswith(prefix) and (key[len(prefix) :] in LAYER_KEYS or key[len(prefix) :] in ALIASES)


def _layer(tensors: Dict[str, torch.Tensor], name: str) -> Optional[torch.Tensor]:
    key = "decoder.layers." + name
    if key in tensors:
        return tensors[key]
    for alias, canonical in ALIASES.items():
        if canonical == name and "decoder.layers." + alias in tensors:
            return tensors["decoder.layers." + alias]
    return None


def to_llama(
    info: CheckpointInfo, tensors: Dict[str, torch.Tensor], vocab_size: int
) -> "OrderedDict[str, torch.Tensor]":
    """Hugging Face Llama state dict (contiguous tensors, the checkpoint's dtype), first
    ``vocab_size`` rows of the embedding and output layer."""
    preset = info.preset
    L, h, f = preset.num_layers, preset.hidden_size, preset.ffn_hidden_size
    H = preset.num_attention_heads
    g = preset.num_query_groups or H
    d = h // H
    for key in TOP_KEYS:
        if key not in tensors:
            reason = "tied input and output embeddings" if key == "output_layer.weight" else f"no {key}"
            raise _refuse(info, reason)
    expected = {
        "self_attention.linear_qkv.layer_norm_weight": (L, h),
        "self_attention.linear_qkv.weight": (L, (H + 2 * g) * d, h),
        "self_attention.linear_proj.weight": (L, h, H * d),
        "mlp.linear_fc1.layer_norm_weight": (L, h),
        "mlp.linear_fc1.weight": (L, 2 * f, h),
        "mlp.linear_fc2.weight": (L, h, f),
    }
    layers = {}
    for name, shape in expected.items():
        tensor = _layer(tensors, name)
        if tensor is None:
            raise _refuse(info, f"no decoder.layers.{name}")
        if tuple(tensor.shape) != shape:
            what = "not SwiGLU" if name == "mlp.linear_fc1.weight" else "unexpected shape"
            raise _refuse(info, f"{what}: decoder.layers.{name} is {tuple(tensor.shape)}, expected {shape}")
        layers[name] = tensor
    for key, shape in (
        ("embedding.word_embeddings.weight", (info.padded_vocab_size, h)),
        ("output_layer.weight", (info.padded_vocab_size, h)),
        ("decoder.final_layernorm.weight", (h,)),
    ):
        if tuple(tensors[key].shape) != shape:
            raise _refuse(info, f"{key} is {tuple(tensors[key].shape)}, expected {shape}")

    out = OrderedDict()
    out["model.embed_tokens.weight"] = tensors["embedding.word_embeddings.weight"][:vocab_size]
    for i in range(L):
        p = f"model.layers.{i}."
        # [g*(H/g+2)*d, h] -> [g, H/g+2, d, h]: per query group, H/g query heads, one key, one value
        qkv = layers["self_attention.linear_qkv.weight"][i].reshape(g, H // g + 2, d, h)
        out[p + "self_attn.q_proj.weight"] = qkv[:, : H // g].reshape(H * d, h)  # [g, H/g, d, h] -> [H*d, h]
        out[p + "self_attn.k_proj.weight"] = qkv[:, H // g].reshape(g * d, h)  # [g, d, h] -> [g*d, h]
        out[p + "self_attn.v_proj.weight"] = qkv[:, H // g + 1].reshape(g * d, h)  # [g, d, h] -> [g*d, h]
        out[p + "self_attn.o_proj.weight"] = layers["self_attention.linear_proj.weight"][i]
        fc1 = layers["mlp.linear_fc1.weight"][i]  # [2f, h] = [gate; up]
        out[p + "mlp.gate_proj.weight"] = fc1[:f]
        out[p + "mlp.up_proj.weight"] = fc1[f:]
        out[p + "mlp.down_proj.weight"] = layers["mlp.linear_fc2.weight"][i]
        out[p + "input_layernorm.weight"] = layers["self_attention.linear_qkv.layer_norm_weight"][i]
        out[p + "post_attention_layernorm.weight"] = layers["mlp.linear_fc1.layer_norm_weight"][i]
    out["model.norm.weight"] = tensors["decoder.final_layernorm.weight"]
    out["lm_head.weight"] = tensors["output_layer.weight"][:vocab_size]
    return OrderedDict((name, tensor.detach().contiguous().clone()) for name, tensor in out.items())


def llama_config(info: CheckpointInfo, tokenizer, vocab_size: int, dtype: torch.dtype) -> dict:
    """config.json of the exported model (readable by transformers 4.x and 5.x)."""
    preset = info.preset
    special = {
        name: (value if value >= 0 else None)
        for name, value in (
            ("bos_token_id", tokenizer.eod),  # a document's start, as in training (tokenizer_files)
            ("eos_token_id", tokenizer.eod),
            ("pad_token_id", tokenizer.pad),
        )
    }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": preset.hidden_size,
        "intermediate_size": preset.ffn_hidden_size,
        "num_hidden_layers": preset.num_layers,
        "num_attention_heads": preset.num_attention_heads,
        "num_key_value_heads": preset.num_query_groups or preset.num_attention_heads,
        "head_dim": preset.hidden_size // preset.num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": info.seq_length,
        "rms_norm_eps": RMS_EPS,
        "rope_theta": ROPE_BASE,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_BASE},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": str(dtype).replace("torch.", ""),
        **special,
    }


def tokenizer_files(tokenizer, seq_length: int) -> Dict[str, str]:
    """tokenizer_config.json and special_tokens_map.json for the SentencePiece model (no BOS or
    EOS added when encoding: the model was trained on raw documents separated by EOD). The BOS
    token is EOD (``</s>``), as GPT-2's is its end-of-text: every document the model saw started
    after one, never after ``<s>``. So ``generate()`` without a prompt starts a document, and
    lm-eval scores a choice without context after EOD, as the project's zero-shot tool does."""
    special = {
        name: tokenizer.piece(i)
        for name, i in (
            ("bos_token", tokenizer.eod),
            ("eos_token", tokenizer.eod),
            ("unk_token", tokenizer.unk),
            ("pad_token", tokenizer.pad),
        )
        if i >= 0
    }
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": seq_length,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "sp_model_kwargs": {},
        "bos_token": None,  # without an EOD piece: none, not the class's default "<s>"
        **special,
    }
    return {
        "tokenizer_config.json": json.dumps(config, indent=1) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=1) + "\n",
    }


def write_folder(
    folder: str,
    weights: "OrderedDict[str, torch.Tensor]",
    config: dict,
    tokenizer,
    seq_length: int,
    provenance: dict,
    shown_as: Optional[str] = None,
) -> None:
    """Write the model files into ``folder`` (a staged, empty folder), then read them back.

    A write that fails (a full disk, a file-size limit, no permission: safetensors' SafetensorError
    or an OSError) raises DataError naming the file as ``shown_as/NAME`` (``shown_as``: the folder
    the user asked for, default ``folder``); the caller removes the staged folder."""
    try:
        from safetensors import SafetensorError
        from safetensors.torch import save_file
    except ImportError:
        raise UserError(
            "export_hf.py needs the safetensors package: pip install safetensors (or pip install -e .[hf])"
        ) from None
    texts = {
        "config.json": json.dumps(config, indent=1) + "\n",
        "generation_config.json": json.dumps(
            {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}, indent=1
        )
        + "\n",
        **tokenizer_files(tokenizer, seq_length),
        PROVENANCE: json.dumps(provenance, indent=1, sort_keys=True) + "\n",
    }
    name = "model.safetensors"
    try:
        path = os.path.join(folder, name)
        save_file(weights, path, metadata={"format": "pt"})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(path, 0o666 & ~umask)  # safetensors writes it private
        name = "tokenizer.model"
        shutil.copyfile(tokenizer.model_path, os.path.join(folder, name))
        for name, text in texts.items():
            with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
                f.write(text)
    except (SafetensorError, OSError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else last_line(error)
        raise DataError(
            f"{os.path.join(shown_as or folder, name)}: the export could not be written ({reason}); "
            f"check the free space, file-size limit (ulimit -f) and permissions there; nothing was written"
        ) from None
    verify_folder(folder, weights)


def verify_folder(folder: str, weights: "OrderedDict[str, torch.Tensor]") -> None:
    """The written safetensors file holds exactly ``weights``, bit for bit."""
    from safetensors.torch import load_file

    written = load_file(os.path.join(folder, "model.safetensors"))
    if written.keys() != weights.keys():
        raise VerificationError(f"{folder}/model.safetensors holds other tensors than written")
    for name, tensor in weights.items():
        if written[name].dtype != tensor.dtype or not torch.equal(written[name], tensor):
            raise VerificationError(f"{folder}/model.safetensors: {name} differs from the checkpoint's after writing")


def transformers_logits(folder: str, tokens: torch.Tensor) -> torch.Tensor:
    """``[b, s, V]`` fp32 logits of the exported folder by transformers' LlamaForCausalLM (CPU)."""
    try:
        import transformers
        from transformers import LlamaForCausalLM
    except ImportError:
        raise UserError(
            "--verify-logits needs transformers: pip install transformers (or pip install -e .[hf])"
        ) from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()
