"""tools/export_hf.py: the exported LlamaForCausalLM gives Megatron's logits on CPU (transformers is
an optional test dependency), the tokenizer files load, other architectures and bad inputs are
refused with one line."""

import json
import os
import shutil

import pytest
import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from megatron_patch.checkpoint import folders
from megatron_patch.conversion import hf_folder
from tests.tools.common import (
    ROWS,
    VOCAB,
    assert_one_line_error,
    call,
    leftovers,
    megatron_logits,
    megatron_model,
    model_tensors,
)
from tools import export_hf


def _tokens():
    return torch.randint(0, VOCAB, (3, 32), generator=torch.Generator().manual_seed(11))


@pytest.mark.parametrize("trim", [False, True], ids=["padded-vocab", "trimmed-vocab"])
def test_transformers_logits_equal_megatron_logits(trained, tmp_path, capsys, trim):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    save = tmp_path / "hf"
    code, out, err = call(
        export_hf,
        [
            "--cpu",
            "--load",
            trained["root"],
            "--save",
            save,
            "--verify-logits",
            "--tolerance",
            "1e-5",
            *(["--trim-vocab"] if trim else []),
        ],
        capsys,
    )
    assert code == 0, err
    assert "logits check: max absolute difference" in out
    config = json.load(open(save / "config.json"))
    rows = VOCAB if trim else ROWS
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == rows
    assert {"model.safetensors", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"} <= set(
        os.listdir(save)
    )
    hf_model = transformers.LlamaForCausalLM.from_pretrained(str(save), torch_dtype=torch.float32).eval()
    tokens = _tokens()
    with torch.no_grad():
        hf = hf_model(input_ids=tokens).logits
    megatron = megatron_logits(megatron_model(trained["final"]), tokens)[..., :rows]
    assert hf.shape == megatron.shape
    assert (hf - megatron).abs().max().item() <= 1e-5 * megatron.abs().max().item()
    assert not leftovers(tmp_path)


