"""A tiny two-stage run, trained once per pytest process by the trainer itself (in-process), and
texts for a tokenizer other than its own."""

import json
import lzma

import pytest

from megatron_patch.checkpoint import folders
from megatron_patch.training import cli
from tests.training.common import trainer_args

ITERS = 6  # K=4, lambda=2/3: 4 patch steps (checkpoint iter 4), then 2 token steps (iter 6)
PAD_TO = 96  # --make-vocab-size-divisible-by: the 512 pieces are padded to 576 rows (at TP 1 and 2)


@pytest.fixture(scope="session")
def trained(world, tiny_corpus, tmp_path_factory):
    """``{root, patch, final, corpus}``: the run's --save root, its patch-stage boundary checkpoint
    (TP=1 PP=1) and its final token-stage checkpoint. The vocabulary is padded (576 rows for 512
    pieces), so that the tools' handling of padding is exercised."""
    root = tmp_path_factory.mktemp("trained") / "run"
    code = cli.main(
        trainer_args(
            tiny_corpus,
            root,
            "--eval-iters",
            "0",
            "--keep-last-checkpoints",
            "0",
            "--make-vocab-size-divisible-by",
            str(PAD_TO),
            train_iters=ITERS,
        )
    )
    assert code == 0
    return {
        "root": str(root),
        "patch": folders.checkpoint_dir(str(root), 4),
        "final": folders.checkpoint_dir(str(root), ITERS),
        "corpus": tiny_corpus,
    }


@pytest.fixture(scope="session")
def converted(trained, tmp_path_factory):
    """The --save root of tools/convert_checkpoint.py's output from the patch-stage checkpoint: its
    metadata says token stage, iteration 0; its weights are the patch stage's."""
    from tools import convert_checkpoint

    save = tmp_path_factory.mktemp("converted") / "token-start"
    assert convert_checkpoint.main(["--cpu", "--load", trained["patch"], "--save", str(save)]) == 0
    return str(save)


@pytest.fixture(scope="session")
def other_texts(tiny_jsonl):
    """The bundled corpus's last 8 documents, to train a tokenizer other than the run's on."""
    with lzma.open(tiny_jsonl, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in list(f)[-8:]]
