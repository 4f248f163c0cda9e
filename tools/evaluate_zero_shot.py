"""Zero-shot accuracy of a checkpoint with lm-evaluation-harness (``pip install -e .[eval]``).

``--load`` exports the checkpoint to a temporary Hugging Face folder with tools/export_hf.py (or
``--hf-model`` names a folder already exported) and runs the harness's ``hf`` model on it. The
default tasks are the paper's six, reported as in its Table 1: acc_norm for HellaSwag, PIQA,
ARC-Easy and ARC-Challenge, acc for MMLU and WinoGrande (the harness has no length-normalised
accuracy for those two). The harness downloads each task's data set from the Hugging Face Hub
(or reads the Hugging Face cache). ``tiny_next_sentence``, a next-sentence task over the bundled
corpus, ships with the project and needs no download. Example::

    python tools/evaluate_zero_shot.py --cpu --load runs/final --output-json zero_shot.json
    python tools/evaluate_zero_shot.py --cpu --load runs/final --tasks tiny_next_sentence --output-json tiny.json

Writes one JSON (under a temporary name, renamed when complete) and prints the scores as a
table. Exit codes: 0 ok, 1 the export's own check failed, 2 bad input.
"""

import os
import sys
from typing import List, Optional

if __package__ in (None, ""):  # run as `python tools/evaluate_zero_shot.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser():
    from megatron_patch.evaluation.zero_shot import default_tasks
    from megatron_patch.runtime.command import ArgumentParser, add_checkpoint_verify_flag

    parser = ArgumentParser(prog="evaluate_zero_shot.py", description=__doc__.split("\n")[0])
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--load", help="a --save root (its latest checkpoint) or one token-stage checkpoint")
    model.add_argument("--hf-model", help="a folder written by tools/export_hf.py (skips the export)")
    parser.add_argument("--output-json", required=True, help="where to write the scores (JSON)")
    parser.add_argument(
        "--tasks", nargs="+", default=default_tasks(), help="harness task or group names (default: the paper's six)"
    )
    parser.add_argument(
        "--include-path",
        nargs="+",
        default=[],
        help="folders of extra task YAML files (e.g. the paper's tasks over local copies)",
    )
    parser.add_argument("--limit", type=int, default=None, help="score only the first N items of each task")
    parser.add_argument("--num-fewshot", type=int, default=0, help="examples in the context (0: zero-shot)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when present, else cpu)")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="dtype the harness runs the model in",
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument(
        "--log-samples",
        action="store_true",
        help="also keep each item's choice log-likelihoods in the JSON (multiple-choice tasks)",
    )
    parser.add_argument(
        "--tokenizer-model",
        default=None,
        help="--load: SentencePiece model (default: the one the checkpoint was trained with)",
    )
    parser.add_argument("--cpu", action="store_true", help="--load: export in CPU mode over gloo")
    add_checkpoint_verify_flag(parser)
    return parser


