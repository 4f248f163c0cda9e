"""megatron-patch: patch-level training for LLMs on Megatron-Core."""

from pathlib import Path

from setuptools import find_packages, setup


def _requirements():
    lines = Path(__file__).with_name("requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="megatron-patch",
    version="0.1.0",
    description="Patch-level training (Shao, Meng, Zhou 2024) as a Megatron-Core trainer",
    long_description=Path(__file__).with_name("README.md").read_text() if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_patch", "megatron_patch.*"]),
    # the zero-shot tool's shipped harness task (YAML, its data and the task's helper module)
    package_data={"megatron_patch.evaluation": ["tasks/*/*"]},
    python_requires=">=3.10",
    install_requires=_requirements(),
    extras_require={
        # transformers, safetensors and protobuf let the suite check the Hugging Face export;
        # matplotlib, the reproduction's loss plot; tensorboard, the trainer's event files;
        # lm-eval, the zero-shot tool on the shipped task; wandb, offline W&B runs; ruff (pinned: its
        # formatter's output is checked in CI), lint and format; pytest-xdist, the single-process
        # tests on two workers (one core each: the tests run torch with one thread); zstandard, the
        # .zst inputs
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.8",  # 3.8: --no-loadscope-reorder
            "transformers>=4.40",
            "safetensors",
            "protobuf",
            "matplotlib",
            "tensorboard",
            "lm-eval[hf]>=0.4.13,<0.5",
            "wandb>=0.31",
            "ruff==0.17.6",
            "zstandard",
        ],
        # NVIDIA's apex is built from its sources (github.com/NVIDIA/apex); "apex" on PyPI is another project
        "gpu": ["transformer-engine[pytorch]"],
        "hf": ["transformers>=4.40", "safetensors", "protobuf"],
        "plot": ["matplotlib"],
        "tensorboard": ["tensorboard"],
        # tools/evaluate_zero_shot.py: lm-evaluation-harness with its Hugging Face model (accelerate)
        "eval": ["lm-eval[hf]>=0.4.13,<0.5", "transformers>=4.40", "safetensors", "protobuf"],
        # --wandb-project: Weights & Biases runs (training/tracking.py)
        "wandb": ["wandb>=0.31"],
        # .jsonl.zst / .txt.zst inputs of the tokenizer, preprocessing and evaluation tools
        "zstd": ["zstandard"],
    },
    entry_points={
        "console_scripts": [
            "megatron-patch-pretrain=megatron_patch.training.cli:main",
        ]
    },
)
