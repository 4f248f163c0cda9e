"""training/tracking.py: an offline W&B run holds the scalars, steps and config it was given (read
back from the run's .wandb file with wandb's own protobuf records), the mode follows WANDB_MODE
and the credentials, and a missing package or experiment name is one line."""

import glob
import json
import os
import struct
import sys
import time

import pytest

from megatron_patch.errors import ArgumentError, UserError
from megatron_patch.training import tracking

_BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of records
_HEADER = 7  # file header b":W&B" + magic + version; record header crc32 (4) + length (2) + type (1)


def _records(path):
    """The wandb_internal_pb2.Record messages of a .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    if len(data) < _HEADER:  # not written yet
        return
    assert data[:4] == b":W&B", data[:_HEADER]
    position, pending = _HEADER, b""
    while position + _HEADER <= len(data):
        left = _BLOCK - position % _BLOCK
        if left < _HEADER:  # a block's tail too short for a record header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + _HEADER])
        if kind == 0:  # zero padding up to the end of the block
            position += left
            continue
        if position + _HEADER + length > len(data):  # a record still being written
            return
        chunk = data[position + _HEADER : position + _HEADER + length]
        position += _HEADER + length
        pending = chunk if kind in (1, 2) else pending + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _wait_for_exit_record(run_file, timeout=60.0):
    """wandb 0.31's ``finish()`` can return before wandb-core (its own process) has flushed the run
    file; wait until the file ends with the run's exit record."""
    deadline = time.monotonic() + timeout
    while True:
        kinds = [record.WhichOneof("record_type") for record in _records(run_file)]
        if kinds and kinds[-1] == "exit":
            return
        assert time.monotonic() < deadline, f"{run_file}: no exit record after {timeout:.0f} s ({kinds})"
        time.sleep(0.1)


def _history(run_file):
    """``{step: {tag: value}}`` of the user's scalars (wandb's own ``_``-keys left out)."""
    history = {}
    for record in _records(run_file):
        if record.WhichOneof("record_type") == "history":
            items = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            history[record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    return history


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.mark.parametrize("mode", ["wandb_mode_offline", "no_api_key"])
def test_offline_run_files_hold_the_logged_scalars(tmp_path, monkeypatch, no_credentials, mode):
    if mode == "wandb_mode_offline":
        monkeypatch.setenv("WANDB_MODE", "offline")
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # offline all the same: nothing is sent
    logged = {
        1: {"train/patch-loss": 6.25, "train/lr": 3e-4, "train/grad_norm": 1.5},
        2: {"train/patch-loss": 5.125, "train/lr": 2.5e-4, "train/grad_norm": None},  # None: left out
        4: {"train/loss": 4.0625, "valid/loss": 4.5},
    }
    config = {"patch_size": 4, "patch_data_fraction": 2 / 3, "model": "tiny"}
    writer = tracking.WandbWriter("megatron-patch-test", "tiny-run", str(tmp_path / "wandb-dir"), config)
    assert writer.mode == "offline"
    for step, scalars in logged.items():
        writer.log(scalars, step)
    writer.close()
    writer.close()  # a second close does nothing
    with pytest.raises(RuntimeError):
        writer.log({"train/loss": 1.0}, 5)

    runs = glob.glob(str(tmp_path / "wandb-dir" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1, runs
    expected = {step: {k: v for k, v in scalars.items() if v is not None} for step, scalars in logged.items()}
    _wait_for_exit_record(runs[0])
    assert _history(runs[0]) == expected
    run = next(r.run for r in _records(runs[0]) if r.WhichOneof("record_type") == "run")
    assert run.display_name == "tiny-run" and run.project == "megatron-patch-test"
    stored = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert {k: stored[k] for k in config} == config


def test_mode_follows_wandb_mode_and_credentials(tmp_path, monkeypatch, no_credentials):
    assert tracking.wandb_mode() == "offline"  # no key anywhere
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    os.chmod(netrc, 0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert tracking.wandb_mode() == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")  # the key is for another host
    assert tracking.wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert tracking.wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert tracking.wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.wandb_mode() == "disabled"


def test_missing_package_and_bad_flags_are_one_line(tmp_path, monkeypatch, no_credentials):
    with pytest.raises(ArgumentError, match="needs --wandb-exp-name"):
        tracking.WandbWriter("proj", "", str(tmp_path), {})
    with pytest.raises(ArgumentError, match="--wandb-project is empty"):
        tracking.WandbWriter("", "run", str(tmp_path), {})
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(UserError) as error:
        tracking.WandbWriter("proj", "run", str(tmp_path / "w"), {})
    assert "pip install -e .[wandb]" in str(error.value) and "\n" not in str(error.value)
    assert not os.path.exists(tmp_path / "w")


def test_a_resumed_run_purges_the_killed_runs_tensorboard_steps(tmp_path):
    """A killed run logged steps 1-6 after its checkpoint at 4: the resumed run's writer (purge_step
    5) drops 5 and 6, which it logs again, so each step holds one value."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from torch.utils.tensorboard import SummaryWriter

    from megatron_patch.training.metrics import tensorboard_writer_args

    assert tensorboard_writer_args("tb", 0) == {"log_dir": "tb"}  # a fresh run purges nothing
    assert tensorboard_writer_args("tb", 4) == {"log_dir": "tb", "purge_step": 5}
    killed = SummaryWriter(**tensorboard_writer_args(str(tmp_path), 0))
    for step in range(1, 7):
        killed.add_scalar("train/loss", 10.0 + step, step)
    killed.close()
    time.sleep(1.1)  # event file names carry the second they were made
    resumed = SummaryWriter(**tensorboard_writer_args(str(tmp_path), 4))
    for step in range(5, 9):
        resumed.add_scalar("train/loss", 20.0 + step, step)
    resumed.close()
    events = accumulator.EventAccumulator(str(tmp_path))
    events.Reload()
    values = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert values == [(1, 11.0), (2, 12.0), (3, 13.0), (4, 14.0), (5, 25.0), (6, 26.0), (7, 27.0), (8, 28.0)]


def test_flop_totals_read_in_a_unit_of_their_size():
    from megatron_patch.training.metrics import format_flops

    assert format_flops(1.2345e13) == "12.345 TFLOP"
    assert format_flops(3.21e15) == "3.210 PFLOP"
    assert format_flops(4.5e19) == "45.000 EFLOP"
    assert format_flops(2e21) == "2.000e+21 FLOP"


def test_a_resumed_run_drops_later_records_and_the_interrupted_runs_summary(tmp_path):
    from megatron_patch.training.metrics import _drop_records_after

    path = tmp_path / "metrics.jsonl"
    records = [{"kind": "train", "iteration": i} for i in (1, 2, 3)] + [{"kind": "summary", "interrupted": True}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "tra')
    _drop_records_after(str(path), 2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:2]
