"""The reduction history beside the weights (issue 20, items 4 and 12): a history that disagrees with the weights is
refused on load and never written; of a checkpoint's two copies the one that matches the weights is used; damaged
history files (a folder, deeply nested JSON, out-of-range integers) fail naming the file; `ReductionEvent` reads as a
mapping."""

import json
import logging

import pytest
import torch

from modeling_compressm import CompreSSMConfig, CompreSSMForCausalLM, HistoryError, ReductionEvent
from modeling_compressm.training.checkpoints import read_checkpoint


def reduced_lm(*ranks_per_event):
    torch.manual_seed(0)
    model = CompreSSMForCausalLM(CompreSSMConfig(vocab_size=32, hidden_size=8, num_hidden_layers=2, state_dims=[8, 8]))
    for ranks in ranks_per_event:
        model.reduce(list(ranks))
    return model


@pytest.fixture
def saved(tmp_path):
    """A folder holding a model reduced 8 -> 6 -> 4 (two events) and its history."""
    folder = tmp_path / "saved"
    reduced_lm([6, 6], [4, 4]).save_pretrained(folder)
    return folder


def history_document(folder):
    return json.loads((folder / "compressm_history.json").read_text())


def write_history_document(folder, document):
    path = folder / "compressm_history.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return path


# --- item 4: a history that disagrees with the weights ---
def other_weights_history(document, change):
    """The document of `saved` made to describe other weights."""
    if change == "layer count":  # three layers, as another model's history would have
        event = {"step": None, "kind": "manual", "policy": "manual", "dims_before": [8, 8, 8], "dims_after": [4, 4, 8]}
        return dict(document, state_dims=[4, 4, 8], events=[event]), "state_dims"
    if change == "sizes":  # ends at other sizes: the history of an earlier checkpoint of the same run
        return dict(document, state_dims=[6, 6], events=document["events"][:1]), "state_dims"
    if change == "last event":  # an old-format file, without its own state_dims, one event short
        return dict({"events": document["events"][:1]}), "events[0].dims_after"
    if change == "layer count, no state_dims":
        event = {"step": None, "policy": "manual", "dims_before": [8, 8, 8], "dims_after": [4, 4, 8]}
        return {"events": [event]}, "events[0].dims_after"
    raise ValueError(change)


@pytest.mark.parametrize("change", ["layer count", "sizes", "last event", "layer count, no state_dims"])
def test_a_history_that_disagrees_with_the_weights_is_refused_naming_file_field_and_what_to_do(saved, change):
    document, field = other_weights_history(history_document(saved), change)
    path = write_history_document(saved, document)
    with pytest.raises(HistoryError) as error:
        CompreSSMForCausalLM.from_pretrained(saved)
    message = str(error.value)
    assert message.startswith(f"{path}: {field}: ") and "[4, 4]" in message
    assert "Move it away to load the weights without a history" in message
    path.unlink()  # what the message says to do: the weights are intact
    assert CompreSSMForCausalLM.from_pretrained(saved).config.state_dims == [4, 4]


def test_loading_at_other_sizes_on_purpose_leaves_the_history_out_with_a_warning(saved, caplog, tmp_path):
    with caplog.at_level(logging.WARNING):
        model = CompreSSMForCausalLM.from_pretrained(saved, state_dims=[8, 8], ignore_mismatched_sizes=True)
    assert model.config.state_dims == [8, 8] and model.reduction_history == []
    assert any("not restored (ignore_mismatched_sizes" in record.getMessage() for record in caplog.records)
    model.save_pretrained(tmp_path / "again")  # consistent: loads back
    assert CompreSSMForCausalLM.from_pretrained(tmp_path / "again").reduction_history == []


