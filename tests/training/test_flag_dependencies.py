"""Flags and summaries, through the trainer's command line: an output path, seed or flag combination
the run could not honour is refused when the flags are read (one stderr line, exit code 2, before
the model is built), a warm-up longer than a stage is logged, and the summaries hold strict JSON
(null for a loss the run does not know) with each finished stage's losses kept across a resume."""

import json
import logging
import os
import shutil
import signal

import pytest

from megatron_patch.training import arguments, cli, loop
from megatron_patch.training.arguments import parse_args
from megatron_patch.training.progress import restore_results
from tests.training.common import refused_line, train_records, trainer_args

ITERS = 12  # 8 patch steps, 4 token steps


@pytest.fixture
def no_model(monkeypatch):
    """A flag check that is missing lets the trainer be built: fail loudly there (exit code 1)."""

    def built(self, *args, **kwargs):
        raise AssertionError("the trainer was built: the flags were not refused when read")

    monkeypatch.setattr(loop.Trainer, "__init__", built)


def sigterm_in_step(number):
    """``loop.train_step`` that sends this process SIGTERM during step ``number`` (1-based) of a run."""
    train_step, steps = loop.train_step, []

    def step_then_signal(*args, **kwargs):
        steps.append(True)
        if len(steps) == number:
            os.kill(os.getpid(), signal.SIGTERM)
        return train_step(*args, **kwargs)

    return step_then_signal


def _strict_json(text):
    """JSON as the standard defines it: NaN and Infinity are not JSON."""

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


# ----------------------------------------------------------------- --summary-json and --seed


@pytest.mark.parametrize("case", ["folder-is-a-file", "file-above-the-folder", "path-is-a-folder"])
def test_summary_json_that_cannot_be_written_is_refused_at_start(tiny_corpus, tmp_path, capsys, no_model, case):
    """Before: the run trained to the end (or to a SIGTERM stop) and then failed with a traceback,
    exit code 1."""
    if case == "folder-is-a-file":
        (tmp_path / "file").write_text("")
        path, expected = tmp_path / "file" / "summary.json", "on its path is a file"
    elif case == "file-above-the-folder":
        (tmp_path / "file").write_text("")
        path, expected = tmp_path / "file" / "sub" / "summary.json", "on its path is a file"
    else:
        path, expected = tmp_path, "is a directory"
    line = refused_line(capsys, trainer_args(tiny_corpus, None, "--summary-json", str(path)))
    assert f"--summary-json {path}" in line and expected in line, line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any folder")
def test_summary_json_in_a_read_only_folder_is_refused(tiny_corpus, tmp_path, capsys, no_model):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        line = refused_line(capsys, trainer_args(tiny_corpus, None, "--summary-json", str(folder / "s.json")))
    finally:
        folder.chmod(0o755)
    assert "is not writable" in line, line


def test_summary_json_in_a_folder_the_run_creates_is_written(cpu_world, tiny_corpus, tmp_path):
    """The usual --save DIR --summary-json DIR/summary.json: the folder is made by the run."""
    save = tmp_path / "run"
    summary = save / "s" / "summary.json"
    argv = trainer_args(tiny_corpus, save, "--eval-iters", "0", "--summary-json", str(summary), train_iters=3)
    assert cli.main(argv) == 0
    assert not _strict_json(summary.read_text())["interrupted"]


