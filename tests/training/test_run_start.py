"""Where a trainer run starts: a resume from --load (also of a folder never created, and with
--pretrained-checkpoint beside it, as the launch scripts pass it), its metrics after a resume, the
--save folder's lock, a failed start that leaves no folder, and the one-line refusals of a
checkpoint that --load, --save or --pretrained-checkpoint name but the run cannot start from
(``training/resume.py``)."""

import json
import os
import shutil

import pytest

from megatron_patch.checkpoint import folders
from megatron_patch.training import cli
from tests.conftest import REPO_ROOT
from tests.training.common import copy_corpus, refused_line, train_records, trainer_args
from tools import train_tokenizer

pytestmark = pytest.mark.slow  # whole-pipeline subprocess runs: scheduled first (tests/conftest.py)


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


def test_a_requeued_fork_resumes_from_its_own_save(cpu_world, tiny_corpus, tmp_path, caplog):
    """`--load RUN/iter_N --save FORK` run again (a requeue runs the same command): it resumes from
    FORK's latest checkpoint, not from RUN/iter_N (which would train those steps again and overwrite
    FORK's), and ends as the uninterrupted fork does."""
    run, fork = tmp_path / "run", tmp_path / "fork"
    every = ("--eval-iters", "0", "--save-interval", "1", "--keep-last-checkpoints", "0")
    assert cli.main(trainer_args(tiny_corpus, run, *every, train_iters=6)) == 0
    boundary = folders.checkpoint_dir(str(run), 2)
    argv = trainer_args(tiny_corpus, fork, "--load", boundary, *every, train_iters=6)
    assert cli.main(argv) == 0
    uninterrupted = train_records(fork)
    assert sorted(uninterrupted) == [3, 4, 5, 6]
    for iteration in (5, 6):  # as if killed after the save at 4
        shutil.rmtree(folders.checkpoint_dir(str(fork), iteration))
    (fork / folders.TRACKER).write_text("4\n")
    assert cli.main(argv) == 0
    assert f"--save {fork} holds this run's checkpoints (it started from --load {boundary}): resuming" in caplog.text
    resumed = train_records(fork)
    assert [resumed[i]["loss"] for i in (5, 6)] == [uninterrupted[i]["loss"] for i in (5, 6)]
    assert folders.read_tracker(str(fork)) == 6


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


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "corrupt",
        "other_shape",
        "changed_plan",
        "changed_seed",
        "rewritten_corpus",
        "shuffled_corpus",
        "not_empty_save",
        "pretrained_into_used_save",
        "pretrained_token_stage",
        "pretrained_other_patch_size",
        "pretrained_other_budget",
        "pretrained_other_tokenizer",
        "rollback_into_the_same_save",
        "rollback_with_a_trailing_slash",
        "changed_lr",
        "changed_optimizer_sharding",
        "changed_dtype",
        "save_is_a_checkpoint",
        "save_is_a_file",
        "metadata_not_an_object",
        "bad_flags",
    ],
)
def test_bad_load_and_flags_give_one_line_errors(cpu_world, tiny_corpus, tmp_path, capsys, case):
    run = tmp_path / "run"
    if case in ("rewritten_corpus", "shuffled_corpus"):  # trained on a copy of the corpus, rewritten below
        tiny_corpus = dict(tiny_corpus, prefix=copy_corpus(tiny_corpus["prefix"], tmp_path / "copy" / "tiny"))
    if case != "missing" and case != "bad_flags":
        assert cli.main(trainer_args(tiny_corpus, run, "--eval-iters", "0", train_iters=3)) == 0
        capsys.readouterr()
    if case == "missing":
        argv = trainer_args(tiny_corpus, None, "--stage", "token", "--pretrained-checkpoint", str(tmp_path / "nowhere"))
        expected = "no such directory"
    elif case == "corrupt":
        ckpt_dir = folders.checkpoint_dir(str(run), 3)
        for name in os.listdir(ckpt_dir):
            if name.endswith(".distcp"):
                with open(os.path.join(ckpt_dir, name), "r+b") as f:
                    f.truncate(100)
        argv = trainer_args(tiny_corpus, run, "--load", str(run), train_iters=3)
        expected = "the checkpoint is corrupt"
    elif case == "other_shape":
        argv = trainer_args(tiny_corpus, None, "--load", str(run), train_iters=3)
        argv[argv.index("tiny")] = "cpu-small"
        expected = "another model shape"
    elif case == "changed_plan":
        argv = trainer_args(tiny_corpus, run, "--load", str(run), train_iters=6)
        expected = "written with --train-iters 3, this run has 6: resume with the same value"
    elif case == "changed_seed":
        argv = trainer_args(tiny_corpus, run, "--load", str(run), "--seed", "7", train_iters=3)
        expected = "this run has 7: resume with the same value"
    elif case == "rewritten_corpus":  # re-preprocessed in place: the samples' order is another one
        copy_corpus(tiny_corpus["prefix"], tiny_corpus["prefix"], drop_last=1)
        argv = trainer_args(tiny_corpus, run, "--load", str(run), train_iters=3)
        expected = "tokens; this run's " + tiny_corpus["prefix"] + " holds "  # the counts of both, named
    elif case == "shuffled_corpus":  # the same documents in another order: the same counts
        copy_corpus(tiny_corpus["prefix"], tiny_corpus["prefix"], reverse=True)
        argv = trainer_args(tiny_corpus, run, "--load", str(run), train_iters=3)
        expected = "(the same counts: other documents, or the same in another order)"
    elif case == "not_empty_save":
        argv = trainer_args(tiny_corpus, run, train_iters=3)
        expected = "already holds checkpoints"
    elif case == "pretrained_into_used_save":  # its checkpoints would be taken for this run's
        boundary = folders.checkpoint_dir(str(run), 2)
        argv = trainer_args(tiny_corpus, run, "--stage", "token", "--pretrained-checkpoint", boundary, train_iters=3)
        expected = "already holds checkpoints"
    elif case == "pretrained_token_stage":  # the root's tracker names the final, token-stage checkpoint
        argv = trainer_args(tiny_corpus, None, "--stage", "token", "--pretrained-checkpoint", str(run), train_iters=3)
        expected = "holds token-stage weights: start the token stage from the patch stage's last checkpoint"
    elif case == "pretrained_other_patch_size":
        boundary = folders.checkpoint_dir(str(run), 2)
        argv = trainer_args(
            tiny_corpus,
            None,
            "--stage",
            "token",
            "--pretrained-checkpoint",
            boundary,
            "--patch-size",
            "2",
            train_iters=3,
        )
        expected = "was trained with --patch-size 4, this run has 2: give the patch stage's value"
    elif case == "pretrained_other_budget":  # the token stage is the rest of the patch run's plan
        boundary = folders.checkpoint_dir(str(run), 2)
        argv = trainer_args(tiny_corpus, None, "--stage", "token", "--pretrained-checkpoint", boundary, train_iters=6)
        expected = "was written with --train-iters 3, this run has 6: give the patch run's value"
    elif case == "pretrained_other_tokenizer":  # 512 pieces too (the data's ids fit), other ones
        other = tmp_path / "unigram"
        source = str(REPO_ROOT / "examples" / "data" / "tiny.jsonl.xz")
        assert (
            train_tokenizer.main(
                ["--input", source, "--vocab-size", "512", "--model-type", "unigram", "--output-prefix", str(other)]
            )
            == 0
        )
        boundary = folders.checkpoint_dir(str(run), 2)
        argv = trainer_args(tiny_corpus, None, "--stage", "token", "--pretrained-checkpoint", boundary, train_iters=3)
        argv[argv.index("--tokenizer-model") + 1] = str(other) + ".model"
        expected = "was trained with another tokenizer"
    elif case == "rollback_into_the_same_save":  # it would keep the old iteration 3 and prune its own
        argv = trainer_args(tiny_corpus, run, "--load", folders.checkpoint_dir(str(run), 2), train_iters=3)
        expected = "is iteration 2 but --save " + str(run) + " also holds the later checkpoints 3"
    elif case == "rollback_with_a_trailing_slash":  # the same checkpoint, not "another run"
        argv = trainer_args(tiny_corpus, run, "--load", folders.checkpoint_dir(str(run), 2) + "/", train_iters=3)
        expected = "is iteration 2 but --save " + str(run) + " also holds the later checkpoints 3"
    elif case == "changed_lr":  # the loaded optimizer would keep the old peak learning rate
        argv = trainer_args(tiny_corpus, run, "--load", str(run), "--lr", "1e-4", train_iters=3)
        expected = "was written with --lr 0.003, this run has 0.0001: resume with the same value"
    elif case == "changed_optimizer_sharding":  # the saved optimizer state has the other form
        argv = trainer_args(tiny_corpus, run, "--load", str(run), "--use-distributed-optimizer", train_iters=3)
        expected = "was written with --use-distributed-optimizer False, this run has True: resume with the same value"
    elif case == "changed_dtype":  # bf16 keeps fp32 main parameters in the optimizer state, fp32 none
        argv = trainer_args(tiny_corpus, run, "--load", str(run), "--bf16", train_iters=3)
        expected = "was written with --bf16 False, this run has True: resume with the same value"
    elif case == "save_is_a_checkpoint":  # a resume would later read this checkpoint's own metadata
        argv = trainer_args(tiny_corpus, folders.checkpoint_dir(str(run), 3), train_iters=3)
        expected = "is one checkpoint (it holds megatron_patch.json), not a --save folder"
    elif case == "save_is_a_file":
        (tmp_path / "a_file").write_text("")
        argv = trainer_args(tiny_corpus, tmp_path / "a_file" / "run", train_iters=3)
        expected = "cannot be created or locked"
    elif case == "metadata_not_an_object":
        (run / "iter_0000003" / folders.METADATA).write_text("[1, 2]")
        argv = trainer_args(tiny_corpus, run, "--load", str(run), train_iters=3)
        expected = "holds a JSON list, not checkpoint metadata"
    else:
        argv = trainer_args(tiny_corpus, None, "--global-batch-size", "8")
        expected = "must be a multiple of K x micro-batch"
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and expected in err[0], err


