"""Model card (README.md) and Hankel-singular-value plot written next to a saved CompreSSM checkpoint.

Copied with the modeling file for `trust_remote_code` checkpoints, so it imports nothing beyond the standard library
at module level; matplotlib is optional (without it the card has no plot).
"""

from __future__ import annotations

import os

HSV_PLOT_FILE = "hsv_spectrum.png"


def _energy_line(event: dict) -> str:
    kept = event.get("kept_energy")
    if not kept:
        return ""
    return ", ".join(f"{value:.4f}" if value is not None else "-" for value in kept)


def write_hsv_plot(hsv_per_layer: list[list[float]], path: str) -> bool:
    """Plot each layer's Hankel singular values (log scale, descending) to `path` (PNG). False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for index, values in enumerate(hsv_per_layer):
        if values:
            axis.semilogy(range(1, len(values) + 1), values, marker=".", label=f"layer {index} (N={len(values)})")
    axis.set_xlabel("state index (sorted)")
    axis.set_ylabel("Hankel singular value")
    axis.set_title("Hankel singular values per layer")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def render_model_card(model) -> str:
    """Markdown model card: architecture, per-layer state sizes, reduction history."""
    config = model.config
    events = model.reduction_history
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- compressm",
        "- state-space-model",
        "- lru",
        "- balanced-truncation",
        "---",
        "",
        f"# {type(model).__name__} (CompreSSM)",
        "",
        "A Linear Recurrent Unit (LRU) state-space model trained with in-training balanced truncation "
        "(CompreSSM, arXiv 2510.02823): per-layer state sizes were reduced during training by truncating "
        "the states with the smallest Hankel singular values.",
        "",
        "```python",
        "from transformers import AutoModel",
        'model = AutoModel.from_pretrained("<this repo or folder>", trust_remote_code=True)',
        "```",
        "",
        "## Architecture",
        "",
        f"- hidden size: {config.hidden_size}, layers: {config.num_hidden_layers}, norm: {config.norm_type}",
        f"- input: {'tokens (vocab ' + str(config.vocab_size) + ')' if config.input_dim is None else 'continuous, input_dim ' + str(config.input_dim)}",
        f"- total state size: {sum(config.state_dims)}",
        "",
        "| layer | state dim |",
        "| --- | --- |",
    ]
    lines += [f"| {index} | {dim} |" for index, dim in enumerate(config.state_dims)]
    lines += ["", "## Reduction history", ""]
    if not events:
        lines.append("No reductions were applied.")
    else:
        lines += ["| step | dims before | dims after | kept HSV energy per layer | policy |", "| --- | --- | --- | --- | --- |"]
        for event in events:
            lines.append(
                f"| {event.get('step', '-')} | {event.get('dims_before', '-')} | {event.get('dims_after', '-')} "
                f"| {_energy_line(event)} | {event.get('policy', '-')} |"
            )
    return "\n".join(lines) + "\n"


def write_model_card(model, save_directory: str) -> None:
    """Write README.md (unless one exists that this module did not write) and the HSV plot into save_directory."""
    card_path = os.path.join(save_directory, "README.md")
    if os.path.exists(card_path):
        with open(card_path, encoding="utf-8") as handle:
            if "- compressm" not in handle.read():
                return  # a card written by the user: leave it alone
    card = render_model_card(model)
    try:
        hsv_per_layer = [values.tolist() for values in model.hankel_singular_values()]
    except ValueError:  # a layer with NaN or unstable eigenvalues: no spectrum to show
        hsv_per_layer = None
    if hsv_per_layer is not None and write_hsv_plot(hsv_per_layer, os.path.join(save_directory, HSV_PLOT_FILE)):
        card += f"\n## Hankel singular values\n\n![Hankel singular values per layer]({HSV_PLOT_FILE})\n"
    with open(card_path, "w", encoding="utf-8") as handle:
        handle.write(card)
