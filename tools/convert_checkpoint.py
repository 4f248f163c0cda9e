"""Convert a patch-stage checkpoint (any TP/PP/V) into a token-stage starting checkpoint (any TP/PP/V).

Weights only: iteration 0 of the token stage, optimizer and LR schedule dropped, the source path,
K, lambda, consumed tokens and source layout recorded in ``megatron_patch.json``. The model shape
is read from the source's metadata. Run it at the target world size (any multiple of TP x PP)::

    torchrun --nproc_per_node=2 tools/convert_checkpoint.py --load runs/patch --save runs/token-start \\
        --tensor-model-parallel-size 1 --pipeline-model-parallel-size 2

    python tools/convert_checkpoint.py --cpu --load runs/patch --save runs/token-start   # TP=1 PP=1

then start the token stage with ``--stage token --pretrained-checkpoint runs/token-start``. The tool
checks its output (logits of the converted checkpoint at the target layout against the source's
at TP=1 PP=1; max absolute difference printed, exit 1 beyond ``--tolerance``) before renaming it
into place. Exit codes: 0 ok, 1 check failed, 2 bad input or a failed write (a full disk, a folder
without permission: one line naming --save, the cause and the fix; --save is left as it was).

A converted checkpoint converts again (to change its layout): the output keeps its patch-stage
source's record. A token-stage source (``--load`` of a two-stage run's root names its final
checkpoint) is refused: the line names the run's last patch-stage checkpoint.

``--virtual-pipeline-model-parallel-size V`` (or ``--num-layers-per-virtual-pipeline-stage N``)
gives the target V model chunks per pipeline rank, for an interleaved-pipeline token stage; a
source saved with virtual stages converts like any other.
"""

import os
import sys
from typing import List, Optional

if __package__ in (None, ""):  # run as `python tools/convert_checkpoint.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser():
    from megatron_patch.runtime.command import ArgumentParser, add_checkpoint_verify_flag, add_layout_flags

    parser = ArgumentParser(prog="convert_checkpoint.py", description=__doc__.split("\n")[0])
    parser.add_argument("--load", required=True, help="source: a --save root (its latest checkpoint) or one checkpoint")
    parser.add_argument("--save", required=True, help="output folder (created; see --force)")
    add_layout_flags(parser, "target")
    parser.add_argument("--force", action="store_true", help="replace an existing --save folder")
    parser.add_argument("--cpu", action="store_true", help="CPU mode over gloo")
    add_checkpoint_verify_flag(parser)
    parser.add_argument(
        "--tolerance", type=float, default=1e-3, help="max absolute logit difference accepted by the self-check (fp32)"
    )
    parser.add_argument("--model", default=None, help="optional guard: the preset the checkpoint must have")
    parser.add_argument(
        "--tokenizer-model",
        default=None,
        help="SentencePiece model (default: the one the source was trained with); used to "
        "check the target TP pads the vocabulary as the source did",
    )
    parser.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=None,
        help="as given to the token-stage trainer (default: the source run's)",
    )
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from megatron_patch.runtime import command

    command.configure_logging("convert_checkpoint")

    def body():
        args = build_parser().parse_args(argv)
        from megatron_patch.checkpoint.model_record import describe_layout
        from megatron_patch.conversion import reshard

        # The flags are checked against the files before joining the world (as evaluate.py and
        # export_hf.py do), so a wrong --load is reported even where the device is missing too.
        plan = reshard.plan_from_flags(
            args.load,
            args.save,
            args.tensor_model_parallel_size,
            args.pipeline_model_parallel_size,
            force=args.force,
            tolerance=args.tolerance,
            model=args.model,
            tokenizer_model=args.tokenizer_model,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
            verify=args.checkpoint_verify,
            virtual_pipeline=args.virtual_pipeline_model_parallel_size,
            layers_per_virtual_stage=args.num_layers_per_virtual_pipeline_stage,
        )
        with command.command_world(args.cpu):
            result = reshard.convert(plan)
            if command.rank() == 0:
                info = result.metadata["conversion"]
                print(
                    f"converted {info['source']} ({info['source_stage']} stage, iteration "
                    f"{info['source_iteration']}, {describe_layout(info['source_layout'])})"
                )
                print(
                    f"to {result.checkpoint} (token stage, iteration 0, "
                    f"{describe_layout(info['target_layout'])}, weights only)"
                )
                print(
                    f"logits check: max absolute difference {result.max_abs_diff:.3e} "
                    f"(tolerance {result.tolerance:.1e}) in {result.seconds:.1f} s"
                )
                print(f"next: --stage token --pretrained-checkpoint {plan.save}")

    return command.run_main(body)


if __name__ == "__main__":
    sys.exit(main())
