"""Export a token-level checkpoint (any TP/PP) to a Hugging Face ``LlamaForCausalLM`` folder.

Writes config.json, generation_config.json, model.safetensors (the checkpoint's dtype), the
SentencePiece tokenizer (tokenizer.model, tokenizer_config.json, special_tokens_map.json) and
megatron_patch_export.json (provenance). The tensors are read unsharded without building a
model. The padded vocabulary is kept (the exported model computes exactly Megatron's
distribution); ``--trim-vocab`` cuts it to the tokenizer's pieces. Only the paper's LLaMA-style
architecture is accepted. Example::

    python tools/export_hf.py --cpu --load runs/final --save hf/patch-370m --verify-logits

The tool reads its safetensors file back and, with ``--verify-logits`` (needs transformers),
compares transformers' logits with Megatron's on a fixed batch. Exit codes: 0 ok, 1 check
failed, 2 bad input.
"""

import functools
import os
import sys
from typing import List, Optional

if __package__ in (None, ""):  # run as `python tools/export_hf.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --verify-logits' default --tolerance, relative to max|logits| (see the flag's help)
FLOAT32_TOLERANCE = 1e-5  # float32 throughout: rounding ~1e-7
TF32_TOLERANCE = 1e-2  # Megatron's side in TF32 (Transformer Engine's layers on a GPU): ~1e-3


def build_parser():
    from megatron_patch.runtime.command import ArgumentParser, add_checkpoint_verify_flag

    parser = ArgumentParser(prog="export_hf.py", description=__doc__.split("\n")[0])
    parser.add_argument("--load", required=True, help="a --save root (its latest checkpoint) or one checkpoint")
    parser.add_argument("--save", required=True, help="output folder (created; see --force)")
    parser.add_argument("--force", action="store_true", help="replace an existing --save folder")
    parser.add_argument(
        "--tokenizer-model", default=None, help="SentencePiece model (default: the one the checkpoint was trained with)"
    )
    parser.add_argument(
        "--trim-vocab",
        action="store_true",
        help="cut the padded vocabulary to the tokenizer's pieces (default: keep it)",
    )
    parser.add_argument(
        "--verify-logits",
        action="store_true",
        help="compare transformers' logits with Megatron's (TP=1 PP=1, fp32) on a fixed batch",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="--verify-logits: the largest max|logits(transformers) - logits(Megatron)| accepted, relative to "
        "max|logits(Megatron)|. Both compute in float32 from the same weights (a bf16 checkpoint's widen "
        "exactly), so a correct export differs by float32 rounding alone (0 to ~1e-7 on CPU), unless "
        "Megatron's side runs its float32 matrix products in TF32 (10-bit mantissa, ~5e-4 per product), as "
        "Transformer Engine's layers do on a GPU. "
        f"Default {FLOAT32_TOLERANCE:.0e} (a RoPE base of 500000 instead of 10000 differs by ~8e-4 "
        f"on the barely trained test model, far more on a trained one), {TF32_TOLERANCE:.0e} where TF32 is "
        "used: verify with --cpu for the strict check",
    )
    parser.add_argument("--model", default=None, help="optional guard: the preset the checkpoint must have")
    parser.add_argument("--cpu", action="store_true", help="CPU mode over gloo")
    add_checkpoint_verify_flag(parser)
    return parser


