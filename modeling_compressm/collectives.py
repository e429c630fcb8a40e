"""Collectives with a timeout for the distributed steps of a reduction (issue 11.7: a stopped or crashed rank must
give a clear error, not a hang).

Each call starts the collective asynchronously and waits with `Work.wait(timeout)`; a timeout, or a peer that
closed its connection, raises `DistributedReductionError` naming the step (`what`) and the rank that waited.

    timed_all_gather(tensor, group, what, timeout)              -> list of tensors, one per rank of `group`
    timed_broadcast(tensor, src, group, what, timeout)          -> None (in place)
    timed_broadcast_object(value, src, group, device, what, timeout) -> the picklable `value` of rank `src`
"""

from __future__ import annotations

import io
import pickle
from datetime import timedelta

import torch
import torch.distributed as dist

from .schedule import DEFAULTS

__all__ = [
    "DEFAULT_TIMEOUT",
    "DistributedReductionError",
    "timed_all_gather",
    "timed_broadcast",
    "timed_broadcast_object",
]

# How long one collective of a reduction may wait for the other ranks (`schedule.DEFAULTS.collective_timeout`). Rank
# `src` computes the reduction while the others wait in the first collective after it, so this bounds the reduction
# time of the slowest layer too.
DEFAULT_TIMEOUT = timedelta(seconds=DEFAULTS.collective_timeout)


class DistributedReductionError(RuntimeError):
    """A distributed step of a reduction failed or timed out, or the sharded model cannot be reduced."""


def _describe_failure(what: str, timeout: timedelta, error: Exception) -> DistributedReductionError:
    rank = dist.get_rank()
    return DistributedReductionError(
        f"CompreSSM reduction: {what} did not complete on rank {rank} within {timeout.total_seconds():g} s: "
        "another rank stopped, crashed, or is not running this reduction (every rank must run the reduction at the "
        f"same step). Underlying error: {type(error).__name__}: {error}"
    )


def _wait(work, what: str, timeout: timedelta) -> None:
    try:
        work.wait(timeout=timeout)
    except Exception as error:  # gloo: "Operation timed out!" / "Connection closed by peer"
        raise _describe_failure(what, timeout, error) from error


def timed_all_gather(tensor: torch.Tensor, group, what: str, timeout: timedelta) -> list[torch.Tensor]:
    outputs = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    try:
        work = dist.all_gather(outputs, tensor, group=group, async_op=True)
    except Exception as error:
        raise _describe_failure(what, timeout, error) from error
    _wait(work, what, timeout)
    return outputs


def timed_broadcast(tensor: torch.Tensor, src: int, group, what: str, timeout: timedelta) -> None:
    try:
        work = dist.broadcast(tensor, src=src, group=group, async_op=True)
    except Exception as error:
        raise _describe_failure(what, timeout, error) from error
    _wait(work, what, timeout)


def timed_broadcast_object(value, src: int, group, device, what: str, timeout: timedelta):
    """Pickled `value` of rank `src` on every rank (two timed broadcasts: length, then bytes)."""
    if dist.get_rank() == src:
        buffer = io.BytesIO()
        pickle.dump(value, buffer)
        payload = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8).to(device)
        length = torch.tensor([payload.numel()], dtype=torch.int64, device=device)
    else:
        length = torch.zeros(1, dtype=torch.int64, device=device)
    timed_broadcast(length, src, group, what, timeout)
    if dist.get_rank() != src:
        payload = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
    timed_broadcast(payload, src, group, what, timeout)
    if dist.get_rank() == src:
        return value
    return pickle.loads(payload.cpu().numpy().tobytes())
