"""The cases of the bad-input matrix (``benchmarks/chaos.py --bad-inputs``): every tool and the
trainer on damaged or wrong input, each with the strings its one error line must name, the outputs
that must not exist afterwards and the input folders that must not change
(:mod:`benchmarks.bad_inputs` runs them).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import numpy

from benchmarks.common import tiny_run_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {
    name: os.path.join(REPO, "tools", f"{name}.py")
    for name in ("preprocess_data", "merge_datasets", "train_tokenizer", "evaluate", "export_hf", "convert_checkpoint")
}
SCRIPTS["trainer"] = os.path.join(REPO, "examples", "pretrain_patch_gpt.py")


@dataclass
class Case:
    name: str
    tool: str
    argv: List[str]
    names: List[str]  # strings the error line must contain (the file, the value)
    outputs: List[str] = field(default_factory=list)  # paths that must not exist afterwards
    watched: List[str] = field(default_factory=list)  # input folders that must not change


def _copy_pair(prefix: str, folder: str, name: str) -> str:
    copy = os.path.join(folder, name)
    for ext in (".bin", ".idx"):
        shutil.copyfile(prefix + ext, copy + ext)
    return copy


def _shard(folder: str) -> str:
    return os.path.join(folder, sorted(n for n in os.listdir(folder) if n.endswith(".distcp"))[0])


def _damaged_checkpoint(source: str, folder: str, name: str, damage: Callable[[str], str]) -> tuple:
    """A copy of checkpoint ``source`` damaged by ``damage(copy) -> the file it damaged``."""
    copy = os.path.join(folder, name)
    shutil.copytree(source, copy)
    return copy, damage(copy)


def _truncate(path: str, keep: Optional[int] = None) -> str:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2 if keep is None else keep)
    return path


def _zero_4k(path: str) -> str:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\0" * 4096)
    return path


def _write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def build_cases(work: str, prefix: str, tokenizer: str, root: str, final: str) -> List[Case]:
    """``prefix``/``tokenizer``: a good corpus and its model; ``root``: a finished --save folder of
    the chaos run (12 iterations, tiny preset); ``final``: its last checkpoint."""
    shutil.rmtree(work, ignore_errors=True)  # a re-run's cases and leftovers are its own
    os.makedirs(work)
    w = lambda *parts: os.path.join(work, *parts)  # noqa: E731
    out = w("out")
    os.makedirs(out, exist_ok=True)
    good = _write(w("good.jsonl"), b'{"text": "A perfectly good document."}\n' * 20)
    cases: List[Case] = []

    # ---------------------------------------------------------------- preprocess_data
    def pre(name, inputs, names, extra=(), model=tokenizer, output=None):
        output = output or os.path.join(out, name)
        cases.append(
            Case(
                name,
                "preprocess_data",
                ["--input", *inputs, "--tokenizer-model", model, "--output-prefix", output, *extra],
                names,
                [output + "_text_document.bin", output + "_text_document.idx"],
                [out],
            )
        )

    pre("pre-missing-input", [w("absent.jsonl")], ["absent.jsonl"])
    pre("pre-empty-glob", [w("nothing*.jsonl")], ["nothing*.jsonl"])
    pre("pre-bad-json", [_write(w("bad.jsonl"), b'{"text": "ok"}\n{"text": oops}\n')], ["bad.jsonl:2"])
    pre("pre-missing-key", [_write(w("nokey.jsonl"), b'{"body": "x"}\n')], ["nokey.jsonl:1", "text"])
    pre("pre-not-string", [_write(w("num.jsonl"), b'{"text": 5}\n')], ["num.jsonl:1"])
    pre("pre-bad-utf8", [_write(w("utf.jsonl"), b'{"text": "\xff\xfe"}\n')], ["utf.jsonl:1"])
    pre(
        "pre-truncated-xz",
        [_write(w("cut.jsonl.xz"), open(os.path.join(REPO, "examples", "data", "tiny.jsonl.xz"), "rb").read()[:5000])],
        ["cut.jsonl.xz"],
    )
    pre("pre-missing-model", [good], ["absent.model"], model=w("absent.model"))
    pre("pre-garbage-model", [good], ["garbage.model"], model=_write(w("garbage.model"), b"\0garbage"))
    pre("pre-missing-folder", [good], [w("nodir")], output=w("nodir", "x"))
    pre("pre-bad-flag", [good], ["--bogus"], extra=["--bogus"])
    pre("pre-zero-workers", [good], ["--workers", "0"], extra=["--workers", "0"])
    pre("pre-zero-partitions", [good], ["--partitions", "0"], extra=["--partitions", "0"])
    gz_data = gzip.compress(b'{"text": "A perfectly good document."}\n' * 20)
    pre("pre-gzip-named-jsonl", [_write(w("gz.jsonl"), gz_data)], ["gz.jsonl", "rename it"])
    pre("pre-plain-named-gz", [_write(w("plain.jsonl.gz"), b'{"text": "x"}\n')], ["plain.jsonl.gz", "rename it"])
    pre("pre-pretty-json", [_write(w("pretty.json"), b'[\n  {"text": "x"}\n]\n')], ["pretty.json:1", "JSON Lines"])
    stale = os.path.join(out, "pre-stale-shard")
    for ext in (".bin", ".idx"):  # shard 3 of an earlier 4-partition run; names are all that is checked
        _write(f"{stale}_3_text_document{ext}", b"")
    pre("pre-stale-shard", [good], [f"{os.path.basename(stale)}_3_text_document"], extra=["--partitions", "2"])

    # ---------------------------------------------------------------- merge_datasets
    pairs = w("pairs")
    os.makedirs(pairs, exist_ok=True)

    def merge(name, inputs, names, output=None):
        output = output or os.path.join(out, name)
        cases.append(
            Case(
                name,
                "merge_datasets",
                ["--input", *inputs, "--output-prefix", output],
                names,
                [output + ".bin", output + ".idx"],
                [out, pairs],
            )
        )

    merge("merge-missing", [w("absent_text_document")], ["absent_text_document"])
    p = _copy_pair(prefix, pairs, "cut_bin")
    _truncate(p + ".bin")
    merge("merge-truncated-bin", [prefix, p], [p + ".bin", "truncated"])
    p = _copy_pair(prefix, pairs, "long_bin")
    open(p + ".bin", "ab").write(b"\0\0")
    merge("merge-extended-bin", [prefix, p], [p + ".bin"])
    p = _copy_pair(prefix, pairs, "empty_idx")
    _write(p + ".idx", b"")
    merge("merge-empty-idx", [prefix, p], [p + ".idx"])
    p = _copy_pair(prefix, pairs, "random_idx")
    _write(p + ".idx", numpy.random.default_rng(0).bytes(4096))
    merge("merge-random-idx", [prefix, p], [p + ".idx"])
    p = _copy_pair(prefix, pairs, "cut_idx")
    _truncate(p + ".idx", os.path.getsize(p + ".idx") - 8)
    merge("merge-truncated-idx", [prefix, p], [p + ".idx"])
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(os.path.join(pairs, "wide.bin"), dtype=numpy.int32)
    builder.add_document(numpy.arange(5), [5])
    builder.finalize(os.path.join(pairs, "wide.idx"))
    merge("merge-dtype-mismatch", [prefix, os.path.join(pairs, "wide")], ["int32"])
    merge("merge-missing-folder", [prefix], [w("nodir")], output=w("nodir", "m"))
    os.makedirs(w("emptydir"), exist_ok=True)
    merge("merge-empty-folder", [w("emptydir")], ["emptydir"])

    # ---------------------------------------------------------------- train_tokenizer
    def tok(name, argv, names, output=None):
        output = output or os.path.join(out, name)
        cases.append(
            Case(
                name,
                "train_tokenizer",
                [*argv, "--output-prefix", output],
                names,
                [output + ".model", output + ".vocab"],
                [out],
            )
        )

    tok("tok-missing-input", ["--input", w("absent.jsonl")], ["absent.jsonl"])
    tok("tok-vocab-below-300", ["--input", good, "--vocab-size", "100"], ["--vocab-size 100"])
    tok("tok-vocab-not-int", ["--input", good, "--vocab-size", "many"], ["many"])
    tok("tok-coverage-range", ["--input", good, "--character-coverage", "0.5"], ["0.5"])
    tok("tok-bad-json", ["--input", w("bad.jsonl")], ["bad.jsonl:2"])
    tok("tok-missing-folder", ["--input", good], [w("nodir")], output=w("nodir", "t"))
    tok("tok-unwritable-folder", ["--input", good], ["/proc"], output="/proc/tokenizer")
    cjk = [json.dumps({"text": "".join(chr(0x4E00 + (i * 7 + j) % 3000) for j in range(60))}) for i in range(300)]
    tok(
        "tok-too-many-characters",
        [
            "--input",
            _write(w("cjk.jsonl"), "\n".join(cjk).encode()),
            "--vocab-size",
            "400",
            "--character-coverage",
            "1",
        ],
        ["--vocab-size 400"],
    )

    # ---------------------------------------------------------------- checkpoints, damaged
    damaged = w("damaged")
    os.makedirs(damaged, exist_ok=True)
    kinds = {
        "truncated-shard": lambda c: _truncate(_shard(c)),
        "zeroed-shard": lambda c: _zero_4k(_shard(c)),
        "no-common.pt": lambda c: (os.remove(os.path.join(c, "common.pt")), os.path.join(c, "common.pt"))[1],
        "no-.metadata": lambda c: (os.remove(os.path.join(c, ".metadata")), os.path.join(c, ".metadata"))[1],
        "bad-manifest": lambda c: _write(os.path.join(c, "manifest.json"), b'{"files": '),
        "bad-json": lambda c: _write(os.path.join(c, "megatron_patch.json"), b"{not json"),
    }
    from megatron_patch.checkpoint.info import patch_stage_end

    patch = patch_stage_end(root)  # the conversion tool reads patch-stage weights only
    assert patch is not None, f"{root} holds no patch-stage checkpoint"
    source = {"evaluate": final, "export_hf": final, "convert_checkpoint": patch}
    copies = {}
    for tool in ("evaluate", "export_hf", "convert_checkpoint"):
        for kind, damage in kinds.items():
            copies[tool, kind] = _damaged_checkpoint(source[tool], damaged, f"{tool}-{kind}", damage)
    data = ["--data-path", prefix, "--max-documents", "4"]

    def tool_case(tool, name, argv, names):
        target = os.path.join(out, name + (".json" if tool == "evaluate" else ""))
        flag = ["--output-json", target] if tool == "evaluate" else ["--save", target]
        extra = data if tool == "evaluate" else []
        cases.append(Case(name, tool, ["--cpu", *argv, *extra, *flag], names, [target], [out]))

    for tool in ("evaluate", "export_hf", "convert_checkpoint"):
        short = {"evaluate": "eval", "export_hf": "export", "convert_checkpoint": "convert"}[tool]
        for kind in kinds:
            copy, file = copies[tool, kind]
            tool_case(tool, f"{short}-{kind}", ["--load", copy], [file])
        tool_case(tool, f"{short}-missing", ["--load", w("absent-ckpt")], ["absent-ckpt"])
        other_shape = ["--load", final, "--model", "cpu-small"]
        tool_case(tool, f"{short}-other-shape", other_shape, [final, "another model shape"])
    tool_case(
        "evaluate",
        "eval-tp3",
        ["--load", final, "--tensor-model-parallel-size", "3"],
        ["--tensor-model-parallel-size 3"],
    )
    tool_case("evaluate", "eval-stride", ["--load", final, "--stride", "4"], ["--stride 4"])
    cases.append(
        Case(
            "eval-truncated-bin",
            "evaluate",
            [
                "--cpu",
                "--load",
                final,
                "--data-path",
                os.path.join(pairs, "cut_bin"),
                "--output-json",
                os.path.join(out, "e.json"),
            ],
            [os.path.join(pairs, "cut_bin.bin")],
            [os.path.join(out, "e.json")],
            [out],
        )
    )
    cases.append(
        Case(
            "eval-random-idx",
            "evaluate",
            [
                "--cpu",
                "--load",
                final,
                "--data-path",
                os.path.join(pairs, "random_idx"),
                "--output-json",
                os.path.join(out, "e.json"),
            ],
            [os.path.join(pairs, "random_idx.idx")],
            [os.path.join(out, "e.json")],
            [out],
        )
    )
    cases.append(
        Case(
            "eval-bad-jsonl",
            "evaluate",
            ["--cpu", "--load", final, "--input", w("bad.jsonl")],
            ["bad.jsonl, line 2"],
            [],
            [out],
        )
    )
    tp3, pp3 = ["--tensor-model-parallel-size", "3"], ["--pipeline-model-parallel-size", "3"]
    tool_case("convert_checkpoint", "convert-tp3", ["--load", patch, *tp3], ["--tensor-model-parallel-size 3"])
    tool_case("convert_checkpoint", "convert-pp3", ["--load", patch, *pp3], ["--pipeline-model-parallel-size 3"])
    tool_case("convert_checkpoint", "convert-world", ["--load", patch, "--tensor-model-parallel-size", "2"], ["= 2"])
    os.makedirs(os.path.join(out, "taken"), exist_ok=True)
    taken = ["--cpu", "--load", final, "--save", os.path.join(out, "taken")]
    cases.append(Case("export-existing-output", "export_hf", taken, ["taken"], [], [out]))
    taken = ["--cpu", "--load", patch, "--save", os.path.join(out, "taken")]
    cases.append(Case("convert-existing-output", "convert_checkpoint", taken, ["taken"], [], [out]))

    # ---------------------------------------------------------------- the trainer

    def trainer(name, argv, names, data_path=prefix, model=tokenizer, save=None, watched=()):
        save = save or os.path.join(out, name)
        cases.append(
            Case(
                name,
                "trainer",
                [*tiny_run_flags(data_path, model), "--eval-iters", "0", "--save-interval", "2", "--save", save, *argv],
                names,
                [] if save != os.path.join(out, name) else [save],
                [out, *watched],
            )
        )

    trainer("train-missing-data", [], ["absent_text_document"], data_path=w("absent_text_document"))
    trainer("train-truncated-bin", [], [os.path.join(pairs, "cut_bin.bin")], data_path=os.path.join(pairs, "cut_bin"))
    random_idx = os.path.join(pairs, "random_idx")
    trainer("train-random-idx", [], [random_idx + ".idx"], data_path=random_idx)
    trainer("train-empty-idx", [], [os.path.join(pairs, "empty_idx.idx")], data_path=os.path.join(pairs, "empty_idx"))
    trainer("train-missing-tokenizer", [], ["absent.model"], model=w("absent.model"))
    trainer("train-bad-lr", ["--lr", "-1"], ["--lr -1"])
    trainer("train-seq-length-zero", ["--seq-length", "0"], ["--seq-length 0"])
    trainer("train-dropout-one", ["--hidden-dropout", "1"], ["--hidden-dropout 1.0"])
    trainer("train-exit-duration-zero", ["--exit-duration-in-mins", "0"], ["--exit-duration-in-mins 0.0"])
    trainer("train-profile-window", ["--profile", "--profile-step-start", "0"], ["--profile-step-start 0"])
    trainer("train-seq-length-beyond-corpus", ["--seq-length", "100000"], ["--seq-length 100000", prefix])
    trainer("train-bad-flag", ["--bogus"], ["--bogus"])
    trainer("train-tp3", ["--tensor-model-parallel-size", "3"], ["TP x PP = 3"])
    for kind in ("truncated-shard", "zeroed-shard", "no-common.pt", "no-.metadata", "bad-manifest"):
        resumable = os.path.join(damaged, f"trainer-{kind}")
        shutil.copytree(root, resumable)
        newest = os.path.join(resumable, "iter_0000012")
        file = kinds[kind](newest)
        trainer(f"train-load-{kind}", ["--load", resumable], [file], save=resumable, watched=[resumable])
    bad_tracker = os.path.join(damaged, "trainer-tracker")
    shutil.copytree(root, bad_tracker)
    _write(os.path.join(bad_tracker, "latest_checkpointed_iteration.txt"), b"twelve\n")
    trainer("train-load-bad-tracker", ["--load", bad_tracker], [bad_tracker], save=bad_tracker, watched=[bad_tracker])
    other_plan = os.path.join(damaged, "trainer-plan")
    shutil.copytree(root, other_plan)
    trainer(
        "train-load-other-plan",
        ["--load", other_plan, "--global-batch-size", "32"],
        ["--global-batch-size"],
        save=other_plan,
        watched=[other_plan],
    )
    return cases