def test_a_history_that_disagrees_with_the_model_is_never_written(tmp_path):
    model = reduced_lm([6, 6])
    model.reduction_history.append(ReductionEvent(step=None, kind="manual", dims_before=[6, 6], dims_after=[3, 3]))
    with pytest.raises(HistoryError, match=r"^model\.reduction_history: events\[1\]\.dims_after: .*nothing was written"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    model.reduction_history = model.reduction_history[:1]
    model.save_pretrained(tmp_path / "out")
    assert CompreSSMForCausalLM.from_pretrained(tmp_path / "out").reduction_history == model.reduction_history


def test_resizing_without_an_event_is_caught_at_save_not_by_the_next_load(tmp_path):
    model = reduced_lm([6, 6])
    model.set_state_dims([5, 5])  # re-initialised layers: the history no longer describes these weights
    with pytest.raises(HistoryError, match="set_state_dims"):
        model.save_pretrained(tmp_path / "out")
    model.reduction_history = []
    model.save_pretrained(tmp_path / "out")
    assert CompreSSMForCausalLM.from_pretrained(tmp_path / "out").config.state_dims == [5, 5]


def write_trainer_state(folder, events):
    """trainer_state.json of a Trainer checkpoint whose CompreSSMCallback state holds these events."""
    state = {"global_step": 6, "stateful_callbacks": {"CompreSSMCallback": {"args": {}, "attributes": {
        "reducer_state": {"history": [event.to_dict() for event in events], "stopped": False, "pending": None}}}}}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    return folder / "trainer_state.json"


def test_checkpoint_uses_the_history_copy_that_matches_the_weights(tmp_path, caplog):
    """The file is richer but ends at other sizes (it belongs to a later state of the run); trainer_state.json
    matches the weights: it wins, whichever side is richer, and a warning names the copy left out."""
    checkpoint = tmp_path / "checkpoint-6"
    model = reduced_lm([6, 6])
    model.save_pretrained(checkpoint)
    matching = list(model.reduction_history)
    state_path = write_trainer_state(checkpoint, matching)
    later = reduced_lm([6, 6], [4, 4]).reduction_history
    write_history_document(checkpoint, {"format": "compressm-history", "version": 1, "state_dims": [4, 4],
                                        "events": [event.to_dict() for event in later]})
    info = read_checkpoint(checkpoint)
    assert info.events == matching and info.state_dims == [6, 6]
    assert any(str(checkpoint / "compressm_history.json") in warning and f"{state_path} matches the weights" in warning
               for warning in info.warnings)

    model.save_pretrained(checkpoint)  # the file matches again; now trainer_state.json holds the other weights' history
    write_trainer_state(checkpoint, later)
    assert read_checkpoint(checkpoint).events == matching


def test_checkpoint_whose_history_copies_both_disagree_with_the_weights_is_refused(tmp_path):
    checkpoint = tmp_path / "checkpoint-6"
    reduced_lm([6, 6]).save_pretrained(checkpoint)
    later = reduced_lm([6, 6], [4, 4]).reduction_history
    state_path = write_trainer_state(checkpoint, later)
    write_history_document(checkpoint, {"format": "compressm-history", "version": 1, "state_dims": [4, 4],
                                        "events": [event.to_dict() for event in later]})
    with pytest.raises(HistoryError) as error:
        read_checkpoint(checkpoint)
    message = str(error.value)
    assert message.startswith(f"{checkpoint / 'compressm_history.json'}: state_dims: ") and str(state_path) in message
    assert "resume from another checkpoint" in message


# --- item 12: damaged history files ---
def test_a_history_path_that_is_a_folder_is_refused_not_ignored(saved, tmp_path):
    path = saved / "compressm_history.json"
    path.unlink()
    path.mkdir()
    with pytest.raises(HistoryError, match=rf"^{path}: is a folder, not a history file: move it away"):
        CompreSSMForCausalLM.from_pretrained(saved)
    checkpoint = tmp_path / "checkpoint-2"
    reduced_lm().save_pretrained(checkpoint)
    (checkpoint / "compressm_history.json").unlink()
    (checkpoint / "compressm_history.json").mkdir()
    with pytest.raises(HistoryError, match="is a folder"):
        read_checkpoint(checkpoint)


def test_deeply_nested_json_fails_naming_the_file(saved):
    path = write_history_document(saved, '{"events": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(HistoryError, match=rf"^{path}: JSON nested too deeply"):
        CompreSSMForCausalLM.from_pretrained(saved)


def test_a_deeply_nested_trainer_state_fails_naming_the_file(tmp_path):
    checkpoint = tmp_path / "checkpoint-2"
    reduced_lm([6, 6]).save_pretrained(checkpoint)
    (checkpoint / "trainer_state.json").write_text('{"stateful_callbacks": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(HistoryError, match=rf"^{checkpoint / 'trainer_state.json'}: JSON nested too deeply"):
        read_checkpoint(checkpoint)


@pytest.mark.parametrize("field, value", [
    ("step", 10**400), ("step", 2**63), ("dims_before", [2**64, 8]), ("ranks_requested", [10**30, None]),
    ("wall_time_s", 10**400), ("tau", float("nan")),
], ids=["step-10**400", "step-2**63", "dims-2**64", "ranks-10**30", "wall_time-10**400", "tau-nan"])
def test_integers_beyond_64_bits_and_non_finite_settings_are_refused(saved, field, value):
    document = history_document(saved)
    document["events"][0][field] = value
    path = write_history_document(saved, document)
    with pytest.raises(HistoryError, match=rf"^{path}: events\[0\]\.{field}") as error:
        CompreSSMForCausalLM.from_pretrained(saved)
    assert len(str(error.value)) < 400  # a 400-digit number is cut short in the message


def test_the_largest_64_bit_step_is_accepted(saved):
    document = history_document(saved)
    document["events"][0]["step"] = 2**63 - 1
    write_history_document(saved, document)
    assert CompreSSMForCausalLM.from_pretrained(saved).reduction_history[0].step == 2**63 - 1


# --- item 12: ReductionEvent reads as a mapping ---
def test_reduction_event_supports_the_read_only_mapping_protocol():
    event = ReductionEvent.from_dict({"step": 3, "dims_before": [4, 4], "dims_after": [2, 4], "note": "kept"})
    assert "hsv" in event and "dims_after" in event and "note" in event
    assert "nonsense" not in event and 0 not in event and "extra" not in event and "type" not in event
    assert list(event) == list(event.keys()) and len(event) == len(event.keys())
    assert event.keys()[:3] == ["step", "kind", "policy"] and event.keys()[-1] == "note"
    assert dict(event.items()) == dict(event) and list(dict(event).values()) == event.values()
    assert dict(event)["dims_after"] == [2, 4] and event["note"] == "kept"
    assert event.get("hsv") is None and event.get("hsv", "unset") == "unset" and event.get("step") == 3
    with pytest.raises(KeyError):
        event["nonsense"]
    assert ReductionEvent.from_dict(dict(event)) == event  # the mapping is the event's dict form


def test_a_rollback_event_carries_the_version_0_type_key():
    rollback = ReductionEvent(step=4, kind="rollback", dims_before=[2], dims_after=[4])
    assert "type" in rollback and rollback["type"] == "rollback" and rollback.get("type") == "rollback"
    assert ReductionEvent.from_dict(dict(rollback)) == rollback
    assert ReductionEvent(step=4, dims_before=[4], dims_after=[2]).get("type") is None


def test_history_warnings_for_gaps_between_events_still_load(saved, caplog):
    """Events that do not chain (a gap) but end at the weights' sizes are a warning, not an error."""
    document = history_document(saved)
    document["events"][1]["dims_before"] = [7, 7]
    write_history_document(saved, document)
    with caplog.at_level(logging.WARNING):
        assert len(CompreSSMForCausalLM.from_pretrained(saved).reduction_history) == 2
    assert any("events[1] starts from [7, 7]" in record.getMessage() for record in caplog.records)
