"""Small-scale reproduction of the paper's claim: token-only training against patch training
(K=4, lambda in {1/4, 1/2, 2/3, 4/5}) on the same tokens, each patch run beside its control,
evaluated on held-out data and WikiText-103.

    python examples/reproduce_small.py --workdir repro_out            # one GPU (bf16)
    python examples/reproduce_small.py --workdir /tmp/r --reduced --cpu   # CPU smoke run
    python examples/reproduce_small.py --workdir repro_out --runs token-only,lambda-2_3,control-lambda-2_3
    python examples/reproduce_small.py --workdir repro_out --seeds 3  # every run with seeds 1, 2, 3
    python examples/reproduce_small.py --workdir /tmp/e --reduced --cpu --epochs 4 --seeds 3 \
        --runs token-only,lambda-1_2,control-lambda-1_2          # the multi-epoch recipe (Table 2)

The control of ``lambda-X`` (``control-lambda-X``) trains the token stage alone from random
initialisation on the same last 1-lambda of the tokens with the same steps and schedule (the
trainer's ``--stage token`` without ``--pretrained-checkpoint``); transfer = control loss - patch +
token loss, paired by seed, says whether the patch stage helped (> 0) or hurt (< 0) the token
stage, next to the token-only comparison (the cost it saves). With ``--seeds N`` the tables give
the mean, the sample standard deviation and the range over the seeds.

With ``--epochs N`` every run trains N passes over the training documents (the budget rounded up
to whole steps) with the trainer's ``--stage-split epochs``, the paper's multi-epoch recipe (its
Table 2: 6 epochs): token-only trains N epochs at token level, ``lambda-X`` the first X*N epochs
at patch level and the rest at token level, both over all the documents, and its control only
those last (1-X)*N epochs at token level. Without it, one pass split by documents (each token once).

A ``tokenizer.model`` placed in a new ``--workdir`` is used instead of training one (to share one
tokenizer between workdirs, as the GPU commands in benchmarks/README.md do).

Data (``--data-dir``, default ``.data`` in the checkout; what the files are and what the project
used: README, "Data for the reproduction"): ``train.jsonl.xz`` (the GPU runs used a corpus of about
30 M tokens) for training (``tiny.jsonl.xz`` with ``--reduced``: the bundled
``examples/data/tiny.jsonl.xz`` fits, 0.6 M tokens), ``valid.jsonl.xz`` and
``wikitext103_test.jsonl.xz`` (JSON Lines with a ``text`` field) for evaluation only. Every step
is a project command run as a subprocess (tools/*.py, examples/pretrain_patch_gpt.py, under
torchrun when ``--nproc`` > 1); a step whose output exists is skipped, a training run once its
summary.json says it trained to the end. Every run passes ``--load`` of its own ``--save`` folder, so
a run killed (or stopped by a signal) after a checkpoint resumes from it on a re-run. The report
(``report.md``), over every finished run of the workdir whichever invocation trained it, says what
was measured and has a table of held-out loss / perplexity / wall time per run and a PNG of the
token-level validation loss against training tokens and against training compute (matplotlib, if
installed: the ``plot`` extra); ``curves.json`` holds the plotted points.
"""

import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # pipeline.py and reproduce_small_*.py beside it

from pipeline import REPO, check_workdir, made_after_run, run_script, run_step, train_command, trained  # noqa: E402
from reproduce_small_report import write_report  # noqa: E402
from reproduce_small_runs import (  # noqa: E402
    FRACTIONS,  # noqa: F401 (tests read the runs' names, settings and flags from this script)
    PATCH_SIZE,
    RUN_NAMES,
    SPLIT,
    epoch_budget,
    run_folder,
    settings,
    trainer_arguments,
)

from megatron_patch.errors import ArgumentError  # noqa: E402
from megatron_patch.runtime import atomic_file  # noqa: E402
from megatron_patch.runtime.command import ArgumentParser  # noqa: E402
from megatron_patch.training.plan import MAX_PASSES  # noqa: E402

DATA = REPO / ".data"  # git-ignored: where the corpora are copied


def _run(step: str, command: list, done: Path, finished=Path.exists) -> None:
    """Run one step unless ``finished(done)`` (the pipeline's ``run_step``, with the environment as it
    is: the runs may use a GPU and its threads)."""
    run_step(step, command, done, finished=finished, extra_env={})


