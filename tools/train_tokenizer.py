"""Train a SentencePiece tokenizer (BPE by default, byte fallback, digits split) on a corpus.

Example::

    python tools/train_tokenizer.py --input corpus/train.jsonl.xz \\
        --vocab-size 32000 --output-prefix tokenizers/spm32k

writes ``tokenizers/spm32k.model`` and ``tokenizers/spm32k.vocab`` (both atomically). Existing
ones are replaced only with ``--force``: a new model gives other ids, so every ``.bin`` made with
the old one would no longer match it. Special ids:
0 ``<unk>``, 1 ``<s>``, 2 ``</s>`` (end of document, the tokenizer's ``eod``), 3 ``<pad>``;
see ``megatron_patch/data/tokenizer.py``.

Training sentences are the non-empty lines of the documents; lines longer than 4192 bytes
(SentencePiece's sentence limit) are left out and counted, as SentencePiece itself would drop
them (they are not cut into pieces: a cut at a byte count would split words and give SentencePiece
text boundaries the corpus does not have). A corpus whose lines are all that long is an error that
says so; break its text into shorter lines (a sentence or paragraph each). When there are more than
``--input-sentence-size`` lines, a uniform sample of that many is drawn with ``--seed``
(reservoir sampling, so memory stays bounded).
Normalisation is the identity and whitespace is kept as is, so ``detokenize(tokenize(text))``
gives back ``text`` (up to a leading space), except that U+2581 ("▁"), SentencePiece's mark for a
space in its pieces, comes back as a space.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import random
import re
import sys
import time

if __package__ in (None, ""):  # run as `python tools/train_tokenizer.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_patch.data.inputs import (  # noqa: E402
    BadLineError,
    check_text_keys,
    expand_inputs,
    iter_lines,
    parse_line,
)
from megatron_patch.data.staging import StagedOutputs, check_outputs, output_folder  # noqa: E402
from megatron_patch.errors import ArgumentError, DataError  # noqa: E402
from megatron_patch.runtime.command import ArgumentParser, run_main  # noqa: E402

logger = logging.getLogger("train_tokenizer")

MAX_SENTENCE_BYTES = 4192
"""SentencePiece's ``max_sentence_length``: longer training lines are left out (and counted)."""

WHITESPACE_MARK = "\u2581"
"""SentencePiece's "▁": spaces become it in the pieces, and decoding turns every one into a space."""

MAX_THREADS = 1024
"""SentencePiece's limit on ``num_threads``."""

MIN_VOCAB_SIZE = 300
"""The smallest ``--vocab-size``: the 256 byte pieces, the 4 special ones, and some merged pieces."""