def _check(args) -> None:
    from megatron_patch.errors import ArgumentError
    from megatron_patch.evaluation.report_file import check_report_path, checkpoint_folders

    world_size = os.environ.get("WORLD_SIZE", "1")
    if world_size != "1":
        raise ArgumentError(
            f"evaluate_zero_shot.py runs as one process (WORLD_SIZE={world_size} here): start it with "
            f"python, not torchrun; --batch-size sets how much of the GPU it uses"
        )
    if args.limit is not None and args.limit < 1:
        raise ArgumentError(f"--limit {args.limit} must be >= 1")
    if args.num_fewshot < 0:
        raise ArgumentError(f"--num-fewshot {args.num_fewshot} must be >= 0")
    if args.batch_size < 1:
        raise ArgumentError(f"--batch-size {args.batch_size} must be >= 1")
    check_report_path(
        args.output_json,
        checkpoint_folders(args.load) if args.load else [("--hf-model", args.hf_model)],
        [("--tokenizer-model", args.tokenizer_model)] if args.tokenizer_model else [],
    )
    if args.hf_model:
        for needed in (("config.json",), ("tokenizer.model", "tokenizer.json")):
            if not any(os.path.isfile(os.path.join(args.hf_model, name)) for name in needed):
                raise ArgumentError(
                    f"--hf-model {args.hf_model} holds no {' or '.join(needed)}: pass a folder written by "
                    f"tools/export_hf.py, or the checkpoint itself with --load"
                )
    if args.device is not None:
        import torch

        try:
            device = torch.device(args.device)
        except (RuntimeError, ValueError):
            raise ArgumentError(f"--device {args.device} is not a torch device: cpu, cuda or cuda:N") from None
        if device.type not in ("cpu", "cuda"):
            raise ArgumentError(f"--device {args.device}: the evaluation runs on cpu, cuda or cuda:N")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ArgumentError(f"--device {args.device}: this machine has no CUDA device; pass --device cpu")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ArgumentError(
                f"--device {args.device}: this machine has CUDA devices cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )


def _export(args, folder: str) -> int:
    """tools/export_hf.py into ``folder``; its exit code (it reports its own errors)."""
    from tools import export_hf

    argv = ["--load", args.load, "--save", folder]
    argv += ["--tokenizer-model", args.tokenizer_model] if args.tokenizer_model else []
    argv += [] if args.checkpoint_verify else ["--no-checkpoint-verify"]
    return export_hf.main(argv + (["--cpu"] if args.cpu else []))


def _run(args, argv: Optional[List[str]]) -> int:
    import tempfile

    from megatron_patch.conversion.hf_folder import read_provenance
    from megatron_patch.evaluation import zero_shot
    from megatron_patch.evaluation.report_file import write_report

    _check(args)
    manager = zero_shot.task_manager(args.tasks, args.include_path)  # checked before the export
    with tempfile.TemporaryDirectory(prefix="zero-shot-export-") as scratch:
        folder = args.hf_model
        if args.load:
            folder = os.path.join(scratch, "hf")
            code = _export(args, folder)
            if code:
                return code
        provenance = read_provenance(folder)  # before the evaluation: a bad record costs no hours
        report = zero_shot.evaluate(
            folder,
            args.tasks,
            include_paths=args.include_path,
            manager=manager,
            batch_size=args.batch_size,
            device=args.device,
            dtype=args.dtype,
            limit=args.limit,
            num_fewshot=args.num_fewshot,
            seed=args.seed,
            log_samples=args.log_samples,
        )
    report["model"] = os.path.abspath(args.hf_model) if args.hf_model else None
    report["checkpoint"] = provenance.get("source")
    report["iteration"] = provenance.get("iteration")
    # the weights' stage (a converted checkpoint's is its source's); older exports recorded only progress
    report["stage"] = provenance.get("stage", (provenance.get("progress") or {}).get("stage"))
    report["converted_from"] = (provenance.get("conversion") or {}).get("source")
    report["command"] = ["tools/evaluate_zero_shot.py", *(sys.argv[1:] if argv is None else argv)]
    write_report(args.output_json, report)
    source = report["checkpoint"] or report["model"]
    print(f"model: {source} ({report['stage'] or 'unknown'} stage, iteration {report['iteration']})")
    print(
        f"lm-evaluation-harness {report['versions']['lm_eval']}, {args.num_fewshot}-shot, {args.dtype} on "
        f"{report['settings']['device']}, {report['seconds']:.1f} s"
    )
    print(zero_shot.table(report))
    if report["truncated_requests"]:
        print(
            f"{report['truncated_requests']} requests were longer than the model's positions and had their "
            f"context cut from the left"
        )
    print(f"wrote {args.output_json}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from megatron_patch.runtime.command import configure_logging, run_main

    configure_logging("evaluate_zero_shot")
    return run_main(lambda: _run(build_parser().parse_args(argv), argv), io_errors_are_user_errors=True)


if __name__ == "__main__":
    sys.exit(main())
