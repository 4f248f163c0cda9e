"""Token-level evaluation of a checkpoint: loss, perplexity and bits per byte, at any TP/PP/V.

Data: a ``.bin/.idx`` prefix (``--data-path``, as written by tools/preprocess_data.py) or
JSONL / text files (``--input``, one line = one document, .gz/.xz/.zst allowed, text under
``--json-keys``). Documents are concatenated in order, each followed by EOD (as in training),
after one leading EOD; every token is scored once. Windows of ``--seq-length`` tokens (default:
the checkpoint's T): ``--window non-overlapping`` (default) or ``--window sliding --stride S``.
Bits per byte count the UTF-8 bytes of the evaluated text (for a prefix: of the detokenized
documents). Several checkpoints of one model (``--load A B ...``, one ``--output-json`` each)
are evaluated in turn on the same tokens by one model build. Example::

    python tools/evaluate.py --cpu --load runs/final --input data/wikitext103_test.jsonl.xz \\
        --output-json wikitext.json

Exit codes: 0 ok, 1 self-check failed, 2 bad input.
"""

import os
import sys
from typing import List, Optional

if __package__ in (None, ""):  # run as `python tools/evaluate.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser():
    from megatron_patch.runtime.command import ArgumentParser, add_checkpoint_verify_flag, add_layout_flags

    parser = ArgumentParser(prog="evaluate.py", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--load",
        required=True,
        nargs="+",
        help="a --save root (its latest checkpoint) or one checkpoint; several of one model (preset, T, "
        "vocabulary, dtype) are evaluated in turn on the same data by one model build",
    )
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data-path", default=None, help="a .bin/.idx prefix (without the extension)")
    data.add_argument("--input", nargs="+", default=None, help="JSONL or text files, or quoted globs")
    parser.add_argument(
        "--json-keys", nargs="+", default=None, help="with --input: the JSON key holding the text (one; default text)"
    )
    parser.add_argument(
        "--tokenizer-model", default=None, help="SentencePiece model (default: the one the checkpoint was trained with)"
    )
    parser.add_argument(
        "--max-documents", type=int, default=None, help="evaluate only the first N documents (empty ones count)"
    )
    parser.add_argument("--seq-length", type=int, default=None, help="T, tokens per window (default: the checkpoint's)")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="windows per micro-batch")
    parser.add_argument("--window", choices=["non-overlapping", "sliding"], default="non-overlapping")
    parser.add_argument(
        "--stride",
        type=int,
        default=None,
        help="sliding windows: tokens between window starts (default T/2); each scores its last S tokens",
    )
    add_layout_flags(parser)
    parser.add_argument("--fp32", action="store_true", help="run a bf16 checkpoint in fp32")
    parser.add_argument("--cpu", action="store_true", help="CPU mode over gloo")
    add_checkpoint_verify_flag(parser)
    parser.add_argument("--model", default=None, help="optional guard: the preset the checkpoint must have")
    parser.add_argument(
        "--output-json", nargs="+", default=None, help="also write the results here (JSON), one file per --load"
    )
    return parser


def _model_of(info) -> str:
    """What two checkpoints must share to be evaluated by one model build, in words."""
    dtype = "bf16" if info.bf16 else "fp32"
    return f"preset {info.preset.name}, T={info.seq_length}, {info.padded_vocab_size} vocabulary rows, {dtype}"


