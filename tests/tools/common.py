"""Shared pieces of the checkpoint-tool tests: calling a tool's ``main``, an independent Megatron
forward pass, plain tensors of a checkpoint, a tokenizer other than the trained one."""

import errno
import json
import os
import shutil

import torch
from megatron.core import dist_checkpointing, parallel_state

from megatron_patch.architecture.presets import get_preset, transformer_config
from megatron_patch.checkpoint import manifest
from megatron_patch.checkpoint.folders import METADATA, resolve_checkpoint
from megatron_patch.model import build_patch_gpt_model
from megatron_patch.runtime import atomic_file, parallel

VOCAB = 512  # pieces of the tiny_corpus tokenizer
ROWS = 576  # the padded vocabulary of the trained fixture (tests/tools/conftest.py)
SEQ = 32  # T of tests.training.common.trainer_args


def call(tool, argv, capsys):
    """``tool.main(argv)`` -> (exit code, stdout, stderr lines)."""
    capsys.readouterr()
    code = tool.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.strip()]


def assert_one_line_error(code, err, expected, exit_code=2):
    assert code == exit_code, (code, err)
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert expected in err[0], err[0]


def fill_the_disk_halfway_through_atomic_writes(monkeypatch):
    """Every atomic write (``atomic_file.write_with``) writes its temporary file, then meets a full
    disk (ENOSPC), as a report written onto a filling disk would."""
    real_write_with = atomic_file.write_with

    def write_with(path, write):
        def half_then_full(partial):
            write(partial)
            raise OSError(errno.ENOSPC, "No space left on device", partial)

        real_write_with(path, half_then_full)

    monkeypatch.setattr(atomic_file, "write_with", write_with)


def leftovers(folder):
    """Hidden partial outputs the tools may have left in ``folder``."""
    return [name for name in os.listdir(folder) if ".partial-" in name or ".replaced-" in name or name.endswith(".tmp")]


def megatron_model(checkpoint, vocab=ROWS, seq=SEQ):
    """The tiny model of ``checkpoint`` at TP=1 PP=1 (fp32), loaded with dist_checkpointing directly."""
    parallel.init_model_parallel(1, 1, seed=5)
    config = transformer_config(get_preset("tiny"), cpu=True, calculate_per_token_loss=True)
    model = build_patch_gpt_model(config, vocab, seq, pre_process=True, post_process=True)
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, resolve_checkpoint(str(checkpoint)))
    model.load_state_dict(state["model"], strict=True)
    model.eval()
    assert parallel_state.get_tensor_model_parallel_world_size() == 1
    return model


@torch.no_grad()
def megatron_logits(model, tokens):
    """``[b, s, V]`` fp32 logits (GPTModel without labels, TP=1)."""
    return model(tokens, None, None).float()


def model_tensors(checkpoint):
    """The model's tensors of a checkpoint, unsharded (optimizer state left out)."""
    tensors = dist_checkpointing.load_plain_tensors(resolve_checkpoint(str(checkpoint)))
    return {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor) and not k.startswith("optimizer.")}


def copy_recording(checkpoint, copy, **args):
    """A copy of ``checkpoint`` at ``copy`` whose metadata records ``args`` (e.g. the tokenizer of
    another machine), its manifest kept right, so that the copy loads with verification."""
    shutil.copytree(checkpoint, copy)
    meta = json.loads((copy / METADATA).read_text())
    meta["args"].update(args)
    (copy / METADATA).write_text(json.dumps(meta))
    record = json.loads((copy / manifest.MANIFEST).read_text())
    record["files"].update(manifest.describe(str(copy), [METADATA]))
    (copy / manifest.MANIFEST).write_text(json.dumps(record))
    return copy


def tokenizer_of(folder, texts, vocab):
    """A SentencePiece model of ``vocab`` pieces trained on ``texts`` (not the checkpoints'
    tokenizer, even at its 512 pieces); returns its path."""
    from tools import train_tokenizer

    corpus = folder / f"tok{vocab}.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts), encoding="utf-8")
    prefix = folder / f"tok{vocab}"
    argv = ["--input", str(corpus), "--vocab-size", str(vocab), "--output-prefix", str(prefix)]
    assert train_tokenizer.main(argv) == 0
    return f"{prefix}.model"
