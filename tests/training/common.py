"""Shared pieces of the trainer tests: the tiny two-stage command line and metrics reading."""

import errno
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.common import tiny_run_flags

REPO_ROOT = Path(__file__).resolve().parents[2]
ENTRY = str(REPO_ROOT / "examples" / "pretrain_patch_gpt.py")


def trainer_args(corpus, save=None, *extra, train_iters=12):
    """The tiny CPU run (``benchmarks.common.tiny_run_flags``: K=4, lambda=2/3 -> 8 patch steps of
    4 x 128 tokens, 4 token steps of 16 x 32) on ``corpus``, validating one batch per stage."""
    args = [*tiny_run_flags(corpus["prefix"], corpus["tokenizer"], train_iters), "--eval-iters", "1"]
    if save:
        args += ["--save", str(save)]
    return args + list(extra)


def refused_line(capsys, argv):
    """The one stderr line of a trainer command that must end with exit code 2 (a user's error)."""
    from megatron_patch.training import cli

    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def train_records(save, kind="train"):
    """metrics.jsonl records of ``kind``, the last record per global iteration (resumed runs repeat).
    A patch-stage record's ``patch_loss`` is also given as ``loss`` here, so that tests can compare
    the training loss of runs step by step whatever the stage."""
    records = {}
    with open(os.path.join(save, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if record["kind"] == kind:
                if "patch_loss" in record:
                    record["loss"] = record["patch_loss"]
                records[record["iteration"]] = record
    return records


def launch(args, **kwargs):
    """Start the trainer as its own process group (so a kill reaches every helper it started)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, ENTRY, *args],
        cwd=REPO_ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


# the trainer with megatron's checkpoint writer slowed down by argv[1] seconds per file, so that a
# signal or a kill lands while a save is being written
_SLOW_WRITER_TRAINER = """
import sys, time
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
write = FileSystemWriterAsync.write_preloaded_data
delay = float(sys.argv[1])
FileSystemWriterAsync.write_preloaded_data = staticmethod(lambda *a, **k: (time.sleep(delay), write(*a, **k))[1])
from megatron_patch.training import cli
sys.exit(cli.main(sys.argv[2:]))
"""


def slow_writer_command(delay_s, args):
    """The command line of the trainer on ``args`` whose checkpoint writes each wait ``delay_s``."""
    return [sys.executable, "-c", _SLOW_WRITER_TRAINER, str(delay_s), *args]


def full_disk_in(monkeypatch, folder_name: str) -> None:
    """Make megatron's checkpoint writer (``filesystem_async._write_item``, in this process and the
    writers it forks) fail with ENOSPC on every file of the folder named ``folder_name`` (e.g.
    ``iter_0000004.tmp``) and write every other file."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    write_item = filesystem_async._write_item

    @functools.wraps(write_item)  # megatron reads its signature
    def full_disk(*args, **kwargs):
        stream = next(arg for arg in args if hasattr(arg, "name") and hasattr(arg, "write"))
        if os.path.basename(os.path.dirname(str(stream.name))) == folder_name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_item(*args, **kwargs)

    monkeypatch.setattr(filesystem_async, "_write_item", full_disk)


def metadata_write_fails_in(monkeypatch, folder_name: str) -> None:
    """Make the write of the checkpoint metadata (``megatron_patch.json``) into the folder named
    ``folder_name`` fail with ENOSPC."""
    from megatron_patch.checkpoint.folders import METADATA
    from megatron_patch.runtime import atomic_file

    write_json = atomic_file.write_json

    def full_disk(path, *args, **kwargs):
        if os.path.basename(os.path.dirname(str(path))) == folder_name and path.endswith(METADATA):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return write_json(path, *args, **kwargs)

    monkeypatch.setattr(atomic_file, "write_json", full_disk)


def copy_corpus(prefix: str, target, drop_last: int = 0, reverse: bool = False) -> str:
    """Write the documents of the ``.bin/.idx`` ``prefix`` but its last ``drop_last`` (in reverse
    order with ``reverse``) as ``target`` (megatron's builder; ``target`` may be ``prefix``,
    rewritten in place); returns ``target``."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    source = IndexedDataset(str(prefix))
    documents = [source[i].copy() for i in range(len(source) - drop_last)]
    documents = documents[::-1] if reverse else documents
    os.makedirs(os.path.dirname(str(target)), exist_ok=True)
    builder = IndexedDatasetBuilder(f"{target}.bin", dtype=source.index.dtype)
    for document in documents:
        builder.add_document(document, [len(document)])
    builder.finalize(f"{target}.idx")
    return str(target)