def test_the_same_corpus_under_another_path_resumes_and_starts_the_token_stage(
    cpu_world, tiny_corpus, tmp_path, caplog
):
    """The corpus of a run may sit at another path (another machine or mount): the checkpoints
    record each prefix's document and token counts, so a resume and a token stage started from the
    patch stage read it there, with a warning naming both paths; the resumed step is the same."""
    run = tmp_path / "run"
    assert cli.main(trainer_args(tiny_corpus, run, "--eval-iters", "0", train_iters=3)) == 0
    uninterrupted = train_records(run)
    moved = tmp_path / "mounted"
    moved.mkdir()
    for suffix in (".bin", ".idx"):
        os.symlink(tiny_corpus["prefix"] + suffix, moved / ("tiny_text_document" + suffix))
    corpus = dict(tiny_corpus, prefix=str(moved / "tiny_text_document"))
    said = (
        f"was trained on --data-path {tiny_corpus['prefix']}; this run reads the same documents and tokens "
        f"under {corpus['prefix']}"
    )
    shutil.rmtree(folders.checkpoint_dir(str(run), 3))  # as if killed after the save at 2
    (run / folders.TRACKER).write_text("2\n")
    with caplog.at_level("WARNING"):
        assert cli.main(trainer_args(corpus, run, "--load", str(run), "--eval-iters", "0", train_iters=3)) == 0
    assert f"--load checkpoint {said}" in caplog.text
    assert train_records(run)[3]["loss"] == uninterrupted[3]["loss"]
    caplog.clear()
    boundary = folders.checkpoint_dir(str(run), 2)
    argv = trainer_args(corpus, None, "--stage", "token", "--pretrained-checkpoint", boundary, "--eval-iters", "0")
    with caplog.at_level("WARNING"):
        assert cli.main([*argv, "--train-iters", "3"]) == 0
    assert f"--pretrained-checkpoint {boundary} {said}" in caplog.text


