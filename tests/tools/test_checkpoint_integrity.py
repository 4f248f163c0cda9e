"""Checkpoint integrity as every tool sees it: a truncated shard, 4 KiB zeroed inside a shard (same
size), a deleted common.pt or .metadata and an unreadable manifest are each refused by
convert_checkpoint, evaluate and export_hf with one line that names the file, before
dist_checkpointing reads it; nothing is left behind. A checkpoint without a manifest (written
before manifests existed) still loads, with a warning; one whose metadata says it was written with
one is refused without it."""

import errno
import json
import logging
import os
import shutil

import pytest

from megatron_patch.checkpoint import folders, manifest
from megatron_patch.checkpoint import store as checkpoint
from megatron_patch.checkpoint.folders import METADATA
from tests.tools.common import assert_one_line_error, call, leftovers
from tools import convert_checkpoint, evaluate, export_hf


def _shard(folder):
    return sorted(name for name in os.listdir(folder) if name.endswith(".distcp"))[0]


def _truncate(folder):
    name = _shard(folder)
    with open(os.path.join(folder, name), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(folder, name)) // 2)
    return name, "bytes, manifest.json says"


def _zero_4k(folder):
    name = _shard(folder)
    path = os.path.join(folder, name)
    assert os.path.getsize(path) > 3 * 4096
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\0" * 4096)
    return name, "CRC-32"


def _delete(name):
    def damage(folder):
        os.remove(os.path.join(folder, name))
        return name, "is missing"

    return damage


def _garble_manifest(folder):
    with open(os.path.join(folder, manifest.MANIFEST), "w") as f:
        f.write('{"files": ')
    return manifest.MANIFEST, "unreadable manifest"


DAMAGE = {
    "truncated-shard": _truncate,
    "zeroed-4KiB": _zero_4k,
    "no-common.pt": _delete("common.pt"),
    "no-.metadata": _delete(".metadata"),
    "bad-manifest": _garble_manifest,
}


def _damaged_copy(source, tmp_path, how):
    copy = tmp_path / "damaged"
    shutil.copytree(source, copy)
    name, expected = DAMAGE[how](str(copy))
    return copy, name, expected


def _argv(tool, source, tmp_path):
    out = tmp_path / "out"
    if tool is evaluate:
        (tmp_path / "d.jsonl").write_text(json.dumps({"text": "It was the best of times."}) + "\n")
        return ["--cpu", "--load", source, "--input", tmp_path / "d.jsonl", "--output-json", out], out
    return ["--cpu", "--load", source, "--save", out], out


@pytest.mark.parametrize("tool", [convert_checkpoint, evaluate, export_hf], ids=lambda t: t.__name__.split(".")[-1])
@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_checkpoint_is_one_line_naming_the_file(trained, tmp_path, capsys, tool, how):
    if tool is export_hf:
        pytest.importorskip("safetensors")
    # the conversion tool reads patch-stage weights, the others the final checkpoint
    source, name, expected = _damaged_copy(trained["patch" if tool is convert_checkpoint else "final"], tmp_path, how)
    argv, out = _argv(tool, source, tmp_path)
    code, _, err = call(tool, argv, capsys)
    assert_one_line_error(code, err, expected)
    assert os.path.join(str(source), name) in err[0]
    assert not out.exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("tool", [convert_checkpoint, evaluate], ids=lambda t: t.__name__.split(".")[-1])
def test_a_shard_that_cannot_be_read_is_one_line_naming_it(trained, tmp_path, capsys, monkeypatch, tool):
    """An I/O error (a failing disk, a lost network mount) while a shard is checksummed."""
    source = trained["patch" if tool is convert_checkpoint else "final"]
    shard = os.path.join(source, _shard(source))
    crc32_of = manifest.crc32_of

    def failing_read(path, **options):
        if path == shard:
            raise OSError(errno.EIO, os.strerror(errno.EIO), path)
        return crc32_of(path, **options)

    monkeypatch.setattr(manifest, "crc32_of", failing_read)
    argv, out = _argv(tool, source, tmp_path)
    code, _, err = call(tool, argv, capsys)
    assert_one_line_error(code, err, f"{shard} cannot be read (Input/output error): the checkpoint is corrupt")
    assert not out.exists() and not leftovers(tmp_path)