def test_exported_tokenizer_encodes_like_sentencepiece(trained, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf")  # transformers converts tokenizer.model with it
    save = tmp_path / "hf"
    assert call(export_hf, ["--cpu", "--load", trained["final"], "--save", save], capsys)[0] == 0
    from megatron_patch.data.tokenizer import SentencePieceTokenizer

    ours = SentencePieceTokenizer(trained["corpus"]["tokenizer"])
    theirs = transformers.AutoTokenizer.from_pretrained(str(save))
    # (a text that starts with a space differs: HF's Metaspace adds no second "▁"; see the docs)
    for text in ["It was the best of times.", "Émile: 12 €\n\tindented  twice", "end"]:
        assert theirs(text)["input_ids"] == ours.tokenize(text), text
    assert theirs.eos_token_id == ours.eod and theirs.pad_token_id == ours.pad
    # no BOS (the model never saw one): lm-eval then scores a choice without context after EOD, as
    # training and tools/evaluate_zero_shot.py do, not after "<s>"
    assert theirs.bos_token_id is None and theirs("It was")["input_ids"] == ours.tokenize("It was")


def _checkpoint_with(trained, tmp_path, edit):
    """A copy of the final checkpoint with its tensors edited: ``edit(dict) -> dict``."""
    folder = tmp_path / "edited"
    folder.mkdir()
    tensors = edit(model_tensors(trained["final"]))
    dist_checkpointing.save(
        {k: ShardedTensor.from_rank_offsets(k, v.contiguous(), replica_id=0) for k, v in tensors.items()}, str(folder)
    )
    shutil.copy(os.path.join(trained["final"], folders.METADATA), folder)
    return folder


def _edited_args(trained, tmp_path, **changes):
    folder = tmp_path / "args"
    shutil.copytree(trained["final"], folder)
    meta = json.load(open(folder / folders.METADATA))
    meta["args"].update(changes)
    (folder / folders.METADATA).write_text(json.dumps(meta))
    return folder


def _tied(tensors):
    tensors.pop("output_layer.weight")
    return tensors


def _biased(tensors):
    tensors["decoder.layers.self_attention.linear_qkv.bias"] = torch.zeros(4, 192)
    return tensors


BAD = {
    "missing": (lambda t, p: ["--load", p / "nowhere"], "no such directory"),
    "layernorm": (
        lambda t, p: ["--load", _edited_args(t, p, normalization="LayerNorm")],
        "args.normalization = 'LayerNorm'",
    ),
    "tied-embeddings": (lambda t, p: ["--load", _checkpoint_with(t, p, _tied)], "tied input and output embeddings"),
    "biases": (
        lambda t, p: ["--load", _checkpoint_with(t, p, _biased)],
        "unexpected tensor 'decoder.layers.self_attention.linear_qkv.bias'",
    ),
    "other-shape": (lambda t, p: ["--load", t["final"], "--model", "cpu-small"], "another model shape"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_other_architectures_and_bad_input_are_refused(trained, tmp_path, capsys, case):
    pytest.importorskip("safetensors")
    make_argv, expected = BAD[case]
    save = tmp_path / "hf"
    code, _, err = call(export_hf, ["--cpu", "--save", save, *make_argv(trained, tmp_path)], capsys)
    assert_one_line_error(code, err, expected)
    if case not in ("missing", "other-shape"):
        assert "not the paper's LLaMA-style architecture" in err[0]
    assert not save.exists() and not leftovers(tmp_path)


def test_existing_output_needs_force(trained, tmp_path, capsys):
    save = tmp_path / "hf"
    save.mkdir()
    code, _, err = call(export_hf, ["--cpu", "--load", trained["final"], "--save", save], capsys)
    assert_one_line_error(code, err, "already exists: pass --force")
    assert os.listdir(save) == []


def test_force_replaces_an_earlier_export_and_nothing_else(trained, tmp_path, capsys):
    """--force replaces a folder holding an earlier export (exactly the files an export writes); one
    that also holds a user's files or a training run below it is refused and left as it was."""
    save = tmp_path / "hf"
    code, _, err = call(export_hf, ["--cpu", "--load", trained["final"], "--save", save], capsys)
    assert code == 0, err
    assert sorted(os.listdir(save)) == sorted(hf_folder.EXPORT_FILES)
    code, _, err = call(export_hf, ["--cpu", "--load", trained["final"], "--save", save, "--force"], capsys)
    assert code == 0, err
    shutil.copytree(trained["root"], save / "experiments" / "other_run")
    code, _, err = call(export_hf, ["--cpu", "--load", trained["final"], "--save", save, "--force"], capsys)
    assert_one_line_error(code, err, "holds 'experiments', not this tool's earlier output; --force replaces only")
    assert os.path.isdir(save / "experiments" / "other_run" / "iter_0000006") and hf_folder.is_export(save)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "config.json").write_text("{}")  # an export's file name, but no export
    code, _, err = call(export_hf, ["--cpu", "--load", trained["final"], "--save", other, "--force"], capsys)
    assert_one_line_error(code, err, "holds 'config.json', not this tool's earlier output")
    assert os.listdir(other) == ["config.json"]


@pytest.mark.parametrize("target", ["run", "parent"])
def test_force_never_replaces_the_checkpoints_it_reads(trained, tmp_path, capsys, target):
    run = tmp_path / "runs" / "run"
    shutil.copytree(trained["root"], run)
    save = run if target == "run" else run.parent
    code, _, err = call(export_hf, ["--cpu", "--load", run, "--save", save, "--force"], capsys)
    assert_one_line_error(code, err, "would replace the source checkpoint")
    assert os.path.isdir(run / "iter_0000006") and (run / folders.TRACKER).exists()


def test_force_never_replaces_another_runs_checkpoints(trained, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(trained["root"], other)
    code, _, err = call(export_hf, ["--cpu", "--load", trained["final"], "--save", other, "--force"], capsys)
    assert_one_line_error(code, err, "holds the training checkpoint")
    assert sorted(os.listdir(other)) == sorted(os.listdir(trained["root"]))
