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

Data: ``../shared/data/train.jsonl.xz`` (about 30 M tokens) for training (``tiny.jsonl.xz``,
0.6 M tokens, with ``--reduced``), ``valid.jsonl.xz`` and ``wikitext103_test.jsonl.xz`` for
evaluation only. Every step is a project command run as a subprocess (tools/*.py,
examples/pretrain_patch_gpt.py under torchrun); a step whose output exists is skipped. The report
(``report.md``) has a table of held-out loss / perplexity / wall time per run and a PNG of the
token-level validation loss against training tokens and against training compute (matplotlib, if
installed: the ``plot`` extra); ``curves.json`` holds the plotted points.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
PATCH_SIZE = 4
SPLIT = "99,1,0"  # train, valid, test shares of the documents (1% for in-run validation)
FRACTIONS = {"lambda-1_4": 0.25, "lambda-1_2": 0.5, "lambda-2_3": 2 / 3, "lambda-4_5": 0.8}
CONTROLS = {f"control-{name}": fraction for name, fraction in FRACTIONS.items()}
RUN_NAMES = ("token-only",) + tuple(FRACTIONS) + tuple(CONTROLS)


def settings(reduced: bool, cpu: bool) -> dict:
    """Model, tokenizer, batch and budget of the reproduction (``reduced``: the CPU smoke run).

    The global batch is 32 sequences of 1024 tokens in every run; the micro-batch of 8 lets the
    patch stage split it as GBS/K = 8 sequences of K*T tokens (the trainer requires K x mbs | GBS).
    """
    if reduced:
        return {
            "model": "tiny",
            "seq_length": 64,
            "vocab": 1000,
            "gbs": 16,
            "mbs": 4,
            "train_tokens": 16 * 64 * 24,
            "warmup": 4,
            "lr": "2e-3",
            "eval_interval": 8,
            "max_documents": 4,
            "sample_lines": 2000,
            "train_file": "tiny.jsonl.xz",
        }
    return {
        "model": "repro-34m",
        "seq_length": 1024,
        "vocab": 8000,
        "gbs": 32,
        "mbs": 8,
        "train_tokens": None,
        "warmup": 100,
        "lr": "1e-3",
        "eval_interval": 50,
        "max_documents": None,
        "sample_lines": 300000,
        "train_file": "train.jsonl.xz",
    }


def trainer_arguments(
    s: dict,
    prefix: Path,
    tokenizer: Path,
    train_tokens: int,
    cpu: bool,
    seed: int = 1,
    stage_split: str = "documents",
    eval_interval: int = None,
) -> dict:
    """Trainer flags of every run, by name: the same model, data, budget and schedule; only K,
    lambda and (for a control) the stage differ. ``stage_split`` is the trainer's
    ``--stage-split`` (``epochs`` for a multi-epoch budget); ``eval_interval`` overrides the
    settings' steps between in-run validations."""
    common = [
        "--model",
        s["model"],
        "--seq-length",
        s["seq_length"],
        "--micro-batch-size",
        s["mbs"],
        "--global-batch-size",
        s["gbs"],
        "--train-tokens",
        train_tokens,
        "--lr",
        s["lr"],
        "--min-lr",
        "0",
        "--lr-warmup-iters",
        s["warmup"],
        "--data-path",
        prefix,
        "--split",
        SPLIT,
        "--tokenizer-model",
        tokenizer,
        "--eval-interval",
        eval_interval or s["eval_interval"],
        "--eval-iters",
        "4",
        "--log-interval",
        "10",
        "--seed",
        seed,
        "--stage-split",
        stage_split,
    ]
    common += ["--cpu"] if cpu else ["--bf16"]
    runs = {"token-only": common + ["--patch-size", 1]}
    runs.update(
        {
            name: common + ["--patch-size", PATCH_SIZE, "--patch-data-fraction", fraction]
            for name, fraction in FRACTIONS.items()
        }
    )
    runs.update(
        {
            name: common + ["--patch-size", PATCH_SIZE, "--patch-data-fraction", fraction, "--stage", "token"]
            for name, fraction in CONTROLS.items()
        }
    )
    return runs


def theoretical_cost(name: str) -> float:
    """Model FLOPs relative to token-only training of all the tokens: lambda/K + 1 - lambda for a
    patch run, 1 - lambda for a control (its token stage only)."""
    if name in FRACTIONS:
        return FRACTIONS[name] / PATCH_SIZE + 1 - FRACTIONS[name]
    return 1 - CONTROLS[name] if name in CONTROLS else 1.0


def run_folder(name: str, seed: int) -> str:
    """The run's folder name in --workdir (seed 1 keeps the plain name of earlier reports)."""
    return name if seed == 1 else f"{name}-seed{seed}"


def _run(step: str, command: list, done: Path) -> None:
    if done.exists():
        print(f"== {step}: done already", flush=True)
        return
    print(f"== {step}: {' '.join(str(c) for c in command)}", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    if subprocess.run([str(c) for c in command], cwd=REPO, env=env).returncode != 0:
        sys.exit(f"reproduce_small: step '{step}' failed; fix the error above and re-run")
    print(f"== {step}: {time.perf_counter() - start:.1f} s", flush=True)


def _training_tokens(prefix: Path) -> int:
    """Tokens of the documents ``--split SPLIT`` gives training (what one epoch is)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_patch.data.split import parse_split, split_prefix

    dataset = IndexedDataset(str(prefix))  # kept alive while its lengths are read
    return split_prefix(str(prefix), dataset.sequence_lengths, parse_split(SPLIT), 0.0).train.tokens


def _first_documents(source: Path, count: int, folder: Path) -> Path:
    """The first ``count`` lines of the JSONL (or .jsonl.xz) ``source`` as ``folder/train_first<count>.jsonl``
    (written under a temporary name, renamed when complete)."""
    import lzma

    target = folder / f"train_first{count}.jsonl"
    if target.exists():
        return target
    opener = lzma.open if source.suffix == ".xz" else open
    with opener(source, "rt", encoding="utf-8") as lines:
        kept = [line for _, line in zip(range(count), lines)]
    if len(kept) < count:
        sys.exit(f"reproduce_small: --train-documents {count}, but {source} holds {len(kept)} documents; lower it")
    partial = target.with_suffix(".jsonl.tmp")
    partial.write_text("".join(kept), encoding="utf-8")
    os.replace(partial, target)
    return target


def epoch_budget(training_tokens: int, epochs: float, tokens_per_step: int) -> int:
    """Training tokens of ``epochs`` passes over ``training_tokens``, rounded up to whole steps."""
    return math.ceil(epochs * training_tokens / tokens_per_step) * tokens_per_step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(REPO / "repro_out"))
    parser.add_argument("--reduced", action="store_true", help="tiny model and budget (smoke test)")
    parser.add_argument("--cpu", action="store_true", help="CPU mode (fp32, gloo) instead of one GPU in bf16")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run")
    parser.add_argument(
        "--data-dir",
        default=str(SHARED),
        help="folder with train/valid/wikitext103_test .jsonl.xz (default ../shared/data)",
    )
    parser.add_argument("--seeds", type=int, default=1, help="train every run with seeds 1..N (default 1)")
    parser.add_argument(
        "--epochs",
        type=float,
        default=None,
        help="train every run for N passes over the training documents with --stage-split epochs "
        "(the paper's multi-epoch recipe; N >= 1); default: one pass split by documents",
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
        help=f"comma list of runs to train, evaluate and report (default all: {','.join(RUN_NAMES)}); "
        "a run whose outputs are in --workdir is reported without training again",
    )
    args = parser.parse_args(argv)
    selected = [name for name in args.runs.split(",") if name]
    unknown = sorted(set(selected) - set(RUN_NAMES))
    if unknown or not selected:
        parser.error(
            f"--runs {args.runs!r}: unknown run {', '.join(unknown) or '(none given)'}; "
            f"choose from {','.join(RUN_NAMES)}"
        )
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: give N >= 1 (seeds 1..N)")
    if args.train_documents is not None and args.train_documents < 1:
        parser.error(f"--train-documents {args.train_documents}: give N >= 1")
    if args.epochs is not None and not args.epochs >= 1:
        parser.error(f"--epochs {args.epochs}: give N >= 1 passes (under one pass, leave it out: each token once)")
    s = settings(args.reduced, args.cpu)
    if s["gbs"] % (PATCH_SIZE * s["mbs"] * args.nproc):
        parser.error(
            f"--nproc {args.nproc}: the global batch of {s['gbs']} sequences must split into K={PATCH_SIZE} x "
            f"micro-batch {s['mbs']} x {args.nproc} processes; use --nproc dividing "
            f"{s['gbs'] // (PATCH_SIZE * s['mbs'])}"
        )
    work = Path(args.workdir).resolve()
    (work / "data").mkdir(parents=True, exist_ok=True)
    py = sys.executable
    data_dir = Path(args.data_dir).resolve()
    for name in (s["train_file"], "valid.jsonl.xz", "wikitext103_test.jsonl.xz"):
        if not (data_dir / name).is_file():
            sys.exit(f"reproduce_small: {data_dir / name} not found: pass --data-dir with the shared corpora")
    train_file = data_dir / s["train_file"]
    if args.train_documents:
        train_file = _first_documents(train_file, args.train_documents, work / "data")
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
    # one pass over the training split (--split 99,1,0 keeps 1% of the documents for in-run validation)
    train_tokens = s["train_tokens"] or int(_training_tokens(prefix) * 0.99)
    stage_split, eval_interval = "documents", None
    if args.epochs is not None:
        tokens_per_step = s["gbs"] * s["seq_length"]
        train_tokens = epoch_budget(_training_tokens(prefix), args.epochs, tokens_per_step)
        stage_split = "epochs"
        eval_interval = max(s["eval_interval"], train_tokens // tokens_per_step // 20)  # about 20 validations
        print(
            f"== budget: {args.epochs:g} epochs of {_training_tokens(prefix)} training tokens = {train_tokens} "
            f"tokens ({train_tokens // tokens_per_step} steps), --stage-split epochs",
            flush=True,
        )
    launcher = [py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    names = list(dict.fromkeys(selected))  # in the order given
    seeds = list(range(1, args.seeds + 1))
    for seed in seeds:
        runs = trainer_arguments(s, prefix, tokenizer, train_tokens, args.cpu, seed, stage_split, eval_interval)
        for name in names:
            folder = run_folder(name, seed)
            save = work / folder
            _run(
                f"train {folder}",
                launcher
                + ["examples/pretrain_patch_gpt.py"]
                + runs[name]
                + ["--save", save, "--summary-json", save / "summary.json"],
                save / "summary.json",
            )
            for data_name, data_file in (
                ("valid", data_dir / "valid.jsonl.xz"),
                ("wikitext103", data_dir / "wikitext103_test.jsonl.xz"),
            ):
                output = work / f"eval_{folder}_{data_name}.json"
                command = [
                    py,
                    "tools/evaluate.py",
                    "--load",
                    save,
                    "--input",
                    data_file,
                    "--tokenizer-model",
                    tokenizer,
                    "--output-json",
                    output,
                ] + (["--cpu"] if args.cpu else [])
                if s["max_documents"]:
                    command += ["--max-documents", s["max_documents"]]
                _run(f"evaluate {folder} on {data_name}", command, output)
    _report(work, names, seeds)
    return 0


def _validation_curve(summary: dict, records: list) -> list:
    """(training tokens, model FLOPs, validation loss) at each validation of a run, counted from the
    run's own first step.

    Both stages consume the same tokens per step; a patch-stage step costs the FLOPs the
    trainer's summary gives per patch iteration (about 1/K of a token-stage step). A control's
    records carry global iteration numbers (its token stage starts after the lambda*N patch
    steps it skips); they are counted from its own first step here.
    """
    stages = summary["stages"]
    tokens_per_step = summary["total_tokens"] / sum(stage["iterations"] for stage in stages.values())
    patch = stages.get("patch", {"iterations": 0, "flops": 0.0})
    patch_step_flops = patch["flops"] / max(patch["iterations"], 1)
    token = stages.get("token", {"iterations": 0, "flops": 0.0})
    token_step_flops = token["flops"] / max(token["iterations"], 1)
    train = [record for record in records if record["kind"] == "train" and "stage_iteration" in record]
    skipped = 0 if "patch" in stages or not train else train[0]["iteration"] - train[0]["stage_iteration"]
    curve = []
    for record in records:
        if record["kind"] != "valid":
            continue
        step = record["iteration"] - skipped
        patch_steps = min(step, patch["iterations"])
        flops = patch_steps * patch_step_flops + (step - patch_steps) * token_step_flops
        curve.append((step * tokens_per_step, flops, record["loss"]))
    return curve


def _spread(values: list) -> str:
    """One value as it is; several as mean ± sample standard deviation [min, max]."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f} [{min(values):.4f}, {max(values):.4f}]"


def _report(work: Path, names: list, seeds: list) -> None:
    losses, seconds, epochs = {}, {}, {}
    for name in names:
        for seed in seeds:
            folder = run_folder(name, seed)
            summary = json.loads((work / folder / "summary.json").read_text())
            seconds.setdefault(name, []).append(sum(stage["seconds"] for stage in summary["stages"].values()))
            if summary.get("stage_split") == "epochs":
                epochs[name] = " + ".join(
                    f"{stage} {values['epochs']:.2f}" for stage, values in summary["stages"].items()
                )
            for data_name in ("valid", "wikitext103"):
                loss = json.loads((work / f"eval_{folder}_{data_name}.json").read_text())["loss"]
                losses.setdefault((name, data_name), []).append(loss)
    lines = [
        "| run | cost (theory) | wall s | valid loss | valid ppl | WikiText-103 loss | WikiText-103 ppl |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in names:
        valid, wiki = losses[(name, "valid")], losses[(name, "wikitext103")]
        lines.append(
            f"| {name} | {theoretical_cost(name):.3f} | {statistics.fmean(seconds[name]):.0f} | {_spread(valid)} | "
            f"{math.exp(statistics.fmean(valid)):.2f} | {_spread(wiki)} | {math.exp(statistics.fmean(wiki)):.2f} |"
        )
    pairs = [name for name in FRACTIONS if name in names and f"control-{name}" in names]
    if pairs:
        lines += [
            "",
            "| lambda | transfer, valid (control − patch+token) | transfer, WikiText-103 | "
            "patch+token − token-only, valid |",
            "| --- | --- | --- | --- |",
        ]
        for name in pairs:
            transfer = {
                data: [c - p for c, p in zip(losses[(f"control-{name}", data)], losses[(name, data)])]
                for data in ("valid", "wikitext103")
            }
            versus = (
                _spread([p - t for p, t in zip(losses[(name, "valid")], losses[("token-only", "valid")])])
                if "token-only" in names
                else "(token-only not run)"
            )
            lines.append(f"| {name} | {_spread(transfer['valid'])} | {_spread(transfer['wikitext103'])} | {versus} |")
        lines += ["", "transfer > 0: the patch stage helped the token stage; < 0: it hurt (paired by seed)."]
    if epochs:
        lines += [
            "",
            "Epochs over the training documents per stage (--stage-split epochs): "
            + "; ".join(f"{name}: {text}" for name, text in epochs.items())
            + ".",
        ]
    if len(seeds) > 1:
        lines += [
            f"Losses: mean ± sample standard deviation [min, max] over seeds {', '.join(map(str, seeds))}; "
            f"perplexities of the mean loss."
        ]
    table = "\n".join(lines)
    print("\n" + table)
    curves = {}
    for name in names:
        folder = run_folder(name, seeds[0])
        summary = json.loads((work / folder / "summary.json").read_text())
        records = [json.loads(line) for line in (work / folder / "metrics.jsonl").read_text().splitlines()]
        curves[name] = _validation_curve(summary, records)
    # a control starts where its patch run's token stage starts: placed there on the token axis
    offsets = {name: FRACTIONS[name[len("control-") :]] if name in CONTROLS else 0.0 for name in names}
    (work / "curves.json").write_text(
        json.dumps(
            {
                name: [{"tokens": t, "flops": f, "valid_loss": loss} for t, f, loss in points]
                for name, points in curves.items()
            },
            indent=1,
        )
    )
    report = [f"# Small-scale reproduction ({time.strftime('%Y-%m-%d')})", "", table, ""]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        report.append("(matplotlib not installed: no plot)")
    else:
        figure, (by_tokens, by_flops) = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
        total = max((p[0] for name, points in curves.items() if name not in CONTROLS for p in points), default=0.0)
        for name, points in curves.items():
            if points:
                style = "--" if name in CONTROLS else "-"
                shift = offsets[name] * total
                by_tokens.plot(
                    [(p[0] + shift) / 1e6 for p in points], [p[2] for p in points], style, marker=".", label=name
                )
                by_flops.plot([p[1] / 1e15 for p in points], [p[2] for p in points], style, marker=".", label=name)
        by_tokens.set_xlabel("training tokens (millions; a control placed at its token stage)")
        by_flops.set_xlabel("training compute (model PFLOP)")
        by_tokens.set_ylabel("validation loss, token level (nats)")
        by_flops.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(work / "loss_curves.png", dpi=120)
        report.append(f"![validation loss](loss_curves.png) (seed {seeds[0]})")
    (work / "report.md").write_text("\n".join(report) + "\n")
    print(f"report: {work / 'report.md'}")


if __name__ == "__main__":
    sys.exit(main())
