"""Model card (README.md) and Hankel-singular-value plot written next to a saved CompreSSM checkpoint.

The plot is drawn with matplotlib's object API (`matplotlib.figure.Figure`), so the process-wide backend and pyplot's
figure registry are left alone. Drawing takes far longer than writing the weights, so the spectrum and its PNG are
computed once per reduction event (cached on the model, keyed by its sizes and history) and reused by every later
save; `refresh_card_spectrum(model)` (called by CompreSSMCallback when training ends) makes the next save redraw.
During training CompreSSMCallback defers the plot (`defer_card_plot`) and draws it into each checkpoint once the
checkpoint is complete, so the save itself stays short.
Every value that goes into the Markdown is escaped.

Copied with the modeling file for `trust_remote_code` checkpoints, so it imports nothing beyond the standard library
at module level; matplotlib is optional (without it the card has no plot).
"""

from __future__ import annotations

import io
import os

HSV_PLOT_FILE = "hsv_spectrum.png"
_CACHE_ATTRIBUTE = "_compressm_card_spectrum"
_DEFER_PLOT_ATTRIBUTE = "_compressm_defer_card_plot"
_MARKDOWN_SPECIAL = set("\\|<`")  # table cells (pipes), HTML tags, code spans


def escape_markdown(value) -> str:
    """`str(value)` made safe for one Markdown table cell: line breaks flattened; backslashes, pipes, `<` (HTML tags),
    backticks (code spans) and the `](` of inline links and images (`[text](url)`, `![alt](url)`) backslash-escaped."""
    text = " ".join(str(value).split())
    text = "".join("\\" + character if character in _MARKDOWN_SPECIAL else character for character in text)
    return text.replace("](", "\\](")


def _energy_line(event) -> str:
    kept = event.kept_energy
    if not kept:
        return ""
    return ", ".join(f"{value:.4f}" if value is not None else "-" for value in kept)


def _bound_line(event) -> str:
    bounds = event.hinf_bound_relative
    if not bounds:
        return "-"
    return ", ".join(f"{value:.3g}" if value is not None else "-" for value in bounds)


def render_hsv_plot(hsv_per_layer: list[list[float]]) -> bytes | None:
    """PNG bytes of each layer's Hankel singular values (log scale, descending); None without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    figure = Figure(figsize=(6, 3.5))
    axis = figure.subplots()
    for index, values in enumerate(hsv_per_layer):
        positive = [value for value in values or [] if value > 0]
        if positive:
            axis.semilogy(range(1, len(positive) + 1), positive, marker=".", label=f"layer {index} (N={len(values)})")
    axis.set_xlabel("state index (sorted)")
    axis.set_ylabel("Hankel singular value")
    axis.set_title("Hankel singular values per layer")
    axis.grid(True, which="both", alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def write_hsv_plot(hsv_per_layer: list[list[float]], path: str) -> bool:
    """Plot each layer's Hankel singular values to `path` (PNG). False without matplotlib."""
    png = render_hsv_plot(hsv_per_layer)
    if png is None:
        return False
    with open(path, "wb") as handle:
        handle.write(png)
    return True


def _spectrum_key(model) -> tuple:
    events = model.reduction_history
    last = (events[-1].kind, events[-1].step, len(events)) if events else None
    return tuple(model.config.state_dims), last


def defer_card_plot(model, deferred: bool = True) -> None:
    """While deferred, saves write the card without the HSV plot (drawing takes 10-20x longer than writing a small
    checkpoint, and a plain Trainer's checkpoint is incomplete until the save returns); CompreSSMCallback defers it
    during training and draws it into each finished checkpoint (`write_model_card(..., draw_plot=True)`)."""
    if deferred:
        model.__dict__[_DEFER_PLOT_ATTRIBUTE] = True
    else:
        model.__dict__.pop(_DEFER_PLOT_ATTRIBUTE, None)


def card_spectrum(model, state_dict: dict | None = None,
                  draw_plot: bool | None = None) -> tuple[list[list[float]] | None, bytes | None]:
    """(HSVs per layer as lists, PNG bytes or None) of the model, computed once per reduction event and cached.

    With `state_dict` (the weights being saved) the HSVs come from its tensors, so no parameter of a sharded model
    is read (that would be a collective on one process). A sharded model without a state dict gets no spectrum (not
    cached, so a later save with the gathered state dict draws it). `draw_plot` None: draw unless deferred
    (`defer_card_plot`); a spectrum cached without its plot is drawn by the first call that draws."""
    if draw_plot is None:
        draw_plot = not model.__dict__.get(_DEFER_PLOT_ATTRIBUTE, False)
    key = _spectrum_key(model)
    cached = model.__dict__.get(_CACHE_ATTRIBUTE)
    if cached is not None and cached[0] == key:
        _, hsv_per_layer, png, drawn = cached
        if draw_plot and not drawn and hsv_per_layer is not None:
            png = render_hsv_plot(hsv_per_layer)
            model.__dict__[_CACHE_ATTRIBUTE] = (key, hsv_per_layer, png, True)
        return hsv_per_layer, png
    if state_dict is None and model._has_sharded_parameters():
        return None, None
    try:
        hsv_per_layer = [values.tolist() for values in model.hankel_singular_values(state_dict=state_dict)]
    except (ValueError, RuntimeError):  # a layer with NaN or unstable eigenvalues: no spectrum to show
        hsv_per_layer = None
    png = render_hsv_plot(hsv_per_layer) if hsv_per_layer is not None and draw_plot else None
    model.__dict__[_CACHE_ATTRIBUTE] = (key, hsv_per_layer, png, draw_plot)
    return hsv_per_layer, png


