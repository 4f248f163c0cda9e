"""A checkpoint trained with ``--transformer-impl transformer_engine``, read where Transformer Engine
does not import (this CPU machine): the tools that build its model (evaluate.py, convert_checkpoint.py,
export_hf.py --verify-logits) stop with one line naming the checkpoint and what to install (its
layers' state is not the local spec's, so there is no fallback), exit code 2."""

import json

import pytest

from megatron_patch.architecture.specs import transformer_engine_available
from tests.tools.common import assert_one_line_error, call, copy_recording, leftovers
from tools import evaluate

pytestmark = pytest.mark.skipif(transformer_engine_available(), reason="Transformer Engine imports here")


@pytest.fixture
def te_checkpoint(trained, tmp_path):
    return copy_recording(trained["final"], tmp_path / "te", transformer_impl="transformer_engine")


def _assert_names_te(code, err, checkpoint):
    assert_one_line_error(code, err, f"checkpoint {checkpoint} was trained with --transformer-impl transformer_engine")
    assert "transformer-engine[pytorch] is installed" in err[0], err[0]


def test_evaluate(te_checkpoint, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "A short document to score."}) + "\n")
    output = tmp_path / "out.json"
    code, _, err = call(evaluate, ["--cpu", "--load", te_checkpoint, "--input", data, "--output-json", output], capsys)
    _assert_names_te(code, err, te_checkpoint)
    assert not output.exists() and not leftovers(tmp_path)
