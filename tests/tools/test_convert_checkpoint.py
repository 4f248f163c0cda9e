"""tools/convert_checkpoint.py in a world of one: a patch-stage checkpoint becomes a token-stage
start (weights bit for bit, metadata recorded, optimizer dropped); every bad input is one line,
exit 2, and leaves nothing behind; so is a write that fails (a full disk); a failed self-check
exits 1 and leaves nothing either.
(Resharding across TP/PP and the token stage started from the result: tests/dist.)"""

import errno
import json
import multiprocessing
import os
import shutil

import pytest
import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies import filesystem_async

from megatron_patch.checkpoint import folders
from megatron_patch.checkpoint import store as checkpoint
from megatron_patch.conversion import reshard
from megatron_patch.runtime import atomic_file
from megatron_patch.runtime.owned_temp import OwnedTempDir
from megatron_patch.training import cli
from tests.leftover_helpers import killed_owner_folder
from tests.tools.common import assert_one_line_error, call, leftovers, model_tensors, tokenizer_of
from tests.tools.conftest import ITERS, PAD_TO
from tests.training.common import full_disk_in, metadata_write_fails_in, trainer_args
from tools import convert_checkpoint


def test_patch_checkpoint_becomes_a_token_stage_start(trained, tmp_path, capsys):
    save = tmp_path / "token-start"
    code, out, err = call(
        convert_checkpoint, ["--cpu", "--load", trained["patch"], "--save", save, "--tolerance", "1e-6"], capsys
    )
    assert code == 0, err
    assert "max absolute difference 0.000e+00" in out  # same layout: the very same weights
    assert folders.read_tracker(str(save)) == 0
    converted = folders.resolve_checkpoint(str(save))
    meta = checkpoint.read_metadata(converted)
    source = checkpoint.read_metadata(trained["patch"])
    assert meta["iteration"] == 0
    assert meta["progress"]["stage"] == "token" and meta["progress"]["stage_iteration"] == 0
    assert meta["model_shape"] == source["model_shape"]
    info = meta["conversion"]
    assert info["source"] == trained["patch"] and info["source_stage"] == "patch"
    assert info["patch_size"] == 4 and info["patch_data_fraction"] == pytest.approx(2 / 3)
    assert info["consumed_tokens"] == source["progress"]["consumed_tokens"] and info["consumed_tokens"]["patch"] > 0
    assert info["source_layout"] == {"data": 1, "pipeline": 1, "tensor": 1}
    assert info["max_abs_logit_diff"] == 0.0
    # weights only, bit for bit
    keys = set(dist_checkpointing.load_tensors_metadata(converted))
    assert not any(k.startswith("optimizer") for k in keys)
    before, after = model_tensors(trained["patch"]), model_tensors(converted)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not leftovers(tmp_path)


def test_force_replaces_an_earlier_conversion_and_nothing_else(trained, tmp_path, capsys):
    """--force replaces an earlier conversion's output; a folder that holds anything else (a user's
    file beside the output, a training run one level down) is refused and left as it was."""
    save = tmp_path / "out"
    code, _, err = call(convert_checkpoint, ["--cpu", "--load", trained["patch"], "--save", save], capsys)
    assert code == 0, err
    run = tmp_path / "patch-run"  # a --save root whose latest checkpoint is the patch stage's
    shutil.copytree(trained["patch"], run / "iter_0000004")
    (run / folders.TRACKER).write_text("4\n")
    code, _, err = call(convert_checkpoint, ["--cpu", "--load", run, "--save", save, "--force"], capsys)
    assert code == 0, err
    # --load of a --save root takes its latest checkpoint
    source = json.load(open(save / "iter_0000000" / "megatron_patch.json"))["conversion"]["source"]
    assert source == str(run / "iter_0000004")
    assert not leftovers(tmp_path)
    (save / "notes.txt").write_text("mine")
    shutil.copytree(trained["root"], save / "runs" / "other")
    code, _, err = call(convert_checkpoint, ["--cpu", "--load", trained["patch"], "--save", save, "--force"], capsys)
    assert_one_line_error(code, err, "holds 'notes.txt' and 1 more, not this tool's earlier output; --force replaces")
    assert (save / "notes.txt").read_text() == "mine" and os.path.isdir(save / "runs" / "other" / "iter_0000006")
    assert os.path.isdir(save / "iter_0000000")