def _training_tokens(prefix: Path) -> int:
    """Tokens of the documents ``--split SPLIT`` gives training (what one epoch is)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_patch.data.split import parse_split, split_prefix

    dataset = IndexedDataset(str(prefix))  # kept alive while its lengths are read
    return split_prefix(str(prefix), dataset.sequence_lengths, parse_split(SPLIT), 0.0).train.tokens


def _first_documents(source: Path, count: int) -> str:
    """The first ``count`` lines of the JSONL (or .jsonl.xz) ``source``; ArgumentError when it holds fewer."""
    import lzma

    opener = lzma.open if source.suffix == ".xz" else open
    with opener(source, "rt", encoding="utf-8") as lines:
        kept = [line for _, line in zip(range(count), lines)]
    if len(kept) < count:
        raise ArgumentError(
            f"--train-documents {count}: {source} holds {len(kept)} documents; give at most {len(kept)}"
        )
    return "".join(kept)


def main(argv=None) -> int:
    return run_script(lambda: _main(argv))


def _main(argv) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(REPO / "repro_out"))
    parser.add_argument("--reduced", action="store_true", help="tiny model and budget (smoke test)")
    parser.add_argument("--cpu", action="store_true", help="CPU mode (fp32, gloo) instead of one GPU in bf16")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run")
    parser.add_argument(
        "--data-dir",
        default=str(DATA),
        help="folder with train.jsonl.xz (tiny.jsonl.xz with --reduced), valid.jsonl.xz and "
        "wikitext103_test.jsonl.xz (default: .data in the checkout)",
    )
    parser.add_argument("--seeds", type=int, default=1, help="train every run with seeds 1..N (default 1)")
    parser.add_argument(
        "--epochs",
        type=float,
        default=None,
        help="train every run for N passes over the training documents with --stage-split epochs "
        f"(the paper's multi-epoch recipe; 1 <= N <= {MAX_PASSES}); default: one pass split by documents",
    )
    parser.add_argument(
        "--train-documents",
        type=int,
        default=None,
        help="train (and fit the tokenizer) on the first N documents of the training file only "
        "(a smaller corpus for many epochs on a CPU)",
    )
    parser.add_argument(
        "--runs",
        default=",".join(RUN_NAMES),
        help=f"comma list of runs to train and evaluate (default all: {','.join(RUN_NAMES)}); a run whose "
        "outputs are in --workdir is not trained again; the report covers every finished run of --workdir",
    )
    args = parser.parse_args(argv)
    selected = [name for name in args.runs.split(",") if name]
    unknown = sorted(set(selected) - set(RUN_NAMES))
    if unknown or not selected:
        raise ArgumentError(
            f"--runs {args.runs!r}: unknown run {', '.join(unknown) or '(none given)'}; "
            f"choose from {','.join(RUN_NAMES)}"
        )
    if args.seeds < 1:
        raise ArgumentError(f"--seeds {args.seeds}: give N >= 1 (seeds 1..N)")
    if args.nproc < 1:
        raise ArgumentError(f"--nproc {args.nproc}: give N >= 1 processes per run")
    if args.train_documents is not None and args.train_documents < 1:
        raise ArgumentError(f"--train-documents {args.train_documents}: give N >= 1")
    if args.epochs is not None and not (math.isfinite(args.epochs) and 1 <= args.epochs <= MAX_PASSES):
        raise ArgumentError(
            f"--epochs {args.epochs:g}: give N passes from 1 to {MAX_PASSES} (under one pass, leave it out: each "
            f"token once)"
        )
    s = settings(args.reduced, args.cpu)
    if s["gbs"] % (PATCH_SIZE * s["mbs"] * args.nproc):
        raise ArgumentError(
            f"--nproc {args.nproc}: the global batch of {s['gbs']} sequences must split into K={PATCH_SIZE} x "
            f"micro-batch {s['mbs']} x {args.nproc} processes; use --nproc dividing "
            f"{s['gbs'] // (PATCH_SIZE * s['mbs'])}"
        )
    data_dir = Path(args.data_dir).resolve()
    for name in (s["train_file"], "valid.jsonl.xz", "wikitext103_test.jsonl.xz"):
        if not (data_dir / name).is_file():
            raise ArgumentError(
                f"--data-dir {args.data_dir}: {data_dir / name} not found; pass the folder holding "
                f"{s['train_file']}, valid.jsonl.xz and wikitext103_test.jsonl.xz (README: 'Data for the reproduction')"
            )
    work = Path(args.workdir).resolve()
    train_file = data_dir / s["train_file"]
    # read (and checked) before the workdir records these settings
    first = _first_documents(train_file, args.train_documents) if args.train_documents else None
    # the device and process count too: the report compares losses (fp32 or bf16) and wall times
    made_with = {**s, "nproc": args.nproc, "epochs": args.epochs, "train_documents": args.train_documents}
    made_with["data_dir"] = data_dir
    check_workdir(work, made_with, "reproduce_small", seeded=("tokenizer.model",))  # a tokenizer given in
    (work / "data").mkdir(parents=True, exist_ok=True)
    py = sys.executable
    if first is not None:
        train_file = work / "data" / f"train_first{args.train_documents}.jsonl"
        if not train_file.exists():
            atomic_file.write_text(train_file, first)
    tokenizer = work / "tokenizer.model"
    _run(
        "tokenizer",
        [
            py,
            "tools/train_tokenizer.py",
            "--input",
            train_file,
            "--vocab-size",
            s["vocab"],
            "--input-sentence-size",
            s["sample_lines"],
            "--output-prefix",
            work / "tokenizer",
        ],
        tokenizer,
    )
    prefix = work / "data" / "train_text_document"
    _run(
        "preprocess",
        [
            py,
            "tools/preprocess_data.py",
            "--input",
            train_file,
            "--output-prefix",
            work / "data" / "train",
            "--tokenizer-model",
            tokenizer,
            "--append-eod",
            "--workers",
            str(max(1, (os.cpu_count() or 2) - 1)),
        ],
        Path(str(prefix) + ".idx"),
    )
    # one pass over the training split (--split 99,1,0 keeps 1% of the documents for in-run
    # validation; _training_tokens counts the other 99%), the trainer rounding down to whole steps
    split_tokens = _training_tokens(prefix)
    train_tokens = s["train_tokens"] or split_tokens
    stage_split, eval_interval = "documents", None
    if args.epochs is not None:
        tokens_per_step = s["gbs"] * s["seq_length"]
        train_tokens = epoch_budget(split_tokens, args.epochs, tokens_per_step)
        stage_split = "epochs"
        eval_interval = max(s["eval_interval"], train_tokens // tokens_per_step // 20)  # about 20 validations
        print(
            f"== budget: {args.epochs:g} epochs of {split_tokens} training tokens = {train_tokens} "
            f"tokens ({train_tokens // tokens_per_step} steps), --stage-split epochs",
            flush=True,
        )
    launcher = [py]  # one process: the trainer alone (a world of one), no torchrun agent beside it
    if args.nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    names = list(dict.fromkeys(selected))  # in the order given
    seeds = list(range(1, args.seeds + 1))
    for seed in seeds:
        runs = trainer_arguments(s, prefix, tokenizer, train_tokens, args.cpu, seed, stage_split, eval_interval)
        for name in names:
            folder = run_folder(name, seed)
            save = work / folder
            _run(f"train {folder}", train_command(launcher, runs[name], save), save, finished=trained)
        for data_name, data_file in (
            ("valid", data_dir / "valid.jsonl.xz"),
            ("wikitext103", data_dir / "wikitext103_test.jsonl.xz"),
        ):  # every run of the seed in one call per data set: one model build, the runs' weights in turn
            run_folders = [run_folder(name, seed) for name in names]
            outputs = {folder: work / f"eval_{folder}_{data_name}.json" for folder in run_folders}
            pending = [folder for folder in run_folders if not made_after_run(outputs[folder], work / folder)]
            command = [py, "tools/evaluate.py", "--load", *(work / folder for folder in pending)]
            command += ["--input", data_file, "--tokenizer-model", tokenizer]
            command += ["--output-json", *(outputs[folder] for folder in pending)] + (["--cpu"] if args.cpu else [])
            if s["max_documents"]:
                command += ["--max-documents", s["max_documents"]]
            if s["eval_mbs"]:
                command += ["--micro-batch-size", s["eval_mbs"]]
            done = outputs[(pending or run_folders)[-1]]
            _run(
                f"evaluate {', '.join(pending or run_folders)} on {data_name}",
                command,
                done,
                finished=lambda _, pending=pending, outputs=outputs: all(
                    made_after_run(outputs[folder], work / folder) for folder in pending
                ),
            )
    write_report(work, names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