@pytest.mark.parametrize("case", ["file", "typo", "hf_export", "killed_before_its_first_checkpoint"])
def test_a_load_that_holds_no_checkpoint_is_refused_unless_it_is_the_runs_save(
    cpu_world, tiny_corpus, tmp_path, capsys, case
):
    """Only the run's own --save may be a --load without a checkpoint (a fresh start, as the launch
    scripts pass it): a file, a folder that does not exist (a typo) or another folder without a
    checkpoint is a mistake, not a fresh start. One line, exit 2, and no --save folder left."""
    old = tmp_path / "old"
    (old / "iter_0000012").mkdir(parents=True)
    if case == "file":  # a file of a checkpoint instead of its folder
        load = old / "iter_0000012" / "common.pt"
        load.write_bytes(b"\0" * 8)
        expected = f"--load {load} is a file: name the --save folder of the run (or one iter_N folder in it) to resume"
    elif case == "typo":
        load = tmp_path / "odl"
        expected = f"--load {load}: no such folder (and not this run's --save): name the run's --save folder, or drop"
    else:
        load = tmp_path / "hf"
        load.mkdir()
        if case == "hf_export":
            (load / "config.json").write_text("{}")
            (load / "model.safetensors").write_bytes(b"")
        else:  # its metrics, and a save cut short
            (load / "metrics.jsonl").write_text("")
            (load / "iter_0000002.tmp").mkdir()
        expected = (
            f"--load {load} holds no checkpoint (no latest_checkpointed_iteration.txt, no complete iter_N, no "
            f"megatron_patch.json): name the run's --save folder (or one iter_N folder in it), or drop --load"
        )
    before = sorted(str(path) for path in tmp_path.rglob("*"))
    line = refused_line(capsys, trainer_args(tiny_corpus, tmp_path / "run", "--load", str(load), train_iters=3))
    assert expected in line, line
    assert sorted(str(path) for path in tmp_path.rglob("*")) == before  # no --save folder, --load as it was