def test_summary_json_in_an_existing_folder_is_accepted(tiny_corpus, tmp_path):
    (tmp_path / "old.json").write_text("{}")  # an existing file is replaced at the end
    for path in (tmp_path / "new.json", tmp_path / "old.json"):
        config = parse_args(trainer_args(tiny_corpus, None, "--summary-json", str(path)), world_size=1)
        assert config.logging.summary_json == str(path)


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_seed_outside_numpy_s_range_is_one_line(tiny_corpus, capsys, no_model, seed):
    """Before: numpy's ValueError traceback when the datasets were built."""
    line = refused_line(capsys, trainer_args(tiny_corpus, None, "--seed", seed))
    assert f"--seed {seed} must lie in [0, 4294967295]" in line, line
    for good in ("0", str(2**32 - 1)):
        assert parse_args(trainer_args(tiny_corpus, None, "--seed", good), world_size=1).seed == int(good)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-workers", "100000"], f"--num-workers 100000 is more than this machine's {os.cpu_count()} CPUs"),
        (["--patch-size", "1", "--patch-data-fraction", "5"], "--patch-data-fraction 5.0 must lie in (0, 1)"),
        (["--profile", "--profile-dir", "{file}"], "--profile-dir {file}: {file} on its path is a file"),
    ],
    ids=["workers-beyond-the-cpus", "lambda-at-k1", "profile-dir-a-file"],
)
def test_values_the_run_would_fail_on_later_are_refused(tiny_corpus, tmp_path, capsys, no_model, flags, message):
    """Before: 100000 data workers were started (the machine ran out of memory), λ = 5 at K=1 was
    ignored, and a --profile-dir that is a file failed at the profiling window with a traceback."""
    file = tmp_path / "a-file"
    file.write_text("")
    flags = [flag.format(file=file) for flag in flags]
    line = refused_line(capsys, trainer_args(tiny_corpus, tmp_path / "run", *flags))
    assert message.format(file=file) in line, line


def test_a_data_prefix_listed_twice_is_refused(cpu_world, tiny_corpus, capsys):
    """Before: its documents were counted, and trained on, twice (here the second names it by another path)."""
    prefix = tiny_corpus["prefix"]
    again = os.path.join(os.path.dirname(prefix), ".", os.path.basename(prefix))
    line = refused_line(capsys, trainer_args(tiny_corpus, None, "--data-path", prefix, again))
    assert f"--data-path lists '{again}' twice (as '{prefix}' too)" in line, line


# ----------------------------------------------------------------- flags that would do nothing


@pytest.mark.parametrize(
    "flags, needs, message",
    [
        (["--manual-gc-interval", "4"], ["--manual-gc"], "--manual-gc-interval 4 needs --manual-gc"),
        (["--manual-gc-interval", "0"], ["--manual-gc"], "--manual-gc-interval 0 needs --manual-gc"),
        (["--profile-step-start", "10"], ["--profile"], "--profile-step-start 10 needs --profile"),
        (["--profile-step-end", "12"], ["--profile"], "--profile-step-end 12 needs --profile"),
        (["--profile-ranks", "0"], ["--profile"], "--profile-ranks 0 needs --profile"),
        (["--profile-dir", "p"], ["--profile"], "--profile-dir p needs --profile"),
    ],
)
def test_a_flag_whose_switch_is_off_is_refused(tiny_corpus, tmp_path, capsys, no_model, flags, needs, message):
    """Each was silently ignored; the same flags with the switch on are accepted. Values equal to
    the defaults count: the user gave them."""
    save = tmp_path / "run"
    line = refused_line(capsys, trainer_args(tiny_corpus, save, *flags))
    assert message in line, line
    parse_args(trainer_args(tiny_corpus, save, *flags, *needs), world_size=1)


def test_the_switches_alone_keep_their_defaults(tiny_corpus, tmp_path):
    save = tmp_path / "run"
    config = parse_args(trainer_args(tiny_corpus, save, "--manual-gc", "--profile"), world_size=1)
    assert config.manual_gc_interval == 0  # collect at start only
    assert (config.profile.first_step, config.profile.end_step, config.profile.ranks) == (10, 12, (0,))
    assert config.profile.folder == os.path.join(str(save), "profile")
    flags = config.flags  # what checkpoints and W&B record: the values the run uses
    assert (flags["manual_gc_interval"], flags["profile_step_start"], flags["profile_step_end"]) == (0, 10, 12)
    assert flags["profile_ranks"] == [0]
    config = parse_args(trainer_args(tiny_corpus, save), world_size=1)
    assert config.manual_gc_interval is None and config.profile is None and config.logging.eval_interval is None
    config = parse_args(trainer_args(tiny_corpus, save, "--eval-iters", "0"), world_size=1)
    assert config.plan.validation.iterations == 0