def _check_outputs(args, infos: list, inputs: list) -> None:
    """``--output-json``: one file per ``--load`` checkpoint, each distinct; none a folder, inside a
    checkpoint or its run, or a file the call reads (its data, its tokenizer; ``inputs``: the
    ``--input`` files, ``expand_inputs``'s)."""
    from megatron_patch.errors import ArgumentError
    from megatron_patch.evaluation.report_file import check_report_path, checkpoint_folders

    if not args.output_json:
        return
    if len(args.output_json) != len(args.load):
        raise ArgumentError(
            f"--output-json: {len(args.output_json)} file(s) for {len(args.load)} --load checkpoint(s); "
            "give one per checkpoint, in the same order"
        )
    read_folders = [found for load in args.load for found in checkpoint_folders(load)]
    if args.data_path:
        read_files = [("--data-path", args.data_path + extension) for extension in (".bin", ".idx")]
    else:
        read_files = [("--input", file.path) for file in inputs]
    if args.tokenizer_model:
        read_files.append(("--tokenizer-model", args.tokenizer_model))
    read_files += [("the tokenizer", info.tokenizer_model) for info in infos if info.tokenizer_model]
    for output in args.output_json:
        check_report_path(output, read_folders, read_files)
    if len(set(map(os.path.abspath, args.output_json))) < len(args.output_json):
        raise ArgumentError(
            f"--output-json {' '.join(args.output_json)}: a file is named twice; name one per checkpoint"
        )


def _read_checkpoints(args) -> list:
    """The ``--load`` checkpoints' infos, checked to share one model."""
    from megatron_patch.checkpoint import info as checkpoint_info
    from megatron_patch.errors import ArgumentError

    infos = [checkpoint_info.read_checkpoint(path, "--load", args.model) for path in args.load]
    first = infos[0]
    for info in infos[1:]:
        same = info.preset == first.preset and info.transformer_impl == first.transformer_impl
        if not same or _model_of(info) != _model_of(first):
            raise ArgumentError(
                f"--load {info.path}: its model ({_model_of(info)}) is not {first.path}'s "
                f"({_model_of(first)}); evaluate it in a call of its own"
            )
    return infos