def refresh_card_spectrum(model) -> None:
    """Make the next save recompute and redraw the spectrum (e.g. at the end of training)."""
    model.__dict__.pop(_CACHE_ATTRIBUTE, None)


_AUTO_CLASS_FOR = {
    "CompreSSMForCausalLM": "AutoModelForCausalLM",
    "CompreSSMForSequenceClassification": "AutoModelForSequenceClassification",
}

# Text of the card transformers' `push_to_hub` creates when the Hub repo has none (`create_and_tag_model_card`).
_TRANSFORMERS_DEFAULT_CARD_MARKER = "This model card has been automatically generated"
CARD_MARKER = "- compressm"


def model_class_name(model) -> str:
    """The model's class name; FSDP2's `fully_shard` swaps in a subclass named "FSDP<class>", reported as <class>."""
    name = type(model).__name__
    if name.startswith("FSDP") and any(base.__name__ == name[4:] for base in type(model).__mro__[1:]):
        return name[4:]
    return name


def _event_row(event) -> str:
    step = event.kind if event.step is None else event.step
    if event.kind == "rollback":
        note = "rollback"
    elif event.kind == "restored":
        note = ("restored from " + os.path.basename(str(event.restored_from or "checkpoint").rstrip("/\\"))
                + " (the sizes the run had reached, dims before, were discarded)")
    else:
        note = _energy_line(event) + (" (rolled back)" if event.rolled_back else "")
    cells = [escape_markdown(step), str(event.dims_before), str(event.dims_after), escape_markdown(note),
             _bound_line(event), escape_markdown(event.policy or "-")]  # dims are validated lists of ints
    return "| " + " | ".join(cells) + " |"


TRAINING_INFO_ATTRIBUTE = "compressm_training_info"  # optional dict on the model, rendered as the card's "Training"


def _markdown_cell(value) -> str:
    """A value as the text of one Markdown table cell (escaped, line breaks removed)."""
    return escape_markdown(f"{value:.6g}" if isinstance(value, float) else value)


def _training_section(training_info: dict) -> list[str]:
    """Card lines for `training_info`: {"data": {name: value}, "metrics": {name: value}, ...}, one table per entry
    whose value is a dict, plain key/value rows otherwise."""
    lines = ["", "## Training", ""]
    rows = [(key, value) for key, value in training_info.items() if not isinstance(value, dict)]
    if rows:
        lines += ["| | |", "| --- | --- |"] + [f"| {_markdown_cell(k)} | {_markdown_cell(v)} |" for k, v in rows]
    for title, table in training_info.items():
        if isinstance(table, dict) and table:
            lines += ["", f"### {_markdown_cell(title)}", "", "| | |", "| --- | --- |"]
            lines += [f"| {_markdown_cell(k)} | {_markdown_cell(v)} |" for k, v in table.items()]
    return lines