def test_every_file_of_a_saved_checkpoint_is_in_its_manifest(trained):
    folder = trained["final"]
    files = manifest.read_manifest(folder)
    assert sorted(files) == sorted(name for name in os.listdir(folder) if name != manifest.MANIFEST)
    for name, entry in files.items():
        assert manifest.check_file(folder, name, entry) is None


def test_checkpoint_without_manifest_loads_with_a_warning(trained, tmp_path, capsys, caplog):
    """A checkpoint from before manifests: neither the file nor the metadata's record of it."""
    copy = tmp_path / "old"
    shutil.copytree(trained["final"], copy)
    os.remove(copy / manifest.MANIFEST)
    meta = json.loads((copy / METADATA).read_text())
    del meta["manifest"]
    (copy / METADATA).write_text(json.dumps(meta))
    _zero_4k(str(copy))  # undetectable without a manifest: shows the check is really skipped
    with caplog.at_level(logging.WARNING):
        checkpoint.check_files(str(copy))
    assert "has no manifest.json" in caplog.text


@pytest.mark.parametrize("source", ["trained", "converted"])
def test_a_checkpoint_written_with_a_manifest_is_refused_without_it(trained, converted, tmp_path, source):
    """Its metadata says it had one: a copy that lacks it is incomplete (shards may be missing too)."""
    copy = tmp_path / "partial"
    shutil.copytree(folders.resolve_checkpoint(trained["final"] if source == "trained" else converted), copy)
    os.remove(copy / manifest.MANIFEST)
    with pytest.raises(checkpoint.CheckpointError, match="manifest.json is missing, though the checkpoint was written"):
        checkpoint.check_files(str(copy))
    checkpoint.check_files(str(copy), verify=False)  # --no-checkpoint-verify


def test_verify_false_skips_the_checksums(trained, tmp_path):
    copy = tmp_path / "zeroed"
    shutil.copytree(trained["final"], copy)
    _zero_4k(str(copy))
    checkpoint.check_files(str(copy), verify=False)  # the flag --no-checkpoint-verify passes
    with pytest.raises(checkpoint.CheckpointError, match="CRC-32"):
        checkpoint.check_files(str(copy))


def _truncated_corpus(trained, tmp_path):
    copy = str(tmp_path / "cut_text_document")
    for ext in (".bin", ".idx"):
        shutil.copyfile(trained["corpus"]["prefix"] + ext, copy + ext)
    with open(copy + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(copy + ".bin") - 1000)
    return copy


def test_evaluate_names_a_truncated_bin(trained, tmp_path, capsys):
    copy = _truncated_corpus(trained, tmp_path)
    out = tmp_path / "out.json"
    code, _, err = call(
        evaluate, ["--cpu", "--load", trained["final"], "--data-path", copy, "--output-json", out], capsys
    )
    assert_one_line_error(code, err, f"{copy}.bin has")
    assert "truncated" in err[0] and not out.exists()


def test_trainer_names_a_truncated_bin_before_training(trained, tmp_path, capsys):
    from megatron_patch.training import cli
    from tests.training.common import trainer_args

    copy = _truncated_corpus(trained, tmp_path)
    corpus = dict(trained["corpus"], prefix=copy)
    save = tmp_path / "run"
    code, _, err = call(cli, trainer_args(corpus, save, "--eval-iters", "0", train_iters=2), capsys)
    assert code == 2, err
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and f"{copy}.bin has" in errors[0], err
    assert "Traceback" not in "\n".join(err)
