"""The benchmark scripts (``benchmarks/*.py``) and the modules beside them, loaded for in-process
tests, and what those tests share."""

import importlib
import importlib.util
import math
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT

BENCHMARKS = REPO_ROOT / "benchmarks"
# throughput.py at its smallest: micro-batch 2, one untimed and two timed steps per configuration
TINY_STEPS = ["--micro-batch-size", "2", "--steps", "2", "--warmup", "1"]
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="--cpu smoke mode refuses to run beside a GPU")


def load_script(name):
    """``benchmarks/<name>.py`` as module ``benchmarks_<name>``, loaded once per session."""
    key = f"benchmarks_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # dataclasses look their module up by name
        spec.loader.exec_module(module)
    return sys.modules[key]


def load_module(name):
    """``benchmarks/<name>.py``, a module the scripts import by its plain name, as they import it."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


def positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0