def _run(args) -> None:
    import logging

    from megatron_patch.checkpoint import info as checkpoint_info
    from megatron_patch.checkpoint.model_record import layout_of
    from megatron_patch.checkpoint.store import check_files
    from megatron_patch.data.indexed import check_prefix
    from megatron_patch.data.inputs import expand_inputs
    from megatron_patch.errors import ArgumentError
    from megatron_patch.evaluation import perplexity, token_stream
    from megatron_patch.runtime import command

    if args.json_keys is not None and args.data_path:
        raise ArgumentError("--json-keys names the text of --input files: a --data-path prefix is already tokenized")
    json_keys = args.json_keys or ["text"]
    if len(json_keys) != 1:
        raise ArgumentError(f"--json-keys {' '.join(json_keys)}: evaluate one key at a time")
    if args.max_documents is not None and args.max_documents < 1:
        raise ArgumentError(f"--max-documents {args.max_documents} must be >= 1")
    # the data's files found before the checkpoints are read (their check is the long one)
    inputs = [] if args.data_path else expand_inputs(args.input)
    if args.data_path:
        check_prefix(args.data_path)
    infos = _read_checkpoints(args)
    _check_outputs(args, infos, inputs)
    info = infos[0]  # the model every checkpoint shares
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    virtual = checkpoint_info.check_layout(
        info, tp, pp, args.virtual_pipeline_model_parallel_size, args.num_layers_per_virtual_pipeline_stage
    )
    settings = perplexity.EvalSettings(
        info.seq_length if args.seq_length is None else args.seq_length, args.micro_batch_size, args.window, args.stride
    )
    if settings.seq_length > info.seq_length:
        logging.getLogger("megatron_patch.tools.evaluate").warning(
            "--seq-length %d is longer than the %d positions the model was trained on",
            settings.seq_length,
            info.seq_length,
        )
    tokenizer = checkpoint_info.load_tokenizer(infos, args.tokenizer_model)
    for each in infos:
        checkpoint_info.check_tokenizer(tokenizer, each)
    with command.command_world(args.cpu) as world_size:
        checkpoint_info.check_world(world_size, tp, pp)
        checkpoint_info.check_same_checkpoints(infos)
        for each in infos:  # every checkpoint's files, before the corpus is tokenized and the model built
            check_files(each.path, args.checkpoint_verify, each.meta)
        if args.data_path:
            corpus = token_stream.corpus_from_prefix(args.data_path, tokenizer, args.max_documents)
            described = {"data_path": args.data_path}
        else:
            corpus = token_stream.corpus_from_files(args.input, tokenizer, json_keys[0], args.max_documents)
            described = {"input": args.input, "json_key": json_keys[0]}
        model = checkpoint_info.build_model(info, tp, pp, bf16=False if args.fp32 else None, virtual_pipeline=virtual)
        layout = layout_of(tp, pp, world_size // (tp * pp), virtual)
        results = []
        for index, each in enumerate(infos):
            checkpoint_info.load_weights(model, each, verify=False)  # checked above
            result = perplexity.evaluate(model, corpus, settings, pad=tokenizer.eod)
            results.append(result)
            if command.rank() == 0:
                output = args.output_json[index] if args.output_json else None
                _report(args, each, result, described, tokenizer, layout, output)
        if command.rank() == 0 and len(infos) > 1:
            _comparison(infos, results)


def _report(args, info, result, described: dict, tokenizer, layout: dict, output) -> None:
    """Print one checkpoint's results and, given ``output``, write them there as JSON (rank 0)."""
    from megatron_patch.evaluation.report_file import write_report

    report = {
        "checkpoint": info.path,
        "iteration": info.meta.get("iteration"),
        "stage": info.weights_stage,  # a converted checkpoint's: its source's
        "converted_from": info.conversion.get("source") if info.conversion else None,
        "model": info.preset.name,
        **described,
        "tokenizer_model": tokenizer.model_path,
        "layout": layout,
        "dtype": "float32" if args.fp32 or not info.bf16 else "bfloat16",
        **result.to_dict(),
        "bytes_counted": "UTF-8 bytes of the documents' text"
        if args.input
        else "UTF-8 bytes of the detokenized documents",
        "scoring": "documents in order, each followed by EOD, after one leading EOD; every token (EODs "
        "included) scored once",
    }
    if output:
        write_report(output, report)
    window = "non-overlapping"
    if result.window == "sliding":
        context = result.seq_length - result.stride + 1
        window = f"sliding, stride {result.stride} (at least {context} tokens of context)"
    converted = f", converted from {report['converted_from']}" if report["converted_from"] else ""
    print(
        f"checkpoint: {info.path} ({report['stage']} stage, iteration {report['iteration']}, "
        f"model {info.preset.name}{converted})"
    )
    print(
        f"data: {args.data_path or ' '.join(args.input)}: {result.documents} documents, {result.bytes} bytes "
        f"({report['bytes_counted']})"
    )
    virtual_text = f" V={layout['virtual_pipeline']}" if layout.get("virtual_pipeline") else ""
    print(
        f"windows: {window}, {result.seq_length} tokens; TP={layout['tensor']} PP={layout['pipeline']}"
        f"{virtual_text} DP={layout['data']}"
    )
    print(f"tokens scored: {result.tokens} (EODs included) in {result.seconds:.1f} s")
    print(
        f"loss {result.loss:.4f} nats/token | perplexity {result.perplexity:.3f} | "
        f"bits per byte {result.bits_per_byte:.4f}"
    )
    if output:
        print(f"wrote {output}")


def _comparison(infos: list, results: list) -> None:
    """One table of the checkpoints evaluated in this call, on the same tokens (rank 0)."""
    print(f"\n{'checkpoint':<60s} {'stage':>6s} {'iteration':>9s} {'loss':>8s} {'perplexity':>11s} {'bits/byte':>9s}")
    for info, result in zip(infos, results):
        print(
            f"{info.path[-60:]:<60s} {str(info.weights_stage):>6s} {str(info.meta.get('iteration')):>9s} "
            f"{result.loss:8.4f} {result.perplexity:11.3f} {result.bits_per_byte:9.4f}"
        )


def main(argv: Optional[List[str]] = None) -> int:
    from megatron_patch.runtime import command

    command.configure_logging("evaluate")

    def body():
        _run(build_parser().parse_args(argv))

    return command.run_main(body)


if __name__ == "__main__":
    sys.exit(main())