def render_model_card(model, training_info: dict | None = None) -> str:
    """Markdown model card: architecture, per-layer state sizes (initial and current), reduction history, and (when
    given, or set as `model.compressm_training_info`) a "Training" section with the data and metrics of the run."""
    if training_info is None:
        training_info = getattr(model, TRAINING_INFO_ATTRIBUTE, None)
    from .events import coerce_events

    config = model.config
    events = coerce_events(list(model.reduction_history), source="model.reduction_history")
    class_name = model_class_name(model)
    auto_class = _AUTO_CLASS_FOR.get(class_name, "AutoModel")
    dims = list(config.state_dims)
    initial = initial_state_dims(events, dims)
    reductions = [event for event in events if event.kind in ("reduction", "manual")]
    input_line = (
        f"tokens (vocab {config.vocab_size})" if config.input_dim is None else f"continuous, input_dim {config.input_dim}"
    )
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        CARD_MARKER,
        "- state-space-model",
        "- lru",
        "- balanced-truncation",
        "---",
        "",
        f"# {escape_markdown(class_name)} (CompreSSM)",
        "",
        _summary_sentence(events, reductions),
        "",
        "Load it with the modeling code stored next to the weights (no package needed), or with the `compressm` "
        "package installed (then `trust_remote_code` is not needed after `import modeling_compressm`):",
        "",
        "```python",
        f"from transformers import {auto_class}",
        f'model = {auto_class}.from_pretrained("<this repo or folder>", trust_remote_code=True)',
        "```",
        "",
        "## Architecture",
        "",
        f"- class: `{class_name}`; hidden size: {config.hidden_size}, layers: {config.num_hidden_layers}, "
        f"norm: {escape_markdown(config.norm_type)}",
        f"- input: {input_line}"
        + (f"; labels: {config.num_labels}" if class_name == "CompreSSMForSequenceClassification" else ""),
        f"- total state size: {sum(dims)} (initially {sum(initial)}); parameters: "
        f"{sum(parameter.numel() for parameter in model.parameters()):,}",
        "",
        "| layer | initial state dim | state dim |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {index} | {before} | {dim} |" for index, (before, dim) in enumerate(zip(initial, dims))]
    lines += ["", "## Reduction history", ""]
    if not events:
        lines.append("No reductions were recorded.")
    else:
        rollbacks = sum(event.kind == "rollback" for event in events)
        restores = sum(event.kind == "restored" for event in events)
        lines.append(f"{len(reductions)} reduction event(s)" + (f", {rollbacks} rollback(s)" if rollbacks else "")
                     + (f", {restores} restore(s) of a checkpoint" if restores else "") + ".")
        lines += [
            "",
            "H-infinity bound: 2 x (sum of the discarded Hankel singular values) over the layer's gain, an upper "
            "bound of the relative change of each layer's input-output map (kept HSV energy alone can look high while "
            "the map changes a lot).",
            "",
            "| step | dims before | dims after | kept HSV energy per layer | H-infinity bound (relative) | policy |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        lines += [_event_row(event) for event in events]
    if training_info:
        lines += _training_section(training_info)
    return "\n".join(lines) + "\n"


def initial_state_dims(events, dims: list[int]) -> list[int]:
    """The sizes the saved weights started from: before the first event of their lineage. A "restored" event (the
    weights of an earlier checkpoint, `load_best_model_at_end`) is not part of it: its "dims before" are the sizes
    the run had reached and discarded. Without another event, the restored checkpoint's sizes (it held no earlier
    reduction) or the current ones."""
    lineage = [event for event in events if event.kind != "restored"]
    if lineage:
        initial = list(lineage[0].dims_before)
    elif events:
        initial = list(events[0].dims_after)
    else:
        initial = list(dims)
    return initial if len(initial) == len(dims) else list(dims)


def _summary_sentence(events, reductions) -> str:
    text = ("A Linear Recurrent Unit (LRU) state-space model trained with in-training balanced truncation "
            "(CompreSSM, arXiv 2510.02823): ")
    if not reductions and any(event.kind == "restored" for event in events):
        return text + ("the weights saved here are those of a checkpoint from before any reduction (restored, e.g. "
                       "as the best checkpoint), so every layer keeps its initial state size; the sizes the run "
                       "reached afterwards were discarded.")
    return text + (f"per-layer state sizes were reduced {_when_reduced(events)} by truncating the states with the "
                   "smallest Hankel singular values.")


def _when_reduced(events: list) -> str:
    """"during training", "after training" (only manual, post-hoc events) or both."""
    manual = [
        "manual" in (event.kind, event.policy) or event.step is None
        for event in events if event.kind != "rollback"
    ]
    if manual and all(manual):
        return "after training (post hoc)"
    if any(manual):
        return "during training and afterwards (post hoc, the 'manual' rows)"
    return "during training"


def is_replaceable_card(card_path: str) -> bool:
    """True when card_path is missing, a card this module wrote, or transformers' auto-generated placeholder."""
    if not os.path.exists(card_path):
        return True
    with open(card_path, encoding="utf-8") as handle:
        text = handle.read()
    return CARD_MARKER in text or _TRANSFORMERS_DEFAULT_CARD_MARKER in text


def write_model_card(model, save_directory: str, overwrite: bool = False, draw_plot: bool | None = None) -> bool:
    """Write README.md and the HSV plot (`hsv_spectrum.png`) into save_directory.

    An existing README.md is replaced only when `overwrite`, when this module wrote it, or when it is transformers'
    auto-generated placeholder (what `push_to_hub` puts in when the Hub repo has no card); a user's own card is left
    alone. The spectrum and plot come from `card_spectrum(model)` (drawn once per reduction event; `save_pretrained`
    computes it from the state dict it saves first); `draw_plot` as for `card_spectrum` (None: unless deferred with
    `defer_card_plot`, when the card has no plot). No collective runs here, so it may run on one process of a
    distributed job. Returns True when README.md was written.
    """
    card_path = os.path.join(save_directory, "README.md")
    if not overwrite and not is_replaceable_card(card_path):
        return False
    card = render_model_card(model)
    hsv_per_layer, png = card_spectrum(model, draw_plot=draw_plot)
    if png is not None:
        with open(os.path.join(save_directory, HSV_PLOT_FILE), "wb") as handle:
            handle.write(png)
        card += f"\n## Hankel singular values\n\n![Hankel singular values per layer]({HSV_PLOT_FILE})\n"
        card += "\nSpectrum (largest / smallest value per layer, drawn once per reduction event): " + ", ".join(
            f"layer {index}: {values[0]:.3g} / {values[-1]:.3g}" for index, values in enumerate(hsv_per_layer) if values
        ) + "\n"
    with open(card_path, "w", encoding="utf-8") as handle:
        handle.write(card)
    return True
