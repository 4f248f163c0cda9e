"""The quick start, reduced (same pipeline and commands, fewer steps), so it cannot silently break;
and how it re-runs a training step that did not finish."""

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from megatron_patch.errors import UserError
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow  # whole-pipeline subprocess runs: scheduled first (tests/conftest.py)

# A trainer stand-in for the command line train_command builds: writes --summary-json, marked
# interrupted when its first flag is "stopped" (as a trainer stopped by a signal does), and exits 0.
STAND_IN = (
    "import json, os, sys; a = sys.argv; path = a[a.index('--summary-json') + 1]; "
    "os.makedirs(os.path.dirname(path), exist_ok=True); "
    "open(path, 'w').write(json.dumps({'interrupted': a[2] == 'stopped'}))"
)


def _quickstart():
    spec = importlib.util.spec_from_file_location("examples_quickstart", REPO_ROOT / "examples" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_training_step_resumes_its_own_folder_until_it_finishes(tmp_path, capsys):
    """Every trainer run loads its own --save folder (the trainer resumes from a checkpoint there,
    so a re-run after a kill is not refused as a fresh start into a used folder), and a run whose
    summary says it was stopped is neither done nor passed over: the step fails, and a re-run trains."""
    quickstart = _quickstart()
    save = tmp_path / "run"
    launcher = [sys.executable, "-c", STAND_IN]
    command = [str(c) for c in quickstart.train_command(launcher, ["--cpu"], save)]
    assert command[command.index("--save") + 1] == command[command.index("--load") + 1] == str(save)

    def train(how):
        quickstart.run_step("train", quickstart.train_command(launcher, [how], save), save, finished=quickstart.trained)

    with pytest.raises(UserError, match="step 'train' stopped before its end; re-run to resume it"):
        train("stopped")
    assert not quickstart.trained(save)
    train("finished")
    assert quickstart.trained(save)
    train("stopped")  # not run again
    assert "== train: done already" in capsys.readouterr().out and quickstart.trained(save)


def test_reduced_quickstart_runs_end_to_end(tmp_path):
    work = tmp_path / "qs"
    result = subprocess.run(
        [sys.executable, "examples/quickstart.py", "--reduced", "--workdir", str(work)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    # what was measured, and the cost: the trainer's, at the lambda the 24 steps realise (16 patch steps)
    assert "model tiny (float32, CPU, TP=2); token-level loss on 3 of the 10 held-out documents (" in result.stdout
    assert "theory lambda/K + 1 - lambda = 0.500 (the trainer's, at the realised lambda 0.667)" in result.stdout
    # the closing table has the control row and the transfer it implies, from the evaluations' own losses
    assert "control: token stage from scratch" in result.stdout
    losses = {name: json.loads((work / f"eval_{name}.json").read_text())["loss"] for name in ("token_stage", "control")}
    assert f"= {losses['control'] - losses['token_stage']:+.4f} nats" in result.stdout
    control = json.loads((work / "control" / "summary.json").read_text())
    token_stage = json.loads((work / "token_stage" / "summary.json").read_text())
    assert "patch" not in control["stages"]  # the control trains the token stage alone ...
    assert control["stages"]["token"]["iterations"] == token_stage["stages"]["token"]["iterations"]  # ... as long
    for name in ("token_stage", "control", "baseline"):
        evaluation = json.loads((work / f"eval_{name}.json").read_text())
        assert evaluation["tokens"] > 0 and evaluation["loss"] < math.log(1000)  # better than uniform
        assert evaluation["documents"] == 3  # --reduced: 3 of the 10 held-out documents
    # a re-run reuses every step but the evaluation whose output is gone, which it alone repeats
    (work / "eval_control.json").unlink()
    again = subprocess.run(
        [sys.executable, "examples/quickstart.py", "--reduced", "--workdir", str(work)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert again.stdout.count("done already") == 7  # tokenizer, preprocessing, 4 trainer runs, conversion
    assert "== evaluate control on held-out documents (TP=2): " in again.stdout
    assert json.loads((work / "eval_control.json").read_text())["loss"] == losses["control"]
    # the full quick start refuses the reduced one's workdir, whose finished runs it would report
    full = subprocess.run(
        [sys.executable, "examples/quickstart.py", "--workdir", str(work)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert full.returncode == 2 and full.stdout == "", full.stdout[-2000:]
    assert full.stderr.startswith(f"error: --workdir {work} holds outputs of quickstart made with other settings (")
    assert "model 'tiny' -> 'cpu-small'" in full.stderr and len(full.stderr.strip().splitlines()) == 1