def _run(args) -> None:
    import logging
    import time

    from megatron_patch.checkpoint import folders
    from megatron_patch.checkpoint import info as checkpoint_info
    from megatron_patch.conversion import hf_export, hf_folder
    from megatron_patch.errors import ArgumentError, VerificationError
    from megatron_patch.evaluation.logits import fixed_tokens, forward_logits
    from megatron_patch.runtime import command
    from megatron_patch.runtime.rank_zero import on_rank_zero
    from megatron_patch.runtime.staged_folder import StagedFolder, check_output_folder

    logger = logging.getLogger("megatron_patch.tools.export_hf")
    start = time.perf_counter()
    if args.tolerance is not None and not args.tolerance >= 0:
        raise ArgumentError(f"--tolerance {args.tolerance} must be >= 0")
    if args.tolerance is not None and not args.verify_logits:
        raise ArgumentError(
            f"--tolerance {args.tolerance} is the logits check's, which runs with --verify-logits only: "
            f"add --verify-logits or drop --tolerance"
        )
    info = checkpoint_info.read_checkpoint(args.load, "--load", args.model)
    hf_export.check_architecture_args(info)
    final = check_output_folder(args.save, args.force, "--save")
    check_replaceable = functools.partial(
        folders.check_replaceable,
        flag="--save",
        sources=(info.path, os.path.dirname(info.path)),
        output_names=hf_folder.EXPORT_FILES,
        is_output=hf_folder.is_export,
    )
    check_replaceable(final)
    tokenizer = checkpoint_info.load_tokenizer([info], args.tokenizer_model)
    checkpoint_info.check_tokenizer(tokenizer, info)
    stage = info.weights_stage  # a converted checkpoint's: its source's
    conversion = info.conversion
    if stage == "patch":
        converted = f" (converted from {conversion.get('source')})" if conversion else ""
        logger.warning(
            "%s holds patch-stage weights%s: they predict the next patch, not the next token; "
            "export the final token-stage checkpoint",
            info.path,
            converted,
        )
    vocab_size = tokenizer.vocab_size if args.trim_vocab else info.padded_vocab_size
    with command.command_world(args.cpu):
        checkpoint_info.check_same_checkpoints([info])
        tensors = hf_export.read_tensors(info, args.checkpoint_verify)
        weights = hf_export.to_llama(info, tensors, vocab_size)
        del tensors
        dtype = weights["lm_head.weight"].dtype
        config = hf_export.llama_config(info, tokenizer, vocab_size, dtype)
        provenance = {
            "source": info.path,
            "iteration": info.meta.get("iteration"),
            "stage": stage,  # of the weights (progress: the checkpoint's own, iteration 0 for a converted one)
            "progress": info.progress,
            "source_layout": info.layout,
            "model": info.preset.name,
            "tokenizer_model": tokenizer.model_path,
            "vocab": "trimmed to the tokenizer" if args.trim_vocab else "padded, as trained",
            "padded_vocab_size": info.padded_vocab_size,
            "tokenizer_vocab_size": tokenizer.vocab_size,
        }
        if conversion:
            provenance["conversion"] = conversion  # tools/convert_checkpoint.py's record: source, its stage
        with StagedFolder(final, force=args.force, check_replace=check_replaceable) as staged:
            on_rank_zero(
                hf_export.write_folder, staged.path, weights, config, tokenizer, info.seq_length, provenance, final
            )
            difference = tolerance = None
            if args.verify_logits:
                tokens = fixed_tokens(tokenizer.vocab_size, 2, min(info.seq_length, 64))
                model = checkpoint_info.build_model(info, 1, 1, bf16=False)
                tolerance = args.tolerance
                if tolerance is None:
                    tolerance = TF32_TOLERANCE if _runs_in_tf32(model) else FLOAT32_TOLERANCE
                checkpoint_info.load_weights(model, info, verify=False)  # checked by read_tensors above
                reference = forward_logits(model, tokens, info.padded_vocab_size)[..., :vocab_size]  # [b, s, V]
                del model
                scale = reference.abs().max().item()
                absolute = on_rank_zero(
                    lambda: (hf_export.transformers_logits(staged.path, tokens) - reference).abs().max().item()
                )
                difference = absolute / scale if scale > 0 else absolute
                logger.info("max |logits(transformers) - logits(megatron)| = %.3e (max |logits| %.3e)", absolute, scale)
                if not difference <= tolerance:
                    raise VerificationError(
                        f"transformers' logits differ from Megatron's by {difference:.3e} of the largest logit "
                        f"({absolute:.3e} of {scale:.3e}) > --tolerance {tolerance:.1e}; the export is wrong "
                        f"(or, on GPU, a larger --tolerance is needed); nothing was written to {args.save}"
                    )
            staged.commit()
    if command.rank() == 0:
        parameters = sum(t.numel() for t in weights.values())
        print(
            f"exported {info.path} ({stage} stage, iteration {info.meta.get('iteration')}, "
            f"model {info.preset.name}) to {final}"
        )
        print(
            f"LlamaForCausalLM: {parameters:,} parameters, {str(dtype).replace('torch.', '')}, vocabulary "
            f"{vocab_size} ({'trimmed to the tokenizer' if args.trim_vocab else 'padded, as trained'}; "
            f"tokenizer {tokenizer.vocab_size} pieces)"
        )
        if difference is not None:
            print(
                f"logits check: max difference transformers vs Megatron {difference:.3e} of the largest logit "
                f"(tolerance {tolerance:.1e})"
            )
        print(f"done in {time.perf_counter() - start:.1f} s")


def _runs_in_tf32(model) -> bool:
    """Whether the model's float32 matrix products run in TF32 on its GPU: Transformer Engine's
    layers always do, torch's where ``torch.backends.cuda.matmul.allow_tf32`` is set."""
    import torch

    if next(model[0].parameters()).device.type != "cuda":
        return False
    uses_te = any(type(m).__module__.startswith("transformer_engine") for chunk in model for m in chunk.modules())
    return uses_te or torch.backends.cuda.matmul.allow_tf32


def main(argv: Optional[List[str]] = None) -> int:
    from megatron_patch.runtime import command

    command.configure_logging("export_hf")

    def body():
        _run(build_parser().parse_args(argv))

    return command.run_main(body, io_errors_are_user_errors=True)  # the output is staged: nothing is left


if __name__ == "__main__":
    sys.exit(main())
