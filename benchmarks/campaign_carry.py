"""What the campaign's device call carries: the working tree, the ``.whl`` folder and the prepared
data, against the device tool's limit.

Units: bytes, MiB.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import List, Optional

from common import MIB, fmt

CARRY_LIMIT_BYTES = 64 * MIB  # the device tool's limit on what travels (working tree + carried paths)
WHEEL_FOLDER, WHEEL_GLOB = ".whl", "megatron_core-*-cp312-*.whl"  # what the device call installs, from where
# benchmarks/README.md's download of that wheel, run in the repository root (tests check the two agree)
WHEEL_DOWNLOAD = (
    "python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "
    "--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d .whl megatron-core==0.16.1"
)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) if path.exists() else 0


def tree_bytes(repo: Path) -> Optional[int]:
    """Bytes of the working tree that travels (tracked and untracked-not-ignored files); None
    without git."""
    command = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    try:
        out = subprocess.run(command, cwd=repo, check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    files = {repo / name for name in out.decode().split("\0") if name}
    return sum(p.stat().st_size for p in files if p.is_file() and not p.is_symlink())


def carry_lines(repo: Path, data_dir: Path, cpu: bool = False) -> List[str]:
    """What the device call takes along: the working tree, ``.whl`` and the prepared data; ``error:``
    lines, last, for what stops the call: over the limit, or (data for the GPU, not ``cpu``: the
    rehearsal's never travels) no megatron-core wheel to install."""
    tree, wheel, data = tree_bytes(repo), folder_bytes(repo / WHEEL_FOLDER), folder_bytes(data_dir)
    total = (tree or 0) + wheel + data
    sizes = f"working tree {fmt(None if tree is None else tree / MIB, '.1f', 'n/a (no git)')} MiB, "
    sizes += f".whl {wheel / MIB:.1f} MiB, {data_dir} {data / MIB:.1f} MiB"
    lines = [f"carry: {sizes}: {total / MIB:.1f} MiB of {CARRY_LIMIT_BYTES / MIB:.0f} MiB"]
    if total > CARRY_LIMIT_BYTES:
        lines.append("error: over the device tool's limit; prepare fewer tokens or carry less")
    if not list((repo / WHEEL_FOLDER).glob(WHEEL_GLOB)):
        missing = f"no {WHEEL_GLOB} in {repo / WHEEL_FOLDER}"
        if cpu:
            lines.append(f"note: {missing} (the GPU's data needs it; benchmarks/README.md says how to download it)")
        else:
            lines.append(f"error: {missing}, which the device call installs; in {repo}, run: {WHEEL_DOWNLOAD}")
    return lines
