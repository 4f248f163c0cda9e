"""The trainer's script runs from a checkout without ``pip install -e .`` (the GPU machine gets
megatron-core's wheel alone): it puts its checkout first on ``sys.path``, as the tools do."""

import shutil
import subprocess
import sys

from tests.training.common import REPO_ROOT


def test_the_trainer_script_runs_the_package_of_its_own_checkout(tmp_path):
    checkout = tmp_path / "checkout"
    (checkout / "examples").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "examples" / "pretrain_patch_gpt.py", checkout / "examples")
    (checkout / "megatron_patch" / "training").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "megatron_patch" / "__init__.py", checkout / "megatron_patch")
    shutil.copy(REPO_ROOT / "megatron_patch" / "training" / "__init__.py", checkout / "megatron_patch" / "training")
    # the checkout's trainer entry says where it was imported from (the installed one would train)
    (checkout / "megatron_patch" / "training" / "cli.py").write_text(
        "def main(process_exits):\n    print('ran', __file__)\n    return 0\n"
    )
    # from tmp_path: neither the working folder nor PYTHONPATH holds the checkout
    result = subprocess.run(
        [sys.executable, str(checkout / "examples" / "pretrain_patch_gpt.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"ran {checkout / 'megatron_patch' / 'training' / 'cli.py'}"
