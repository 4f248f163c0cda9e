"""Decisions taken once, on rank 0, and shared with every rank.

What a rank reads from a shared file system (which checkpoint a tracker names, whether a folder
exists) can differ between hosts for a while: NFS caches attributes and directory listings. A
decision that ranks must agree on, or that they would all take from the same files, is therefore
taken by rank 0 and broadcast. A failure there is raised on every rank, so no rank is left
waiting at a later collective: a :class:`~megatron_patch.errors.UserError` as the same one-line
error, an ``OSError`` (a full disk, a folder without permission) as the same ``OSError`` (errno,
message and file name), anything else as the original exception on rank 0 and a RuntimeError
naming it elsewhere.
"""

from typing import Callable, TypeVar

import torch.distributed as dist

from megatron_patch.errors import UserError

Result = TypeVar("Result")


def on_rank_zero(function: Callable[..., Result], *args) -> Result:
    """``function(*args)`` on rank 0, its result (picklable) returned on every rank; called locally
    when there is no process group or one rank. Collective otherwise."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return function(*args)
    outcome = [None]
    failure = None
    if dist.get_rank() == 0:
        try:
            outcome[0] = ("result", function(*args))
        except (UserError, OSError) as error:
            outcome[0] = ("shared", error)
        except Exception as error:  # re-raised as is on rank 0, named on the others
            failure = error
            outcome[0] = ("failure", f"{type(error).__name__}: {error}")
    dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "result":
        return value
    if kind == "shared":
        raise value
    if failure is not None:
        raise failure
    raise RuntimeError(f"rank 0 failed in {getattr(function, '__name__', function)}: {value}")