def test_a_converted_checkpoint_converts_again_and_starts_the_token_stage(trained, tmp_path, capsys):
    """Converting the tool's output again (to change its layout) keeps the patch-stage source's
    record, so the trainer's token stage starts from the second output as from the first."""
    first, second = tmp_path / "first", tmp_path / "second"
    code, _, err = call(convert_checkpoint, ["--cpu", "--load", trained["patch"], "--save", first], capsys)
    assert code == 0, err
    code, out, err = call(convert_checkpoint, ["--cpu", "--load", first, "--save", second], capsys)
    assert code == 0, err
    assert f"next: --stage token --pretrained-checkpoint {second}" in out
    info = checkpoint.read_metadata(folders.resolve_checkpoint(str(second)))["conversion"]
    assert info["source"] == str(first / "iter_0000000") and info["previous_conversion"]["source"] == trained["patch"]
    assert info["source_stage"] == "patch" and info["source_stage_complete"] is True
    argv = trainer_args(
        trained["corpus"],
        tmp_path / "token",
        *("--stage", "token", "--pretrained-checkpoint", second, "--eval-iters", "0"),
        *("--make-vocab-size-divisible-by", str(PAD_TO)),
        train_iters=ITERS,
    )
    assert cli.main([str(a) for a in argv]) == 0
    assert checkpoint.read_metadata(folders.resolve_checkpoint(str(tmp_path / "token")))["progress"]["stage_complete"]


def test_a_token_stage_source_is_refused_naming_the_patch_stage_checkpoint(trained, tmp_path, capsys):
    """The token stage starts from patch-stage weights only: a run's root, whose latest checkpoint
    is the token stage's, is refused at once, naming the run's patch-stage boundary checkpoint; a
    token-stage checkpoint without one beside it is refused with the general fix."""
    save = tmp_path / "out"
    code, _, err = call(convert_checkpoint, ["--cpu", "--load", trained["root"], "--save", save], capsys)
    assert_one_line_error(
        code,
        err,
        f"--load {trained['root']} (its latest checkpoint {trained['final']}) holds token-stage weights, and the "
        f"token stage starts from the patch stage's: pass --load {trained['patch']}, the run's last patch-stage",
    )
    alone = tmp_path / "token-run" / "iter_0000006"
    shutil.copytree(trained["final"], alone)
    code, _, err = call(convert_checkpoint, ["--cpu", "--load", alone, "--save", save], capsys)
    assert_one_line_error(code, err, f"--load {alone} holds token-stage weights")
    assert "pass the patch stage's last checkpoint (its --save's iter_N at the stage boundary" in err[0]
    assert not save.exists() and not leftovers(tmp_path)


@pytest.mark.parametrize(
    "vocab, expected",
    [(512, "another vocabulary than the one checkpoint"), (700, "has 700 pieces (padded: 768) but checkpoint")],
    ids=["same-size", "other-size"],
)
def test_another_tokenizer_is_refused(trained, tmp_path, capsys, other_texts, vocab, expected):
    """--tokenizer-model must be the model's own (the trainer would map ids to other pieces): of
    another vocabulary of the same size, or of another size (not a TP padding matter)."""
    save = tmp_path / "out"
    tokenizer = tokenizer_of(tmp_path, other_texts, vocab)
    argv = ["--cpu", "--load", trained["patch"], "--save", save, "--tokenizer-model", tokenizer]
    code, _, err = call(convert_checkpoint, argv, capsys)
    assert_one_line_error(code, err, expected)
    assert not save.exists() and not leftovers(tmp_path)


def _corrupt_copy(trained, tmp_path, what):
    copy = tmp_path / "bad"
    shutil.copytree(trained["patch"], copy)
    if what == "tensors":
        for name in os.listdir(copy):
            if name.endswith(".distcp"):
                with open(copy / name, "r+b") as f:
                    f.truncate(100)
    else:
        (copy / folders.METADATA).write_text("{not json")
    return copy


