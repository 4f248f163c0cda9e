"""benchmarks/transfer_study.py without the study: its run plan, the flags each run gives the
trainer (the control is the token stage alone, as long as patch + token's), the resume of a stopped
run (one tiny run, in-process), the paired transfer arithmetic, and one-line flag errors. The study
itself is run by hand (about 40 CPU minutes)."""

import importlib.util
import statistics
import sys
from fractions import Fraction
from types import SimpleNamespace

import pytest

from tests.conftest import REPO_ROOT
from tests.trainer_plan import stages as trainer_stages


def _study():
    spec = importlib.util.spec_from_file_location(
        "benchmarks_transfer_study", REPO_ROOT / "benchmarks" / "transfer_study.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_plan_and_trainer_flags(tiny_corpus):
    from megatron_patch.training.arguments import parse_args

    study = _study()
    fractions = [Fraction(1, 4), Fraction(2, 3)]
    runs = study.plan_runs([1, 2], fractions, [2, 4])
    # per seed: token-only, and per lambda one control and one patch + token per K
    assert len(runs) == 2 * (1 + 2 * (1 + 2))
    quickstart = study._quickstart()
    s = quickstart.settings(reduced=True)
    data = {"prefix": tiny_corpus["prefix"], "tokenizer": tiny_corpus["tokenizer"]}
    stages = {
        name: trainer_stages(
            parse_args([str(flag) for flag in study.run_flags(run, s, data, quickstart)], world_size=1)
        )
        for name, run in runs.items()
    }
    patch_iters = round(0.25 * s["train_iters"])
    assert stages["patch_token-lambda1_4-K4-seed2"] == {
        "patch": (4, patch_iters),
        "token": (1, s["train_iters"] - patch_iters),
    }
    assert stages["control-lambda1_4-seed2"] == {"token": (1, s["train_iters"] - patch_iters)}  # fresh, as long
    assert stages["token-only-seed1"] == {"token": (1, s["train_iters"])}
    flags = [str(flag) for flag in study.run_flags(runs["control-lambda1_4-seed2"], s, data, quickstart)]
    assert "--pretrained-checkpoint" not in flags and flags[flags.index("--seed") + 1] == "2"


def test_a_stopped_run_resumes_from_its_checkpoint(world, model_parallel, tiny_corpus, tmp_path, monkeypatch):
    """study.train passes --load of the run's own --save folder: a run stopped after its first step
    (by --exit-duration-in-mins, which saves and writes an interrupted summary, as SIGTERM does) is
    not taken for done, and its re-run resumes from that checkpoint to the end (a fresh start would
    be refused: the folder holds checkpoints). The trainer runs in this process, not as a subprocess."""
    from megatron_patch.training import cli
    from tests.training.common import train_records

    model_parallel(1, 1)
    study = _study()
    quickstart = study._quickstart()
    s = quickstart.settings(reduced=True)
    data = {"prefix": tiny_corpus["prefix"], "tokenizer": tiny_corpus["tokenizer"]}
    run = study.plan_runs([1], [Fraction(1, 2)], [4])["patch_token-lambda1_2-K4-seed1"]
    flags = study.run_flags(run, s, data, quickstart)
    commands = []

    def in_process(command, **kwargs):  # [python, examples/pretrain_patch_gpt.py, flags...]
        commands.append([str(c) for c in command])
        return SimpleNamespace(returncode=cli.main(commands[-1][2:]))

    monkeypatch.setattr(study, "subprocess", SimpleNamespace(run=in_process, STDOUT=None))
    save, log = tmp_path / "run", tmp_path / "run.log"
    with pytest.raises(study.StudyError, match="stopped before its end; re-run to resume it"):
        study.train(flags + ["--exit-duration-in-mins", "1e-9"], save, log)
    assert sorted(train_records(save)) == [1]
    summary = study.train(flags, save, log)
    assert not summary["interrupted"] and summary["stages"]["token"]["iterations"] == s["train_iters"] // 2
    assert sorted(train_records(save)) == list(range(1, s["train_iters"] + 1))
    assert all(command[command.index("--load") + 1] == str(save) for command in commands) and len(commands) == 2
    assert study.train(flags, save, log) == summary and len(commands) == 2  # finished: not trained again


def test_transfer_is_paired_by_seed():
    study = _study()
    fraction = Fraction(1, 2)
    results = {}
    losses = {1: (5.0, 5.3, 6.0), 2: (5.2, 5.1, 6.1), 3: (4.9, 5.0, 5.9)}  # control, patch + token, after patch
    for seed, (control, patch, after) in losses.items():
        results[f"t{seed}"] = {
            "arm": "token-only",
            "seed": seed,
            "fraction": None,
            "K": 1,
            "loss_final": 4.5 + seed / 100,
        }
        results[f"c{seed}"] = {"arm": "control", "seed": seed, "fraction": str(fraction), "K": 2, "loss_final": control}
        results[f"p{seed}"] = {
            "arm": "patch+token",
            "seed": seed,
            "fraction": str(fraction),
            "K": 2,
            "loss_final": patch,
            "loss_after_patch": after,
        }
    summary = study.summarise(results, [fraction], [2])
    row = summary["rows"][0]
    transfers = [control - patch for control, patch, _ in losses.values()]
    assert row["transfer"]["mean"] == statistics.fmean(transfers)
    assert row["transfer"]["std"] == statistics.stdev(transfers)
    assert (row["transfer"]["min"], row["transfer"]["max"]) == (min(transfers), max(transfers))
    assert row["theoretical_cost"] == 0.75 and summary["token-only"]["n"] == 3
    assert "| 1/2 | 2 | 1,2,3 | 0.750 |" in study.report(summary)


def test_bad_flags_give_one_line(tmp_path, capsys):
    study = _study()
    assert study.main(["--workdir", str(tmp_path / "w"), "--patch-sizes", "1,4"]) == 2
    assert study.main(["--workdir", str(tmp_path / "w"), "--fractions", "1/2,3/2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
    assert "--patch-sizes [1, 4]" in err[0] and "'1/2,3/2': every lambda must lie strictly between 0 and 1" in err[1]
    assert err[1].endswith("(see benchmarks/transfer_study.py --help)")  # argparse's errors name the script
    assert not (tmp_path / "w").exists()  # nothing created before the flags are checked
