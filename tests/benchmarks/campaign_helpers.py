"""What the GPU campaign's tests share: the campaign's modules as ``gpu_campaign.py`` imports them,
the README's main device command and its call settings, and how the CPU rehearsal runs it."""

import importlib.util
import json
import re
import shlex
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="--cpu rehearsal refuses to run beside a GPU")


README = REPO_ROOT / "benchmarks" / "README.md"


CAMPAIGN = "benchmarks/gpu_campaign.py"


DATA_DIR = ".campaign"  # the README's --data-dir, carried to the device


MIB = 2**20


ALL_PARTS = "tests,throughput,cost,activations"


def load_campaign():
    spec = importlib.util.spec_from_file_location("benchmarks_gpu_campaign", REPO_ROOT / CAMPAIGN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_campaign = load_campaign()


# imported by gpu_campaign from benchmarks/
campaign_carry, campaign_corpus, campaign_logs = (sys.modules[f"campaign_{m}"] for m in ("carry", "corpus", "logs"))


campaign_options, campaign_parts, campaign_summary = (
    sys.modules[f"campaign_{m}"] for m in ("options", "parts", "summary")
)


def device_command():
    """The README's one main device command: ``(install prefix, campaign arguments)``."""
    lines = [
        line.strip()
        for line in README.read_text().splitlines()
        if line.strip().startswith("python3 -m pip install") and f"{CAMPAIGN} --parts" in line
    ]
    assert len(lines) == 1, "benchmarks/README.md should hold the campaign's one main device command"
    prefix, found, campaign = lines[0].partition(f"; python3 {CAMPAIGN} ")
    assert found, lines[0]
    return prefix, shlex.split(campaign)


def device_call_settings():
    """The main call's ``kind``, ``carry`` and ``timeout_s`` as the README gives them before its command."""
    text = README.read_text()
    intro = text[text.index("The main call, all four parts") : text.index(f"{CAMPAIGN} --parts {ALL_PARTS}")]
    found = re.search(r"`kind`: `([\w-]+)`.*?`carry`:\s*(.*?);\s*`timeout_s`\s+(\d+)", intro, re.S)
    assert found, intro
    return found[1], re.findall(r"`([^`]+)`", found[2]), int(found[3])


def rehearsal_argv(args, out, data_dir):
    """The device command's arguments with ``--cpu`` and, since a shared CPU can be far slower than
    the GPU its time limits are sized for, those limits scaled up (the budget test keeps them)."""
    swap = {"$OUT": str(out), DATA_DIR: str(data_dir)}
    return [sys.executable, CAMPAIGN, *[swap.get(a, a) for a in args], "--cpu", "--time-scale", "10"]


def run_campaign(argv, **kw):
    return subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800, check=False, **kw)


def read_part(out, name):
    return json.loads((out / f"{name}.json").read_text())


def stand_in_python(monkeypatch, folder, script):
    """A shell script in ``folder`` put in place of the python that the campaign's parts start
    (``campaign_parts.PY``): each run's command starts it with the run's arguments (``$*``), so a
    part's logic runs against the real runner in a second instead of the model's runs."""
    path = folder / "python"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    monkeypatch.setattr(campaign_parts, "PY", str(path))


def stand_in_campaign(tmp_path, argv):
    """A ``Campaign`` of ``--cpu`` ``argv`` writing into ``tmp_path / "out"``, with a prepared-data
    folder that holds only its manifest (the stand-in runs read nothing)."""
    data = tmp_path / "data"
    data.mkdir()
    plan = campaign_options.cost_plan(gpu_campaign.parse_options(["--cpu", "--parts", "tests", "--out", "o"]))
    manifest = {"cpu": True, "plan": plan, "prefix": "campaign_text_document", "tokenizer": "campaign.model"}
    (data / "manifest.json").write_text(json.dumps(manifest))
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    argv = ["--cpu", *argv, "--data-dir", str(data), "--out", str(out)]
    return sys.modules["campaign_runner"].Campaign(gpu_campaign.parse_options(argv), argv, work)