SPECIAL_PIECES = {"unk": (0, "<unk>"), "bos": (1, "<s>"), "eos": (2, "</s>"), "pad": (3, "<pad>")}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="tools/train_tokenizer.py", description=__doc__.split("\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="files or quoted globs")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="JSON keys of the text")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.model, PREFIX.vocab (see --force)")
    parser.add_argument(
        "--force", action="store_true", help="replace an existing PREFIX.model/.vocab (its .bin files no longer match)"
    )
    parser.add_argument(
        "--input-sentence-size",
        type=int,
        default=2_000_000,
        help="sample at most this many lines for training (0: use all)",
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    parser.add_argument("--character-coverage", type=float, default=0.9995)
    parser.add_argument("--num-threads", type=int, default=min(os.cpu_count() or 1, MAX_THREADS))
    parser.add_argument("--skip-bad-lines", action="store_true", help="skip unusable lines")
    args = parser.parse_args(argv)
    if args.vocab_size < MIN_VOCAB_SIZE:
        raise ArgumentError(
            f"--vocab-size {args.vocab_size} is too small: 256 byte pieces and 4 special pieces "
            f"are always in the vocabulary; use at least {MIN_VOCAB_SIZE} (e.g. 32000)"
        )
    _check_range("--vocab-size", args.vocab_size, MIN_VOCAB_SIZE, 2**31 - 1, "SentencePiece's 32-bit limit; e.g. 32000")
    _check_range("--seed", args.seed, 0, 2**32 - 1, "SentencePiece's seeds are unsigned 32-bit; default 1234")
    _check_range("--num-threads", args.num_threads, 1, MAX_THREADS, "SentencePiece's limit; e.g. the number of cores")
    if not 0.98 <= args.character_coverage <= 1.0:
        raise DataError(
            f"--character-coverage {args.character_coverage} is outside SentencePiece's range "
            f"[0.98, 1]; e.g. 0.9995 (the default) or 1.0 for a small alphabet"
        )
    if args.input_sentence_size < 0:
        raise DataError(f"--input-sentence-size {args.input_sentence_size} must be >= 0")
    return args


def _check_range(flag: str, value: int, low: int, high: int, why: str) -> None:
    """ArgumentError naming ``flag``, its ``value`` and the range unless ``low <= value <= high``."""
    if not low <= value <= high:
        raise ArgumentError(f"{flag} {value} must lie in [{low}, {high}] ({why})")


def sample_sentences(args: argparse.Namespace) -> tuple[list[str], int, int, int]:
    """Reservoir-sample training lines.

    Returns (sentences, lines eligible, bad input lines skipped, lines too long for SentencePiece).
    A bad input line (invalid UTF-8 or JSON, a lone surrogate escape, ...) stops the run with its
    ``file:line`` unless ``--skip-bad-lines``. No eligible line is a DataError that says why: every
    non-empty line over MAX_SENTENCE_BYTES (naming the first), or no text at all.
    """
    files = expand_inputs(args.input)
    check_text_keys(files, args.json_keys)
    rng = random.Random(args.seed)
    cap = args.input_sentence_size
    reservoir: list[str] = []
    seen = bad = too_long = 0
    first_too_long = ""  # "file:line, N bytes" of the first line left out for its length
    for index, line_number, raw, _ in iter_lines(files):
        try:
            texts = parse_line(raw, files[index].format, args.json_keys)
        except BadLineError as err:
            if not args.skip_bad_lines:
                raise DataError(
                    f"{files[index].path}:{line_number}: {err.reason}; {err.fix}, or pass --skip-bad-lines"
                ) from None
            bad += 1
            continue
        for text in texts.values():
            for sentence in text.splitlines():
                if not sentence.strip():
                    continue
                # at most 4 UTF-8 bytes per character: encode only lines that may be too long
                size = len(sentence.encode("utf-8")) if len(sentence) * 4 > MAX_SENTENCE_BYTES else 0
                if size > MAX_SENTENCE_BYTES:
                    too_long += 1  # the trainer would drop it; count it here instead
                    first_too_long = first_too_long or f"{files[index].path}:{line_number}, {size} bytes"
                    continue
                seen += 1
                if cap == 0 or len(reservoir) < cap:
                    reservoir.append(sentence)
                else:
                    slot = rng.randrange(seen)
                    if slot < cap:
                        reservoir[slot] = sentence
    skipped = f" ({bad} bad lines skipped)" if bad else ""
    if not reservoir and too_long:
        raise DataError(
            f"all {too_long} non-empty text lines{skipped} are longer than {MAX_SENTENCE_BYTES} bytes, SentencePiece's "
            f"sentence limit, so none is left to train on (the first in {first_too_long}); break the text "
            f"into shorter lines, e.g. one sentence or paragraph per line"
        )
    if not reservoir:
        raise DataError(f"no text found in {len(files)} input file(s){skipped}; check --input and --json-keys")
    return reservoir, seen, bad, too_long


def train(args: argparse.Namespace, sentences: list[str]) -> bytes:
    """Run the SentencePiece trainer; returns the serialized model.

    The model is written to memory (``model_writer``), not to a ``model_prefix``: SentencePiece
    records the prefix in the model, which would make the file depend on its temporary name.
    """
    import sentencepiece

    sentencepiece.set_random_generator_seed(args.seed)
    ids = {f"{name}_id": i for name, (i, _) in SPECIAL_PIECES.items()}
    pieces = {f"{name}_piece": piece for name, (_, piece) in SPECIAL_PIECES.items()}
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            model_type=args.model_type,
            vocab_size=args.vocab_size,
            character_coverage=args.character_coverage,
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            input_sentence_size=0,
            max_sentence_length=MAX_SENTENCE_BYTES,
            shuffle_input_sentence=False,
            num_threads=args.num_threads,
            minloglevel=2,
            **ids,
            **pieces,
        )
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        too_few = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", reason)
        if too_few:
            raise DataError(
                f"--vocab-size {args.vocab_size} is too small for the corpus: its characters at "
                f"--character-coverage {args.character_coverage} need {too_few.group(2)} pieces (with the "
                f"special ones); raise --vocab-size above that, or lower --character-coverage (down to "
                f"0.98) so that the rarest characters are encoded as bytes instead"
            ) from None
        most = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", reason)
        if most and int(most.group(1)) < MIN_VOCAB_SIZE:
            raise DataError(
                f"the corpus is too small for a tokenizer: SentencePiece finds at most {most.group(1)} pieces in "
                f"its {len(sentences)} training lines, fewer than the smallest --vocab-size, {MIN_VOCAB_SIZE}; "
                f"give more text (--input)"
            ) from None
        if most:
            raise DataError(
                f"--vocab-size {args.vocab_size} is too large for the corpus: SentencePiece finds at most "
                f"{most.group(1)} pieces in its {len(sentences)} training lines; lower --vocab-size to "
                f"{most.group(1)} or less, or give more text"
            ) from None
        raise DataError(f"SentencePiece training failed: {reason}; lower --vocab-size or give more text") from None
    return model.getvalue()


