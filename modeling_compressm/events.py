"""Reduction events and the history file `compressm_history.json`: one event type, one reader, one writer.

`ReductionEvent` is what the reducer returns, what the callback logs, what checkpoints store, what the model card
renders and what the CLI summarises. The history file is read and written only here (`read_history`,
`write_history`); it carries a format name and a `version` and is validated field by field on load, so a damaged or
foreign file fails with a `HistoryError` that names the file and the field instead of crashing later.

File layout (version 1):

    {"format": "compressm-history", "version": 1, "state_dims": [31, 40], "events": [{...}, ...]}

Files written before the version field existed (a bare {"state_dims": [...], "events": [...]}) are read as
version 0: their events used the key "type": "rollback" for rollbacks and policy "manual" for `model.reduce`.

Copied next to the weights of `trust_remote_code` checkpoints, so it imports only the standard library.

Longer than 500 lines on purpose: the event type, its field-by-field validation and the history file's one reader
and writer are one concept (one file format); split, the schema would be written in two places.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

HISTORY_FILE = "compressm_history.json"
HISTORY_FORMAT = "compressm-history"
HISTORY_VERSION = 1
EVENT_KINDS = ("reduction", "rollback", "manual", "restored")
LAYER_STATUSES = ("reduced", "unchanged", "failed")

__all__ = [
    "HISTORY_FILE",
    "HISTORY_VERSION",
    "EVENT_KINDS",
    "ReductionEvent",
    "History",
    "HistoryError",
    "read_history",
    "write_history",
    "coerce_events",
    "history_problems",
    "weights_disagreement",
    "histories_matching_weights",
    "event_metrics",
]


class HistoryError(ValueError):
    """A history (file or list of events) that does not follow the schema; the message names the source and field."""

    def __init__(self, source: str, where: str, problem: str):
        self.source, self.where, self.problem = source, where, problem
        super().__init__(f"{source}: {where}: {problem}" if where else f"{source}: {problem}")


# ----------------------------------------------------------------------------------------------------- checks
# Integers in a history (steps, state sizes, ranks, the version) must fit a signed 64-bit int, as they do wherever
# torch, numpy or a Trainer state hold them; JSON has no limit, so `"step": 1e400` written as digits would parse.
INT_LIMIT = 2**63 - 1


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -INT_LIMIT - 1 <= value <= INT_LIMIT


def _is_number(value) -> bool:
    return _is_int(value) or isinstance(value, float)


def _is_finite_number(value) -> bool:
    return _is_number(value) and math.isfinite(value)


def _shown(value, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters, so a huge int or a long list does not flood an error message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _dims(value, where: str, source: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(_is_int(item) and item >= 1 for item in value):
        raise HistoryError(
            source, where, f"expected a non-empty list of positive ints (at most 2**63 - 1), got {_shown(value)}"
        )
    return list(value)


def _per_layer(value, where: str, source: str, layers: int, check, expected: str):
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != layers:
        raise HistoryError(source, where, f"expected a list of {layers} entries (one per layer), got {_shown(value)}")
    for index, item in enumerate(value):
        if not check(item):
            raise HistoryError(source, f"{where}[{index}]", f"expected {expected}, got {_shown(item)}")
    return list(value)


def _optional(value, where: str, source: str, check, expected: str):
    if value is not None and not check(value):
        raise HistoryError(source, where, f"expected {expected} or null, got {_shown(value)}")
    return value


def _finite_or_none(item) -> bool:
    return item is None or _is_finite_number(item)


def _hsv_list(item) -> bool:
    return item is None or (isinstance(item, list) and all(_is_finite_number(v) and v >= 0 for v in item))


# ------------------------------------------------------------------------------------------------------ event
@dataclass
class ReductionEvent:
    """One entry of a model's reduction history.

    Attributes:
        step: optimizer step of the event (int), or None for events outside a training loop (`model.reduce`).
        kind: "reduction" (scheduled or `reducer.reduce_now`), "rollback" (undid the previous event), "manual"
            (`model.reduce`), "restored" (weights, sizes and history of a checkpoint were loaded, e.g. by
            `load_best_model_at_end`).
        policy: "tolerance", "fixed", "rollback", "manual" or None.
        dims_before / dims_after: per-layer state sizes (lists of ints).
        status: per layer "reduced" | "unchanged" | "failed".        errors: per layer the error text or None.
        kept_energy: per layer the share of the HSV sum kept (1.0 for layers left alone, None where unknown).
        hinf_bound: per layer the H-infinity error bound 2 * sum(discarded HSVs) of the reduced layer (None if the
            layer did not change).
        hinf_bound_relative: the same bound divided by a lower bound of the layer's H-infinity gain
            (`reduction.gain_lower_bound`), so an upper bound of the relative change of the layer's map.
        hsv: per layer the Hankel singular values the decision was based on (lists of floats), or None.
        ranks_requested: per layer the size the policy asked for.      wall_time_s: seconds the event took.
        tau / fraction: the policy setting used.      rolled_back: a later rollback undid this event.
        verified: rollback policy: the event passed its check.
        metric_name / metric_before / metric_after / relative_degradation: rollback policy check.
        restored_from: "restored" events: the checkpoint folder.
        extra: fields this version does not know (kept as they were when a newer file is read and written back).

    For code written against the earlier dict events, an event also reads as a (read-only) mapping: `event["step"]`,
    `"hsv" in event`, `event.get(...)`, `keys()`, `values()`, `items()`, `len(event)`, `iter(event)`, `dict(event)`.
    """

    step: int | None
    kind: str = "reduction"
    policy: str | None = None
    dims_before: list[int] = field(default_factory=list)
    dims_after: list[int] = field(default_factory=list)
    status: list[str] | None = None
    errors: list[str | None] | None = None
    kept_energy: list[float | None] | None = None
    hinf_bound: list[float | None] | None = None
    hinf_bound_relative: list[float | None] | None = None
    hsv: list[list[float] | None] | None = None
    ranks_requested: list[int | None] | None = None
    wall_time_s: float | None = None
    tau: float | None = None
    fraction: float | None = None
    rolled_back: bool = False
    verified: bool | None = None
    metric_name: str | None = None
    metric_before: float | None = None
    metric_after: float | None = None
    relative_degradation: float | None = None
    restored_from: str | None = None
    extra: dict = field(default_factory=dict)

    # -------------------------------------------------------------------------------------------- conversion
    @classmethod
    def from_layers(cls, layers, **fields) -> "ReductionEvent":
        """The event of a reduction from its per-layer results (`layer_reduction.LayerReduction`, one per layer, as
        `model.reduce` returns them): sizes, statuses, errors, kept energy, bounds and requested ranks; `fields` sets
        the others (step, kind, policy, ...) and may override any of these."""
        per_layer = {
            "dims_before": [layer.old_dim for layer in layers],
            "dims_after": [layer.new_dim for layer in layers],
            "status": [layer.status for layer in layers],
            "errors": [layer.error for layer in layers],
            "kept_energy": [layer.kept_energy for layer in layers],
            "hinf_bound": [layer.hinf_bound for layer in layers],
            "hinf_bound_relative": [layer.hinf_bound_relative for layer in layers],
            "ranks_requested": [layer.rank_requested for layer in layers],
        }
        return cls(**{**per_layer, **fields})

    def to_dict(self) -> dict:
        """JSON-serialisable dict; optional fields that are None (and an empty `extra`) are left out."""
        data = {}
        for item in dataclasses.fields(self):
            if item.name == "extra":
                continue
            value = getattr(self, item.name)
            if value is None and item.name not in ("step", "policy"):
                continue
            data[item.name] = [list(v) if isinstance(v, list) else v for v in value] if isinstance(value, list) else value
        for key, value in self.extra.items():
            data.setdefault(key, value)
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str = "event", source: str = "history") -> "ReductionEvent":
        """Validate and convert one event dict (current or version-0 layout). Raises HistoryError naming the field."""
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise HistoryError(source, where, f"expected an object, got {type(data).__name__}")
        data = dict(data)
        known = {item.name for item in dataclasses.fields(cls)} - {"extra"}
        legacy_type = data.pop("type", None)
        if "kind" not in data:
            if legacy_type is not None:
                data["kind"] = legacy_type
            elif data.get("policy") == "manual" and data.get("step") is None:
                data["kind"] = "manual"
        step = data.get("step")
        if step is not None and not (_is_int(step) and step >= 0):
            raise HistoryError(
                source, f"{where}.step", f"expected an int in [0, 2**63 - 1] or null, got {_shown(step)}"
            )
        kind = data.get("kind", "reduction")
        if kind not in EVENT_KINDS:
            raise HistoryError(source, f"{where}.kind", f"expected one of {list(EVENT_KINDS)}, got {_shown(kind)}")
        if "dims_before" not in data or "dims_after" not in data:
            missing = "dims_before" if "dims_before" not in data else "dims_after"
            raise HistoryError(source, f"{where}.{missing}", "missing")
        before = _dims(data["dims_before"], f"{where}.dims_before", source)
        after = _dims(data["dims_after"], f"{where}.dims_after", source)
        if len(after) != len(before):
            raise HistoryError(
                source, f"{where}.dims_after", f"has {len(after)} layers but dims_before has {len(before)}"
            )
        layers = len(before)
        values = dict(
            step=step,
            kind=kind,
            policy=_optional(data.get("policy"), f"{where}.policy", source, lambda v: isinstance(v, str), "a string"),
            dims_before=before,
            dims_after=after,
            status=_per_layer(data.get("status"), f"{where}.status", source, layers,
                              lambda v: v in LAYER_STATUSES, f"one of {list(LAYER_STATUSES)}"),
            errors=_per_layer(data.get("errors"), f"{where}.errors", source, layers,
                              lambda v: v is None or isinstance(v, str), "a string or null"),
            kept_energy=_per_layer(data.get("kept_energy"), f"{where}.kept_energy", source, layers,
                                   lambda v: v is None or (_is_number(v) and 0.0 <= v <= 1.0 + 1e-9),
                                   "a number in [0, 1] or null"),
            hinf_bound=_per_layer(data.get("hinf_bound"), f"{where}.hinf_bound", source, layers,
                                  _finite_or_none, "a finite number or null"),
            hinf_bound_relative=_per_layer(data.get("hinf_bound_relative"), f"{where}.hinf_bound_relative", source,
                                           layers, _finite_or_none, "a finite number or null"),
            hsv=_per_layer(data.get("hsv"), f"{where}.hsv", source, layers, _hsv_list,
                           "a list of non-negative finite numbers or null"),
            ranks_requested=_per_layer(data.get("ranks_requested"), f"{where}.ranks_requested", source, layers,
                                       lambda v: v is None or (_is_int(v) and v >= 1),
                                       "a positive int (at most 2**63 - 1) or null"),
            wall_time_s=_optional(data.get("wall_time_s"), f"{where}.wall_time_s", source,
                                  lambda v: _is_finite_number(v) and v >= 0, "a finite number >= 0"),
            tau=_optional(data.get("tau"), f"{where}.tau", source, _is_finite_number, "a finite number"),
            fraction=_optional(data.get("fraction"), f"{where}.fraction", source, _is_finite_number,
                               "a finite number"),
            rolled_back=data.get("rolled_back", False),
            verified=_optional(data.get("verified"), f"{where}.verified", source,
                               lambda v: isinstance(v, bool), "true/false"),
            metric_name=_optional(data.get("metric_name"), f"{where}.metric_name", source,
                                  lambda v: isinstance(v, str), "a string"),
            metric_before=_optional(data.get("metric_before"), f"{where}.metric_before", source, _is_number, "a number"),
            metric_after=_optional(data.get("metric_after"), f"{where}.metric_after", source, _is_number, "a number"),
            relative_degradation=_optional(data.get("relative_degradation"), f"{where}.relative_degradation", source,
                                           _is_number, "a number"),
            restored_from=_optional(data.get("restored_from"), f"{where}.restored_from", source,
                                    lambda v: isinstance(v, str), "a string"),
        )
        if not isinstance(values["rolled_back"], bool):
            problem = f"expected true/false, got {_shown(values['rolled_back'])}"
            raise HistoryError(source, f"{where}.rolled_back", problem)
        extra = {key: value for key, value in data.items() if key not in known}
        return cls(**values, extra=extra)

    # ------------------------------------------------------------------------------- read-only mapping protocol
    # For code written against the earlier dict events: the keys are the field names (None where unset), the keys of
    # `extra`, and on rollbacks the version-0 key "type" (version 0 wrote "type": "rollback" on rollbacks only).
    # `get` returns its default for unset (None) fields too, as a dict from `to_dict()`, which leaves them out, would.
    def keys(self) -> list[str]:
        names = [item.name for item in dataclasses.fields(self) if item.name != "extra"]
        if self.kind == "rollback":
            names.append("type")
        return names + [key for key in self.extra if key not in names]

    def __getitem__(self, key: str):
        if key != "extra" and key in self.__dataclass_fields__:
            return getattr(self, key)
        if key == "type" and self.kind == "rollback":
            return "rollback"
        return self.extra[key]  # KeyError for any other key

    def __contains__(self, key) -> bool:
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def values(self) -> list:
        return [self[key] for key in self.keys()]

    def items(self) -> list[tuple[str, Any]]:
        return [(key, self[key]) for key in self.keys()]

    def get(self, key: str, default=None):
        try:
            value = self[key]
        except KeyError:
            return default
        return default if value is None else value


def coerce_events(events, source: str = "history") -> list[ReductionEvent]:
    """ReductionEvents from a list of events or event dicts (validated); raises HistoryError naming the entry."""
    if not isinstance(events, (list, tuple)):
        raise HistoryError(source, "events", f"expected a list of events, got {type(events).__name__}")
    return [ReductionEvent.from_dict(event, where=f"events[{index}]", source=source) for index, event in enumerate(events)]


def history_problems(events: list[ReductionEvent], state_dims: list[int] | None = None) -> list[str]:
    """Inconsistencies between events that do not make a history unreadable (reported as warnings by callers):
    an event that does not start from the sizes the previous one ended at, or `state_dims` that are not the sizes
    the last event ended at."""
    problems = []
    for index in range(1, len(events)):
        event, previous = events[index], events[index - 1]
        if event.kind != "restored" and event.dims_before != previous.dims_after:
            problems.append(
                f"events[{index}] starts from {event.dims_before} but events[{index - 1}] ended at {previous.dims_after}"
            )
    if state_dims is not None and events and list(events[-1].dims_after) != list(state_dims):
        problems.append(f"state_dims {list(state_dims)} are not the sizes the last event ended at ({events[-1].dims_after})")
    return problems


def weights_disagreement(events, state_dims, recorded_state_dims=None) -> tuple[str, str] | None:
    """Where a history disagrees with the weights it is stored with: (field, problem), or None if it agrees.

    It agrees when the sizes it recorded (`recorded_state_dims`, the file's "state_dims"; None: not recorded) are the
    weights' per-layer state sizes `state_dims`, every event has one entry per layer, and the last event ended at
    those sizes. A history that disagrees describes other weights: saved beside these, it makes a folder that cannot
    be loaded (or one whose card and resume state are wrong).
    """
    state_dims = list(state_dims)
    if recorded_state_dims is not None and list(recorded_state_dims) != state_dims:
        return "state_dims", f"is {list(recorded_state_dims)} but the weights have the state sizes {state_dims}"
    for index, event in enumerate(events):
        if len(event.dims_after) != len(state_dims):
            return (f"events[{index}].dims_after",
                    f"has {len(event.dims_after)} layers but the weights have {len(state_dims)} (state sizes "
                    f"{state_dims})")
    if events and list(events[-1].dims_after) != state_dims:
        return (f"events[{len(events) - 1}].dims_after",
                f"the last event ends at {events[-1].dims_after} but the weights have the state sizes {state_dims}")
    return None


def histories_matching_weights(copies, state_dims, weights_source: str):
    """Pick, among the copies of one history (a checkpoint's history file and the one in its trainer_state.json),
    those that agree with the weights (`weights_disagreement`).

    Args: copies: (source, events, recorded state_dims or None) for each copy that exists; state_dims: the weights'
    per-layer state sizes; weights_source: where those come from (config.json).
    Returns (the agreeing copies, one warning per copy left out); raises HistoryError naming every copy, its field and
    the weights when copies exist and none agrees.
    """
    matching, problems = [], []
    for source, events, recorded in copies:
        disagreement = weights_disagreement(events, state_dims, recorded)
        if disagreement is None:
            matching.append((source, events, recorded))
        else:
            problems.append((source, *disagreement))
    if problems and not matching:
        (source, where, problem), others = problems[0], problems[1:]
        also = "".join(f"; and {other}: {other_where}: {other_problem}" for other, other_where, other_problem in others)
        raise HistoryError(
            source, where,
            f"{problem}{also}. No copy of the history describes the weights ({weights_source} gives the state sizes "
            f"{list(state_dims)}): resume from another checkpoint, or move the history away to go on without one",
        )
    return matching, [f"{source}: {where}: {problem}; not used: {matching[0][0]} matches the weights"
                      for source, where, problem in problems]


def _check_rollbacks(events: list[ReductionEvent], source: str) -> None:
    """A rollback must directly follow the event it undid (marked rolled_back) and return to its starting sizes."""
    for index, event in enumerate(events):
        if event.kind != "rollback":
            continue
        previous = events[index - 1] if index > 0 else None
        if previous is None or not previous.rolled_back or previous.kind not in ("reduction", "manual"):
            raise HistoryError(
                source, f"events[{index}]",
                "a 'rollback' event must directly follow the reduction it undid (marked rolled_back=true); this one "
                "does not, so the file is not a history this package wrote",
            )
        if event.dims_after != previous.dims_before:
            raise HistoryError(
                source, f"events[{index}].dims_after",
                f"a rollback returns to the sizes before the undone event ({previous.dims_before}), got {event.dims_after}",
            )


# ------------------------------------------------------------------------------------------------ history file
@dataclass
class History:
    """Contents of a history file: events, the state sizes of the weights it was saved with, format version."""

    events: list[ReductionEvent]
    state_dims: list[int] | None
    version: int
    path: str | None = None


def parse_history(data: Any, source: str = "history") -> History:
    """Validate a decoded history document (see the module docstring). Raises HistoryError naming the field."""
    if not isinstance(data, dict):
        raise HistoryError(
            source, "", f"expected a JSON object with 'version', 'state_dims' and 'events', got a {type(data).__name__}"
        )
    version = data.get("version", 0)
    if not _is_int(version) or version < 0:
        raise HistoryError(source, "version", f"expected a non-negative int, got {_shown(version)}")
    if version > HISTORY_VERSION:
        raise HistoryError(
            source, "version",
            f"written by a newer release (version {version}; this one reads up to {HISTORY_VERSION}): upgrade compressm",
        )
    if version >= 1 and data.get("format") != HISTORY_FORMAT:
        raise HistoryError(source, "format", f"expected {HISTORY_FORMAT!r}, got {_shown(data.get('format'))}")
    state_dims = data.get("state_dims")
    if state_dims is not None or version >= 1:
        state_dims = _dims(state_dims, "state_dims", source)
    if "events" not in data:
        raise HistoryError(source, "events", "missing")
    events = coerce_events(data["events"], source=source)
    for index, event in enumerate(events):
        if state_dims is not None and len(event.dims_after) != len(state_dims):
            raise HistoryError(
                source, f"events[{index}].dims_after",
                f"has {len(event.dims_after)} layers but state_dims has {len(state_dims)}",
            )
    _check_rollbacks(events, source)
    return History(events=events, state_dims=state_dims, version=version)


def read_history(path: str) -> History:
    """Read and validate a history file. Raises FileNotFoundError if nothing is at `path`, HistoryError (naming the
    file, and the field where one is wrong) if it is invalid or is not a readable file (a folder, say)."""
    path = os.fspath(path)
    if os.path.lexists(path) and not os.path.isfile(path):
        kind = "a folder" if os.path.isdir(path) else "not a regular file (or a broken link)"
        raise HistoryError(
            path, "", f"is {kind}, not a history file: move it away (the weights then load without a history) or "
            f"put the {HISTORY_FILE} saved with these weights in its place",
        )
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        history = parse_history(data, source=path)  # (inside: repr of a deep value in an error may recurse too)
    except json.JSONDecodeError as error:
        raise HistoryError(path, "", f"not valid JSON ({error})") from None
    except UnicodeDecodeError as error:
        raise HistoryError(path, "", f"not UTF-8 text ({error})") from None
    except RecursionError:
        raise HistoryError(path, "", "JSON nested too deeply to be a history file (it is damaged or not one)") from None
    except PermissionError as error:
        raise HistoryError(path, "", f"cannot be read ({error})") from None
    history.path = path
    return history


def history_document(events, state_dims: list[int]) -> dict:
    """The JSON document `write_history` writes (events validated)."""
    events = coerce_events(list(events), source="model.reduction_history")
    return {
        "format": HISTORY_FORMAT,
        "version": HISTORY_VERSION,
        "state_dims": _dims(list(state_dims), "state_dims", "model.config"),
        "events": [event.to_dict() for event in events],
    }


def write_history(path: str, events, state_dims: list[int]) -> None:
    """Write the history file atomically (a temporary file in the same folder, then `os.replace`).

    Args:
        path: target file.   events: ReductionEvents or event dicts (validated; HistoryError names a bad entry).
        state_dims: the per-layer state sizes of the weights saved next to it.
    """
    document = history_document(events, state_dims)
    path = os.fspath(path)
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


# ----------------------------------------------------------------------------------------------------- logging
def event_metrics(event: ReductionEvent, reductions: int | None = None) -> dict:
    """Flat `compressm/...` metrics of one event, for `Trainer.log` or any experiment tracker.

    Keys: state_dim_layer{i}, total_state_dim, kept_energy_layer{i}, hinf_bound_layer{i}, hinf_bound_rel_layer{i},
    hsv_sum_layer{i} (when the event has HSVs), failed_layers, wall_time_s, reductions (events so far, if given),
    rolled_back (rollback events).
    """
    metrics = {f"compressm/state_dim_layer{index}": dim for index, dim in enumerate(event.dims_after)}
    metrics["compressm/total_state_dim"] = sum(event.dims_after)
    for name, values in (
        ("kept_energy", event.kept_energy),
        ("hinf_bound", event.hinf_bound),
        ("hinf_bound_rel", event.hinf_bound_relative),
    ):
        for index, value in enumerate(values or []):
            if value is not None:
                metrics[f"compressm/{name}_layer{index}"] = float(value)
    for index, values in enumerate(event.hsv or []):
        if values is not None:
            metrics[f"compressm/hsv_sum_layer{index}"] = float(sum(values))
    if event.status is not None:
        metrics["compressm/failed_layers"] = sum(status == "failed" for status in event.status)
    if event.wall_time_s is not None:
        metrics["compressm/wall_time_s"] = float(event.wall_time_s)
    if reductions is not None:
        metrics["compressm/reductions"] = reductions
    if event.kind == "rollback":
        metrics["compressm/rolled_back"] = 1
    return metrics