def test_an_eval_interval_without_validation_is_said(tiny_corpus, tmp_path, caplog):
    """A warning, not a refusal: the launch scripts pass --eval-interval, and appending --eval-iters 0
    to them turns validation off."""
    with caplog.at_level(logging.WARNING, logger="megatron_patch.training.arguments"):
        config = parse_args(trainer_args(tiny_corpus, tmp_path / "run", "--eval-iters", "0", "--eval-interval", "5"), 1)
    assert config.plan.validation.iterations == 0
    assert "--eval-interval 5 does nothing with --eval-iters 0 (validation is off)" in caplog.text


# ----------------------------------------------------------------- warm-up longer than a stage


def test_a_warmup_longer_than_a_stage_is_logged(tiny_corpus, caplog, monkeypatch):
    """--lr-warmup-iters 6 of 8 patch and 4 token steps: the token stage is all warm-up (the
    scheduler clamps it to the stage) and its LR never decays: said once, on rank 0. A warm-up of
    3 decays in the last step; one of 4 (as long as the stage) would not (test_flag_validation.py)."""
    argv = trainer_args(tiny_corpus, None, "--lr-warmup-iters", "6", train_iters=ITERS)
    with caplog.at_level(logging.WARNING, logger="megatron_patch"):
        parse_args(argv, world_size=1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert "--lr-warmup-iters 6" in warnings[0] and "token stage's 4 iterations" in warnings[0], warnings
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megatron_patch"):
        parse_args(trainer_args(tiny_corpus, None, "--lr-warmup-iters", "3", train_iters=ITERS), world_size=1)
        monkeypatch.setattr(arguments, "rank", lambda: 1)  # another rank of the same run
        parse_args(argv, world_size=1)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_the_warmup_warning_comes_from_the_command(cpu_world, tiny_corpus, tmp_path, caplog):
    """Through the command line, a run of --stage token alone (its one stage is the whole budget)."""
    argv = trainer_args(
        tiny_corpus, tmp_path / "run", "--stage", "token", "--eval-iters", "0", "--lr-warmup-iters", "5", train_iters=3
    )
    with caplog.at_level(logging.INFO):
        assert cli.main(argv) == 0
    assert "--lr-warmup-iters 5 is not less than the token stage's 1 iteration:" in caplog.text


# ----------------------------------------------------------------- summaries


def test_summaries_are_json_and_keep_finished_stages_losses_across_a_resume(
    cpu_world, tiny_corpus, tmp_path, monkeypatch
):
    """SIGTERM in the token stage's second step: the stop saves there (exit 0, summary written);
    the resumed run's summary still holds the patch stage's last and validation losses, and every
    line of metrics.jsonl and the --summary-json file is strict JSON (before: "last_loss": NaN for
    the stage finished before the resume, and its valid_loss null). The patch stage's loss is named
    patch_loss; a record's "tokens" are its stage's and "run_tokens" the run's; the finished stage's
    peak memory is kept; the interrupted run's summary record is dropped on resume."""
    save, summary_path = tmp_path / "run", tmp_path / "summary.json"
    argv = trainer_args(tiny_corpus, save, "--summary-json", str(summary_path), train_iters=ITERS)
    with monkeypatch.context() as patch:
        patch.setattr(loop, "train_step", sigterm_in_step(10))
        assert cli.main(argv) == 0
    stopped = _strict_json(summary_path.read_text())
    assert stopped["interrupted"] and stopped["stages"]["token"]["iterations"] == 2
    patch_stage = stopped["stages"]["patch"]
    assert "last_loss" not in patch_stage and patch_stage["last_patch_loss"] == train_records(save)[8]["patch_loss"]
    assert patch_stage["valid_loss"] == train_records(save, "valid")[8]["loss"]
    assert patch_stage["peak_memory_gib"] > 0
    assert stopped["corpus_train_tokens"] > 0 and "training_tokens" not in stopped
    with open(save / "metrics.jsonl") as f:
        raw = {r["iteration"]: r for r in map(json.loads, f) if r["kind"] == "train"}
    assert "loss" not in raw[8] and "patch_loss" not in raw[9]
    assert raw[9]["tokens"] == raw[9]["run_tokens"] - raw[8]["run_tokens"]
    assert raw[8]["tokens"] == raw[8]["run_tokens"] and (raw[8]["patch_size"], raw[9]["patch_size"]) == (4, 1)

    assert cli.main(argv + ["--load", str(save)]) == 0
    text = summary_path.read_text()
    resumed = _strict_json(text)
    assert not resumed["interrupted"]
    assert resumed["stages"]["patch"]["last_patch_loss"] == patch_stage["last_patch_loss"]
    assert resumed["stages"]["patch"]["valid_loss"] == patch_stage["valid_loss"]
    assert resumed["stages"]["patch"]["peak_memory_gib"] == patch_stage["peak_memory_gib"]
    assert resumed["stages"]["token"]["last_loss"] == train_records(save)[ITERS]["loss"]
    assert resumed["stages"]["token"]["valid_loss"] == train_records(save, "valid")[ITERS]["loss"]
    with open(save / "metrics.jsonl") as f:
        summaries = [record for record in map(_strict_json, f) if record["kind"] == "summary"]
    assert [s["interrupted"] for s in summaries] == [False]  # the interrupted run's was dropped


@pytest.mark.parametrize("stop_step", [None, 8, ITERS])
def test_a_resume_after_a_stages_last_step_keeps_its_validation(
    cpu_world, tiny_corpus, tmp_path, monkeypatch, stop_step
):
    """A stage's closing validation runs before its last save, so a resume from that checkpoint
    (None: the patch stage's, the run rolled back to it) reports it. A SIGTERM in a stage's last
    step (8: the patch stage's, 12: the token stage's, the run's last) saves there without
    validating; the resumed run validates those weights (that stage's last) first."""
    save, summary_path = tmp_path / "run", tmp_path / "summary.json"
    argv = trainer_args(tiny_corpus, save, "--summary-json", str(summary_path), train_iters=ITERS)
    uninterrupted = tmp_path / "uninterrupted"
    assert cli.main(trainer_args(tiny_corpus, uninterrupted, train_iters=ITERS)) == 0
    expected = {it: record["loss"] for it, record in train_records(uninterrupted, "valid").items()}
    if stop_step is None:
        assert cli.main(argv) == 0
        for name in os.listdir(save):  # back to the boundary checkpoint, as if the run had ended there
            if name.startswith("iter_") and name != "iter_0000008":
                shutil.rmtree(save / name)
        (save / "latest_checkpointed_iteration.txt").write_text("8\n")
    else:
        with monkeypatch.context() as patch:
            patch.setattr(loop, "train_step", sigterm_in_step(stop_step))
            assert cli.main(argv) == 0
        assert stop_step not in train_records(save, "valid")  # the stop saved without validating
    assert cli.main(argv + ["--load", str(save)]) == 0
    resumed = _strict_json(summary_path.read_text())
    assert not resumed["interrupted"]
    for stage, iteration in (("patch", 8), ("token", ITERS)):
        assert resumed["stages"][stage]["valid_loss"] == pytest.approx(expected[iteration], rel=1e-6), stage
        assert train_records(save, "valid")[iteration]["loss"] == pytest.approx(expected[iteration], rel=1e-6)


def test_a_stage_not_run_has_a_null_last_loss(cpu_world, tiny_corpus, tmp_path, monkeypatch):
    """SIGTERM in the patch stage: the token stage has no loss yet: null, not NaN."""
    monkeypatch.setattr(loop, "train_step", sigterm_in_step(2))
    summary_path = tmp_path / "summary.json"
    argv = trainer_args(tiny_corpus, tmp_path / "run", "--eval-iters", "0", "--summary-json", str(summary_path))
    assert cli.main(argv) == 0
    summary = _strict_json(summary_path.read_text())
    assert summary["interrupted"] and summary["stages"]["token"]["last_loss"] is None
    assert summary["stages"]["token"]["valid_loss"] is None


def test_progress_of_older_checkpoints_restores_unknown_losses_as_null(tiny_corpus):
    """Checkpoints written before the losses were recorded in their progress."""
    plan = parse_args(trainer_args(tiny_corpus, None, train_iters=ITERS), world_size=1).plan
    progress = {"consumed_tokens": {"patch": 8 * 512, "token": 512}, "seconds": {"patch": 1.0, "token": 0.1}}
    results = restore_results(plan.stages, progress, 1.0)
    assert [(r.last_loss, r.valid_loss) for r in results] == [(None, None), (None, None)]
