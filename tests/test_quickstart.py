"""The quick start, reduced (same pipeline and commands, fewer steps), so it cannot silently break."""

import json
import math
import subprocess
import sys

from tests.conftest import REPO_ROOT


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
    assert "relative cost of patch training" in result.stdout
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
