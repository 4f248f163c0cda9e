"""tools/export_hf.py: the exported LlamaForCausalLM gives Megatron's logits on CPU (transformers is
an optional test dependency) and a wrong RoPE base fails the check, the tokenizer files load and
agree with config.json, a converted patch-stage checkpoint is exported as patch stage, other
architectures, bad inputs and failed writes are refused with one line."""

import errno
import json
import logging
import os
import re
import shutil

import pytest
import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from megatron_patch.checkpoint import folders, manifest
from megatron_patch.conversion import hf_export, hf_folder
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
            "--verify-logits",  # default --tolerance: 1e-5 of the largest logit on CPU
            *(["--trim-vocab"] if trim else []),
        ],
        capsys,
    )
    assert code == 0, err
    # float32 on both sides: equal up to the order of the sums, which transformers' releases change
    difference = re.search(r"logits check: max difference transformers vs Megatron (\S+) of the largest logit", out)
    assert difference and float(difference.group(1)) <= 1e-6 and "(tolerance 1.0e-05)" in out
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
    # BOS is EOD, the start of every document in training (the model never saw "<s>"): lm-eval then
    # scores a choice without context after EOD, as tools/evaluate_zero_shot.py does; none is added
    assert theirs.bos_token_id == ours.eod and theirs("It was")["input_ids"] == ours.tokenize("It was")
    for name in ("config.json", "generation_config.json"):
        config = json.load(open(save / name))
        assert (config["bos_token_id"], config["eos_token_id"]) == (theirs.bos_token_id, theirs.eos_token_id), name


def test_generate_without_a_prompt_starts_a_document(trained, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    save = tmp_path / "hf"
    assert call(export_hf, ["--cpu", "--load", trained["final"], "--save", save], capsys)[0] == 0
    model = transformers.LlamaForCausalLM.from_pretrained(str(save), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        generated = model.generate(max_new_tokens=3, do_sample=False)
    eod = json.load(open(save / "config.json"))["eos_token_id"]
    assert generated.shape == (1, 4) and generated[0, 0].item() == eod


def test_a_wrong_rope_base_fails_the_default_tolerance(trained, tmp_path, capsys, monkeypatch):
    """RoPE base 500000 in config.json (Llama 3's) instead of the 10000 trained with changes the
    tiny model's logits by ~8e-4 of the largest: exit 1, one line, nothing written."""
    pytest.importorskip("transformers")
    monkeypatch.setattr(hf_export, "ROPE_BASE", 500000.0)
    save = tmp_path / "hf"
    code, out, err = call(export_hf, ["--cpu", "--load", trained["final"], "--save", save, "--verify-logits"], capsys)
    assert_one_line_error(code, err, "transformers' logits differ from Megatron's by", exit_code=1)
    assert "> --tolerance 1.0e-05" in err[0] and out == ""
    assert not save.exists() and not leftovers(tmp_path)


def test_a_converted_patch_checkpoint_is_exported_as_patch_stage(trained, converted, tmp_path, capsys, caplog):
    """tools/convert_checkpoint.py's output says token stage, iteration 0; its weights are the
    patch stage's: warned about, printed and recorded as such, with the conversion's record."""
    save = tmp_path / "hf"
    with caplog.at_level(logging.WARNING):
        code, out, err = call(export_hf, ["--cpu", "--load", converted, "--save", save], capsys)
    assert code == 0, err
    assert f"holds patch-stage weights (converted from {trained['patch']})" in caplog.text
    assert "(patch stage, iteration 0," in out
    provenance = json.load(open(save / hf_folder.PROVENANCE))
    assert provenance["stage"] == "patch" and provenance["progress"]["stage"] == "token"
    assert provenance["conversion"]["source"] == trained["patch"]
    assert provenance["conversion"]["source_stage"] == "patch"


def _safetensors_write_fails(monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def save_file(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise SafetensorError("Error while serializing: I/O error: File too large (os error 27)")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    return "model.safetensors: the export could not be written (Error while serializing: I/O error: File too large"


def _disk_fills(monkeypatch):
    def copyfile(source, target):
        with open(target, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", target)

    monkeypatch.setattr(hf_export.shutil, "copyfile", copyfile)
    return "tokenizer.model: the export could not be written (No space left on device)"


@pytest.mark.parametrize("fail", [_safetensors_write_fails, _disk_fills], ids=["file-too-large", "disk-full"])
@pytest.mark.parametrize("force", [False, True], ids=["new", "replacing"])
def test_a_failed_write_is_one_line_and_leaves_nothing(trained, tmp_path, capsys, monkeypatch, fail, force):
    """A write that fails (ulimit -f, a full disk) names the file and the fix; the staged folder is
    removed and an earlier export that --force was to replace is left as it was."""
    pytest.importorskip("safetensors")
    save = tmp_path / "hf"
    if force:
        assert call(export_hf, ["--cpu", "--load", trained["final"], "--save", save], capsys)[0] == 0
    before = {path.name: path.read_bytes() for path in save.iterdir()} if force else None
    expected = fail(monkeypatch)
    argv = ["--cpu", "--load", trained["final"], "--save", save, *(["--force"] if force else [])]
    code, out, err = call(export_hf, argv, capsys)
    assert_one_line_error(code, err, f"{save}/{expected}")
    assert "check the free space, file-size limit (ulimit -f) and permissions" in err[0] and out == ""
    assert not leftovers(tmp_path)
    if force:
        assert {path.name: path.read_bytes() for path in save.iterdir()} == before
    else:
        assert not save.exists()


def _checkpoint_with(trained, tmp_path, edit):
    """A copy of the final checkpoint with its tensors edited: ``edit(dict) -> dict``."""
    folder = tmp_path / "edited"
    folder.mkdir()
    tensors = edit(model_tensors(trained["final"]))
    dist_checkpointing.save(
        {k: ShardedTensor.from_rank_offsets(k, v.contiguous(), replica_id=0) for k, v in tensors.items()}, str(folder)
    )
    shutil.copy(os.path.join(trained["final"], folders.METADATA), folder)
    manifest.write_manifest(str(folder))  # the metadata says it was written with one
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
    "tolerance-without-check": (
        lambda t, p: ["--load", t["final"], "--tolerance", "5"],
        "--tolerance 5.0 is the logits check's, which runs with --verify-logits only",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_other_architectures_and_bad_input_are_refused(trained, tmp_path, capsys, case):
    pytest.importorskip("safetensors")
    make_argv, expected = BAD[case]
    save = tmp_path / "hf"
    code, _, err = call(export_hf, ["--cpu", "--save", save, *make_argv(trained, tmp_path)], capsys)
    assert_one_line_error(code, err, expected)
    if case not in ("missing", "other-shape", "tolerance-without-check"):
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