BAD = {
    "missing": (lambda t, p: ["--load", p / "nowhere"], "no such directory"),
    "corrupt-tensors": (lambda t, p: ["--load", _corrupt_copy(t, p, "tensors")], "manifest.json says"),
    "corrupt-metadata": (lambda t, p: ["--load", _corrupt_copy(t, p, "metadata")], "unreadable checkpoint metadata"),
    "tp-heads": (
        lambda t, p: ["--load", t["patch"], "--tensor-model-parallel-size", "3"],
        "--tensor-model-parallel-size 3 does not divide the 4 attention heads",
    ),
    "pp-layers": (
        lambda t, p: ["--load", t["patch"], "--pipeline-model-parallel-size", "3"],
        "--pipeline-model-parallel-size 3 does not divide the 4 layers",
    ),
    "vocab-padding": (
        lambda t, p: ["--load", t["patch"], "--tensor-model-parallel-size", "4"],
        "pads the tokenizer's 512 pieces to 768 rows",
    ),
    "world-size": (
        lambda t, p: ["--load", t["patch"], "--tensor-model-parallel-size", "2"],
        "world size 1 is not a multiple of TP x PP = 2",
    ),
    "other-shape": (lambda t, p: ["--load", t["patch"], "--model", "cpu-small"], "another model shape"),
    "bad-flag": (lambda t, p: ["--load", t["patch"], "--tensor-model-parallel-size", "two"], "invalid int value"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_leaves_nothing(trained, tmp_path, capsys, case):
    make_argv, expected = BAD[case]
    save = tmp_path / "out"
    code, _, err = call(convert_checkpoint, ["--cpu", "--save", save, *make_argv(trained, tmp_path)], capsys)
    assert_one_line_error(code, err, expected)
    assert not save.exists() and not leftovers(tmp_path)


def test_missing_source_is_reported_before_the_device(tmp_path, capsys):
    # Without --cpu a CPU-only machine also lacks the CUDA device; the --load error comes first.
    save = tmp_path / "out"
    code, _, err = call(convert_checkpoint, ["--load", tmp_path / "nowhere", "--save", save], capsys)
    assert_one_line_error(code, err, "no such directory")
    assert not save.exists() and not leftovers(tmp_path)


def test_existing_output_needs_force(trained, tmp_path, capsys):
    save = tmp_path / "out"
    save.mkdir()
    (save / "keep.txt").write_text("mine")
    code, _, err = call(convert_checkpoint, ["--cpu", "--load", trained["patch"], "--save", save], capsys)
    assert_one_line_error(code, err, "already exists: pass --force")
    assert os.listdir(save) == ["keep.txt"] and not leftovers(tmp_path)


def test_output_may_not_replace_the_source(trained, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(trained["patch"], copy / "iter_0000004")
    code, _, err = call(
        convert_checkpoint, ["--cpu", "--load", copy / "iter_0000004", "--save", copy, "--force"], capsys
    )
    assert_one_line_error(code, err, "would replace the source checkpoint")
    assert os.path.isdir(copy / "iter_0000004")


@pytest.mark.parametrize("through", ["path", "symlink"])
def test_output_may_not_replace_the_sources_run_folder(trained, tmp_path, capsys, through):
    run = tmp_path / "run"
    shutil.copytree(trained["root"], run)
    save = run
    if through == "symlink":  # the same folder under another name
        save = tmp_path / "alias"
        save.symlink_to(run)
    code, _, err = call(
        convert_checkpoint, ["--cpu", "--load", run / "iter_0000004", "--save", save, "--force"], capsys
    )
    assert_one_line_error(code, err, "would replace the source checkpoint")
    assert os.path.isdir(run / "iter_0000004") and os.path.isdir(run / "iter_0000006")


def test_force_never_replaces_a_training_checkpoint(trained, tmp_path, capsys):
    """--force replaces an earlier conversion, not what training wrote (here another run's checkpoint)."""
    other = tmp_path / "other" / "iter_0000006"
    shutil.copytree(trained["final"], other)
    code, _, err = call(convert_checkpoint, ["--cpu", "--load", trained["patch"], "--save", other, "--force"], capsys)
    assert_one_line_error(code, err, f"holds the training checkpoint {other}; --force replaces only a tool's earlier")
    assert sorted(os.listdir(other)) == sorted(os.listdir(trained["final"]))


@pytest.mark.parametrize(
    "force, message",
    [
        ([], "was created by someone else while this ran: pass --force"),
        (["--force"], "holds 'theirs.txt', not this tool's earlier output"),
    ],
)
def test_an_output_that_appears_during_the_conversion_is_not_replaced(
    trained, tmp_path, capsys, monkeypatch, force, message
):
    """The final name is checked again at the rename: a folder made there meanwhile (another
    conversion into the same name, here a file of someone's) is kept and this one's output is
    removed, without --force and with it (which replaces only a conversion's output)."""
    save = tmp_path / "out"
    verify = reshard._verify

    def verify_then_someone_writes(plan, converted):
        save.mkdir()
        (save / "theirs.txt").write_text("theirs")
        return verify(plan, converted)

    monkeypatch.setattr(reshard, "_verify", verify_then_someone_writes)
    code, _, err = call(convert_checkpoint, ["--cpu", "--load", trained["patch"], "--save", save, *force], capsys)
    assert_one_line_error(code, err, message)
    assert os.listdir(save) == ["theirs.txt"] and not leftovers(tmp_path)


def test_failed_self_check_exits_1_and_leaves_nothing(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(reshard, "_verify", lambda plan, converted: 0.5)
    save = tmp_path / "out"
    code, _, err = call(convert_checkpoint, ["--cpu", "--load", trained["patch"], "--save", save], capsys)
    assert_one_line_error(code, err, "max absolute logit difference 5.000e-01", exit_code=1)
    assert not save.exists() and not leftovers(tmp_path)


def _tracker_write_fails(monkeypatch):
    """The write of the tracker (rank 0's, into the staged output folder) meets a full disk."""
    write_text = atomic_file.write_text

    def full_disk(path, *args, **kwargs):
        if os.path.basename(path) == folders.TRACKER:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return write_text(path, *args, **kwargs)

    monkeypatch.setattr(atomic_file, "write_text", full_disk)


def _rename_fails(monkeypatch):
    """The final rename of the staged output folder into place is refused."""
    replace = os.replace

    def refused(source, target):
        if os.path.basename(source).startswith(".out.partial-"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), source)
        return replace(source, target)

    monkeypatch.setattr(os, "replace", refused)


WRITE_FAILURES = {  # where the write fails -> (how, the cause the line quotes)
    "shards": (lambda patch: full_disk_in(patch, "iter_0000000"), "No space left on device"),
    "metadata": (lambda patch: metadata_write_fails_in(patch, "iter_0000000"), "No space left on device"),
    "tracker": (_tracker_write_fails, "No space left on device"),
    "rename": (_rename_fails, "Permission denied"),
}


@pytest.mark.parametrize("case", list(WRITE_FAILURES))
def test_a_failed_write_is_one_line_and_leaves_the_output_as_it_was(trained, tmp_path, capsys, monkeypatch, case):
    """A write of the output that fails (a full disk while megatron writes the shards or rank 0 the
    metadata or the tracker; a refused rename at the end) is one line naming the output folder,
    the cause and the fix (exit 2, no traceback); the staged folder is removed and --save is as it
    was: absent, or an earlier conversion's output that --force was to replace."""
    inject, cause = WRITE_FAILURES[case]
    save = tmp_path / "out"
    (save / "iter_0000000").mkdir(parents=True)  # an earlier conversion's output (a refused rename: moved back)
    (save / "iter_0000000" / folders.METADATA).write_text('{"conversion": {}}')
    (save / folders.TRACKER).write_text("0\n")
    before = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*"))
    argv = ["--cpu", "--load", trained["patch"], "--save", save, "--force"]
    with monkeypatch.context() as patch:
        inject(patch)
        code, _, err = call(convert_checkpoint, argv, capsys)
    assert_one_line_error(code, err, f"writing the converted checkpoint {save} failed (")
    assert cause in err[0] and err[0].endswith("then run the conversion again"), err[0]
    assert sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")) == before
    assert not leftovers(tmp_path)


def test_a_completed_conversion_removes_a_killed_runs_partial_folder(trained, tmp_path, capsys):
    killed = killed_owner_folder(tmp_path, ".out.partial-")
    live = OwnedTempDir(str(tmp_path), ".out.partial-")  # a conversion into the same name, still working
    code, _, err = call(convert_checkpoint, ["--cpu", "--load", trained["patch"], "--save", tmp_path / "out"], capsys)
    assert code == 0, err
    assert not os.path.exists(killed)
    assert os.path.isdir(live.path)
    assert not os.path.exists(tmp_path / "out" / ".owner")  # the staged folder's owner file is not output
    live.release()


def test_a_replacement_removes_the_old_output_a_killed_replacement_left(trained, tmp_path, capsys):
    """--force moves the old output into an owned .NAME.replaced- folder before removing it; one
    that a kill left behind (holding an old output) is removed by the next commit there."""
    killed = killed_owner_folder(tmp_path, ".out.replaced-")
    os.makedirs(os.path.join(killed, "out"))  # the old output it held
    (tmp_path / "out").mkdir()
    argv = ["--cpu", "--load", trained["patch"], "--save", tmp_path / "out", "--force"]
    code, _, err = call(convert_checkpoint, argv, capsys)
    assert code == 0, err
    assert not os.path.exists(killed)
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.path.isdir(tmp_path / "out" / "iter_0000000")


def test_the_conversion_starts_no_helper_process(trained, tmp_path, capsys, monkeypatch):
    """megatron's torch_dist writer collects its results through a multiprocessing Manager it
    starts at its first save unless given a queue; a SIGTERM to the process group kills that helper
    and the save fails. The conversion saves as the trainer does: in this process."""
    monkeypatch.setattr(filesystem_async, "_results_queue", None)  # as in a fresh process
    # an earlier --async-save run in this pytest worker leaves its helpers (the results Manager, the writer) running
    before = set(multiprocessing.active_children())
    code, _, err = call(convert_checkpoint, ["--cpu", "--load", trained["patch"], "--save", tmp_path / "out"], capsys)
    assert code == 0, err
    assert set(multiprocessing.active_children()) - before == set()
