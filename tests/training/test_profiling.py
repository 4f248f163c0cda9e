"""``--profile``: the trainer writes a Chrome trace of exactly the steps of its window (here across
the stage boundary), logs the top operators, and refuses bad windows with one line."""

import json
import logging
import os

import pytest

from megatron_patch.training import cli
from tests.training.common import trainer_args

ITERS = 12  # K=4, lambda=2/3: 8 patch steps, then 4 token steps


def test_the_trace_holds_the_window_across_the_stage_boundary(cpu_world, tiny_corpus, tmp_path, caplog):
    save = tmp_path / "run"
    window = ["--profile", "--profile-step-start", "8", "--profile-step-end", "10"]
    with caplog.at_level(logging.INFO):
        assert cli.main(trainer_args(tiny_corpus, save, "--eval-iters", "0", *window, train_iters=ITERS)) == 0
    assert os.listdir(save / "profile") == ["rank0_iters8-9.json"]
    with open(save / "profile" / "rank0_iters8-9.json") as handle:
        events = json.load(handle)["traceEvents"]
    steps = sorted({event["name"] for event in events if event.get("name", "").startswith("iteration ")})
    assert steps == ["iteration 8", "iteration 9"]  # the last patch step and the first token step
    names = {event.get("name") for event in events}
    assert any(name and name.startswith("aten::") and "mm" in name for name in names), sorted(names)[:40]
    assert "top operators" in caplog.text and "Self CPU" in caplog.text


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--profile-step-start", "0"], "need 1 <= start < end"),
        (["--profile-step-start", "5", "--profile-step-end", "5"], "need 1 <= start < end"),
        (["--profile-ranks", "3"], "--profile-ranks 3 is not a rank of this run's 1 processes"),
    ],
)
def test_bad_profile_flags_give_one_line(tiny_corpus, tmp_path, capsys, flags, message):
    assert cli.main(trainer_args(tiny_corpus, tmp_path / "run", "--profile", *flags)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not os.path.exists(tmp_path / "run")


def test_profile_needs_a_folder(tiny_corpus, capsys):
    assert cli.main(trainer_args(tiny_corpus, None, "--profile")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--profile needs --profile-dir DIR" in err[0], err
