"""A staging folder as a tool killed with kill -9 leaves it (its ``.owner`` lock released by the kernel)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

KILLED = """
import os, signal, sys
from megatron_patch.runtime.owned_temp import OwnedTempDir
print(OwnedTempDir(sys.argv[1], sys.argv[2], sys.argv[3]).path, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def killed_owner_folder(parent, prefix, suffix=""):
    """The staging folder of a process that created it and then died of kill -9."""
    process = subprocess.run(
        [sys.executable, "-c", KILLED, str(parent), prefix, suffix],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert process.returncode == -signal.SIGKILL, process.stderr
    path = process.stdout.strip()
    assert os.path.isfile(os.path.join(path, ".owner"))
    return path
