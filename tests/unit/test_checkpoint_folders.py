"""Pruning of a --save root: a removal cut short never leaves a checkpoint that looks complete."""

import os

from megatron_patch.checkpoint import folders


def _root_with_checkpoints(root, iterations):
    for iteration in iterations:
        checkpoint = folders.checkpoint_dir(str(root), iteration)
        os.makedirs(checkpoint)
        for name in ("__0_0.distcp", "common.pt", folders.METADATA):
            with open(os.path.join(checkpoint, name), "w") as f:
                f.write("x")
    (root / folders.TRACKER).write_text(f"{iterations[-1]}\n")


def test_a_pruning_cut_short_leaves_no_complete_looking_checkpoint(tmp_path, monkeypatch):
    _root_with_checkpoints(tmp_path, [2, 4, 6])

    def killed_after_one_file(path, ignore_errors=False):  # the shard goes, the metadata stays
        if os.path.isdir(path):
            os.remove(os.path.join(path, "__0_0.distcp"))

    monkeypatch.setattr(folders.shutil, "rmtree", killed_after_one_file)
    folders.prune(str(tmp_path), keep_last=1)
    assert folders.complete_iterations(str(tmp_path)) == [6]
    assert sorted(os.listdir(tmp_path)) == [
        "iter_0000002.removing",
        "iter_0000004.removing",
        "iter_0000006",
        folders.TRACKER,
    ]
    monkeypatch.undo()
    folders.remove_partial_saves(str(tmp_path))  # what the next completed save does
    assert sorted(os.listdir(tmp_path)) == ["iter_0000006", folders.TRACKER]


def test_pruning_keeps_the_newest_and_the_retained(tmp_path):
    _root_with_checkpoints(tmp_path, [2, 4, 6, 8])
    folders.prune(str(tmp_path), keep_last=2, retain=(2,))
    assert folders.complete_iterations(str(tmp_path)) == [2, 6, 8]
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".removing")]


def test_pruning_finishes_a_removal_left_behind_and_never_raises(tmp_path, monkeypatch, caplog):
    _root_with_checkpoints(tmp_path, [2, 4, 6])
    os.makedirs(tmp_path / "iter_0000002.removing")  # a removal of an earlier iteration 2, cut short
    folders.prune(str(tmp_path), keep_last=2)
    assert sorted(os.listdir(tmp_path)) == ["iter_0000004", "iter_0000006", folders.TRACKER]

    def busy(source, target):
        raise OSError(16, "Device or resource busy", source)

    monkeypatch.setattr(folders.os, "replace", busy)  # a rename that fails leaves the checkpoint whole
    folders.prune(str(tmp_path), keep_last=1)
    assert folders.complete_iterations(str(tmp_path)) == [4, 6]
    assert "could not remove" in caplog.text and "Device or resource busy" in caplog.text
