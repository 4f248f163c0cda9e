"""Where a trainer run starts: a resume from --load (also of a folder never created, and with
--pretrained-checkpoint beside it, as the launch scripts pass it), its metrics after a resume, the
--save folder's lock, and a failed start that leaves no folder."""

import json
import os
import shutil

from megatron_patch.checkpoint import folders
from megatron_patch.training import cli
from tests.training.common import train_records, trainer_args


def test_a_requeued_token_stage_resumes_from_load_not_from_the_pretrained_weights(
    cpu_world, tiny_corpus, tmp_path, capsys
):
    """The launch scripts always pass --load SAVE: with --pretrained-checkpoint too (Megatron-LM's
    rule), the first run starts from the patch stage's weights and a requeued one resumes from its
    own --save. A converted checkpoint (weights only) given as --load is named as such."""
    from tools import convert_checkpoint

    patch = tmp_path / "patch"
    assert cli.main(trainer_args(tiny_corpus, patch, "--stage", "patch", "--eval-iters", "0", train_iters=12)) == 0
    boundary = folders.checkpoint_dir(str(patch), 8)
    token = tmp_path / "token"
    argv = trainer_args(
        tiny_corpus,
        token,
        "--stage",
        "token",
        "--load",
        str(token),
        "--pretrained-checkpoint",
        boundary,
        "--save-interval",
        "2",
        "--keep-last-checkpoints",
        "0",
        "--eval-iters",
        "0",
        train_iters=12,
    )
    assert cli.main(argv) == 0
    uninterrupted = train_records(token)
    assert sorted(uninterrupted) == [9, 10, 11, 12]
    shutil.rmtree(folders.checkpoint_dir(str(token), 12))  # as if killed after the save at 10
    (token / folders.TRACKER).write_text("10\n")
    assert cli.main(argv) == 0
    resumed = train_records(token)
    assert [resumed[i]["loss"] for i in (11, 12)] == [uninterrupted[i]["loss"] for i in (11, 12)]
    assert folders.read_tracker(str(token)) == 12

    converted = tmp_path / "converted"
    assert convert_checkpoint.main(["--cpu", "--load", boundary, "--save", str(converted)]) == 0
    capsys.readouterr()
    assert cli.main(trainer_args(tiny_corpus, None, "--stage", "token", "--load", str(converted))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "(weights only, no optimizer state): start the token stage from it with" in err[0], err


def test_load_of_a_folder_never_created_starts_fresh(cpu_world, tiny_corpus, tmp_path, caplog):
    """A run killed during start-up never created its --save folder: a blind restart with --load
    of it starts from scratch, as with an empty folder."""
    run = tmp_path / "never-created"
    assert cli.main(trainer_args(tiny_corpus, run, "--load", str(run), "--eval-iters", "0", train_iters=3)) == 0
    assert folders.read_tracker(str(run)) == 3
    assert "holds no checkpoint yet: starting from scratch" in caplog.text


def test_a_resumed_run_logs_each_step_once(cpu_world, tiny_corpus, tmp_path):
    """A run killed after its checkpoint at iteration 2 had logged steps 3-6; the resumed run drops
    those records and logs them again, once."""
    run = tmp_path / "run"
    argv = trainer_args(
        tiny_corpus, run, "--save-interval", "2", "--eval-iters", "0", "--keep-last-checkpoints", "0", train_iters=6
    )
    assert cli.main(argv) == 0
    for iteration in (4, 6):  # as if killed right after the save at iteration 2
        shutil.rmtree(folders.checkpoint_dir(str(run), iteration))
    (run / folders.TRACKER).write_text("2\n")
    assert cli.main(argv + ["--load", str(run)]) == 0
    with open(run / "metrics.jsonl") as f:
        iterations = [json.loads(line)["iteration"] for line in f if '"kind": "train"' in line]
    assert iterations == [1, 2, 3, 4, 5, 6]


def test_a_second_trainer_on_the_same_save_folder_fails_at_once(cpu_world, tiny_corpus, tmp_path, capsys):
    from megatron_patch.checkpoint.lock import SaveDirLock

    run = tmp_path / "run"
    with SaveDirLock(str(run)):  # the first trainer (this test process) holds the folder
        code = cli.main(trainer_args(tiny_corpus, run, "--eval-iters", "0", train_iters=3))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is in use by another trainer (host " in err[0], err
    assert f"pid {os.getpid()}" in err[0]
    assert not os.listdir(run)


def test_a_failed_start_leaves_no_save_folder(cpu_world, tiny_corpus, tmp_path, capsys):
    """Bad data (before the run) and a bad --pretrained-checkpoint (inside it) leave nothing behind."""
    missing_data = trainer_args(tiny_corpus, tmp_path / "a", "--data-path", str(tmp_path / "absent"))
    assert cli.main(missing_data) == 2
    not_a_checkpoint = tmp_path / "empty"
    not_a_checkpoint.mkdir()
    bad_start = trainer_args(
        tiny_corpus, tmp_path / "b", "--stage", "token", "--pretrained-checkpoint", str(not_a_checkpoint)
    )
    assert cli.main(bad_start) == 2
    capsys.readouterr()
    assert sorted(os.listdir(tmp_path)) == ["empty"]