def check_model(proto: bytes, sentences: list[str]):
    """Load the trained model; check its special pieces and a round trip. Returns the processor.

    The round trip is compared up to what the model is meant to change (module docstring): the
    leading space (SentencePiece's dummy prefix, hence the ``strip``) and WHITESPACE_MARK, which
    decodes as a space.
    """
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_proto=proto)
    for name, (expected, piece) in SPECIAL_PIECES.items():
        got = getattr(processor, f"{name}_id")()
        if got != expected or processor.id_to_piece(got) != piece:
            raise RuntimeError(f"trained model has {name} id {got}, expected {expected} ({piece})")
    sample = sentences[0].strip()
    expected = sample.replace(WHITESPACE_MARK, " ").strip()
    if processor.decode(processor.encode(sample)).strip() != expected:
        raise RuntimeError(f"trained model does not round-trip the text {sample[:60]!r}")
    return processor


def write_outputs(staged: StagedOutputs, prefix: str, proto: bytes, processor) -> None:
    """Stage PREFIX.model (the proto) and PREFIX.vocab (``piece<TAB>score`` per line, as spm)."""
    with open(staged.path(prefix + ".model"), "wb") as stream:
        stream.write(proto)
    with open(staged.path(prefix + ".vocab"), "w", encoding="utf-8") as stream:
        for i in range(processor.get_piece_size()):
            stream.write(f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    return run_main(lambda: _train_tokenizer(argv), io_errors_are_user_errors=True)


def _train_tokenizer(argv: list[str] | None) -> None:
    start = time.time()
    args = parse_args(argv)
    folder = output_folder(args.output_prefix)
    check_outputs([args.output_prefix + ".model", args.output_prefix + ".vocab"], args.force)
    # staged before training, so an unwritable folder is reported at once, not after it
    with StagedOutputs(folder, "train_tokenizer", force=args.force) as staged:
        sentences, seen, bad, too_long = sample_sentences(args)
        logger.info("training on %d of %d lines", len(sentences), seen)
        proto = train(args, sentences)
        processor = check_model(proto, sentences)
        write_outputs(staged, args.output_prefix, proto, processor)
        paths = staged.commit()
    special = " ".join(f"{piece}={i}" for i, piece in SPECIAL_PIECES.values())
    print(
        f"tokenizer: {args.model_type}, vocab {processor.get_piece_size()}, {special} "
        f"(eod = </s>), sha256 {hashlib.sha256(proto).hexdigest()[:12]}"
    )
    print(
        f"trained on {len(sentences)} of {seen} lines ({bad} bad input lines skipped, "
        f"{too_long} lines over {MAX_SENTENCE_BYTES} bytes left out)"
    )
    print(f"wrote {' and '.join(paths)} in {time.time() - start:.1f} s")
    for path in staged.replaced:
        print(f"replaced {path}")


if __name__ == "__main__":
    sys.exit(main())