def test_load_of_the_empty_save_folder_under_another_spelling_starts_fresh(cpu_world, tiny_corpus, tmp_path, caplog):
    """--load and --save name the same (empty) folder, one relative with a trailing slash: a fresh start."""
    run = tmp_path / "run"
    run.mkdir()
    load = os.path.relpath(run) + os.sep
    assert cli.main(trainer_args(tiny_corpus, run, "--load", load, "--eval-iters", "0", train_iters=3)) == 0
    assert folders.read_tracker(str(run)) == 3
    assert "holds no checkpoint yet: starting from scratch" in caplog.text


def test_a_checkpoint_padded_to_another_vocabulary_names_the_padding(cpu_world, tiny_corpus, tmp_path, capsys):
    """Only the padded vocabulary differs (here --make-vocab-size-divisible-by; TP pads too): the
    message names the padding, not another preset and tokenizer, which the user has right."""
    run = tmp_path / "run"
    assert cli.main(trainer_args(tiny_corpus, run, "--eval-iters", "0", train_iters=3)) == 0
    capsys.readouterr()
    argv = trainer_args(tiny_corpus, run, "--load", str(run), "--make-vocab-size-divisible-by", "7", train_iters=3)
    line = refused_line(capsys, argv)
    assert "holds a vocabulary padded to" in line and "--make-vocab-size-divisible-by" in line, line
