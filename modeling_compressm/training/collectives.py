"""Collectives with a timeout for the distributed steps of a reduction: a stopped or crashed rank must give a
clear error, not a hang.

Each call starts the collective asynchronously and waits with `Work.wait(timeout)`; a timeout, or a peer that
closed its connection, raises `DistributedReductionError` naming the step (`what`), the rank that waited and, where
it can be known, the rank(s) that never reached the collective: before each collective every rank
records in the job's key-value store (the default process group's store, a TCPStore under torchrun) how many
collectives of that group it has reached, so the rank that gives up reads which peers are behind.

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

from .settings import DEFAULTS

__all__ = [
    "DEFAULT_TIMEOUT",
    "DistributedReductionError",
    "timed_all_gather",
    "timed_broadcast",
    "timed_broadcast_object",
]

# How long one collective of a reduction may wait for the other ranks (`settings.DEFAULTS.collective_timeout`). Rank
# `src` computes the reduction while the others wait in the first collective after it, so this bounds the reduction
# time of the slowest layer too.
DEFAULT_TIMEOUT = timedelta(seconds=DEFAULTS.collective_timeout)


class DistributedReductionError(RuntimeError):
    """A distributed step of a reduction failed or timed out, or the sharded model cannot be reduced."""


# ----------------------------------------------------------------------------------- who reached a collective
_ARRIVALS_PREFIX = "compressm-arrivals"
_reached: dict[str, int] = {}  # group name -> number of timed collectives this process has started on it


def _group_name(group) -> str:
    group = dist.group.WORLD if group is None else group
    return str(getattr(group, "group_name", None) or id(group))


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # no store (a custom init) or private API changed: failures then name no rank
        return None


def _arrive(group) -> tuple[str, int]:
    """Count one more collective on `group` and record in the store that this rank reached it: (group name, count)."""
    name = _group_name(group)
    count = _reached[name] = _reached.get(name, 0) + 1
    store = _store()
    if store is not None:
        try:
            store.set(f"{_ARRIVALS_PREFIX}/{name}/{dist.get_rank()}", str(count))
        except Exception:
            pass
    return name, count


def ranks_behind(group, name: str, count: int) -> list[int] | None:
    """Global ranks of `group` that have not reached its `count`-th timed collective, or None when the store cannot
    tell (no store, or it does not answer)."""
    store = _store()
    if store is None:
        return None
    behind = []
    try:
        for rank in dist.get_process_group_ranks(dist.group.WORLD if group is None else group):
            key = f"{_ARRIVALS_PREFIX}/{name}/{rank}"
            reached = int(store.get(key)) if store.check([key]) else 0
            if reached < count:
                behind.append(rank)
    except Exception:
        return None
    return behind


def _describe_failure(what: str, timeout: timedelta, error: Exception, group=None,
                      arrival: tuple[str, int] | None = None) -> DistributedReductionError:
    rank = dist.get_rank()
    behind = ranks_behind(group, *arrival) if arrival is not None else None
    if behind:
        names = ", ".join(str(other) for other in behind)
        culprit = (f"rank {names} did not reach it" if len(behind) == 1 else f"ranks {names} did not reach it") + (
            " (stalled, crashed, or not running this reduction: every rank must run the reduction at the same step)"
        )
        if 0 in behind:
            culprit += "; if rank 0 was only slow deciding the event, raise collective_timeout"
    elif behind == []:
        culprit = "every rank reached it, so a rank failed or was stopped inside it"
    else:
        culprit = ("another rank stopped, crashed, or is not running this reduction (every rank must run the "
                   "reduction at the same step)")
    return DistributedReductionError(
        f"CompreSSM reduction: {what} did not complete on rank {rank} within {timeout.total_seconds():g} s: {culprit}. "
        f"Underlying error: {type(error).__name__}: {error}"
    )


def _run_timed(start, group, what: str, timeout: timedelta) -> None:
    """Start a collective (`start()` -> Work) after recording this rank's arrival, then wait at most `timeout`."""
    arrival = _arrive(group)
    try:
        work = start()
        work.wait(timeout=timeout)
    except Exception as error:  # gloo: "Operation timed out!" / "Connection closed by peer"
        raise _describe_failure(what, timeout, error, group, arrival) from error


def timed_all_gather(tensor: torch.Tensor, group, what: str, timeout: timedelta) -> list[torch.Tensor]:
    outputs = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    _run_timed(lambda: dist.all_gather(outputs, tensor, group=group, async_op=True), group, what, timeout)
    return outputs


def timed_broadcast(tensor: torch.Tensor, src: int, group, what: str, timeout: timedelta) -> None:
    _run_timed(lambda: dist.broadcast(tensor, src=src, group=group, async_op=True), group, what, timeout)


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
