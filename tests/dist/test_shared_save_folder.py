"""Every rank must see the --save folder rank 0 locks: in a 2-rank world, a rank whose --save is
another folder at that path (a node-local disk, a missing mount) stops both ranks at start-up with
the same one-line error naming it, instead of failing the first save hours later; a shared folder
passes and keeps no trace of the check, and a folder created for a failed start is removed."""

import errno
import os
import socket

import pytest
import torch.distributed as dist

from megatron_patch.checkpoint import lock
from megatron_patch.checkpoint.lock import PROBE, locked_save_folder
from megatron_patch.errors import CheckpointError
from tests.model_helpers import shared_tmp


@pytest.fixture
def two_ranks(world):
    if world != 2:
        pytest.skip("runs in a 2-rank world")
    return dist.get_rank()


def _same_on_every_rank(message):
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    assert messages == [messages[0]] * len(messages), messages
    return messages[0]


def test_a_shared_save_folder_passes_and_keeps_no_probe(two_ranks, tmp_path_factory):
    save = os.path.join(shared_tmp(tmp_path_factory, "shared-save"), "run")
    with locked_save_folder(save):
        dist.barrier()  # rank 0 has removed the probe before it entered the block
        assert os.path.isdir(save) and not [name for name in os.listdir(save) if name.startswith(PROBE)]
        dist.barrier()
    dist.barrier()
    assert not os.path.exists(save)  # created here and left empty: removed


def test_a_rank_that_sees_another_folder_stops_every_rank(two_ranks, tmp_path_factory):
    shared = shared_tmp(tmp_path_factory, "node-local-save")
    save = os.path.join(shared, "run")
    if two_ranks == 1:  # what rank 1 finds at that path is a folder of its own, as on a node-local disk
        save = os.path.join(shared, "node-local", "run")
        os.makedirs(save)
    with pytest.raises(CheckpointError) as error:
        with locked_save_folder(save):
            pytest.fail("the block ran although rank 1 sees another folder")
    host = socket.gethostname()
    assert _same_on_every_rank(str(error.value)) == (
        f"--save {shared}/run is not the same folder on rank 1 (host {host}) as on rank 0 ({host}): "
        f"put --save on a file system every node shares"
    )
    dist.barrier()
    assert not os.path.exists(os.path.join(shared, "run"))  # no probe left in it, so removed
    assert os.listdir(os.path.join(shared, "node-local", "run")) == []


def test_a_probe_that_cannot_be_written_stops_every_rank(two_ranks, tmp_path_factory, monkeypatch):
    save = os.path.join(shared_tmp(tmp_path_factory, "full-save"), "run")
    if two_ranks == 0:

        def full(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(lock.os, "fsync", full)
    with pytest.raises(CheckpointError) as error:
        with locked_save_folder(save):
            pytest.fail("the block ran although the probe could not be written")
    assert _same_on_every_rank(str(error.value)) == (
        f"--save {save} cannot be written ({os.strerror(errno.ENOSPC)}): choose a writable folder"
    )
    dist.barrier()
    assert not os.path.exists(save)
