"""Configuration of CompreSSM Mamba-2 models: transformers' `Mamba2Config` with a state size per layer."""

from __future__ import annotations

from transformers import Mamba2Config


def per_layer_sizes(value, name: str, num_layers: int, config_name: str = "CompreSSMMamba2Config") -> list[int]:
    """An int → one entry per layer; a list must have `num_layers` positive ints (else a ValueError naming
    `config_name.name`)."""
    values = [value] * num_layers if isinstance(value, int) else list(value)
    if len(values) != num_layers or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
        raise ValueError(
            f"{config_name}.{name} must be a positive int or a list of {num_layers} positive ints "
            f"(one per layer), got {value!r}"
        )
    return values


class CompreSSMMamba2Config(Mamba2Config):
    r"""
    A `Mamba2Config` whose layers may run different state sizes.

    Args (besides those of `Mamba2Config`):
        state_dims (`int` or `list[int]`, defaults to `state_size` for every layer): r per layer, the size of the
            selective scan's state and of the recurrent cache state (batch, heads, head_dim, r).
        channel_dims (`int` or `list[int]`, defaults to `state_dims`): N per layer, the B and C channels that
            in_proj and conv1d produce per group. Where N > r the layer projects B̃ = W B and C̃ = Vᵀ C after the
            conv and SiLU (balanced reduction); where N == r it is a stock Mamba-2 layer of state size r.
    """

    model_type = "compressm_mamba2"

    state_dims: list[int] | int | None = None
    channel_dims: list[int] | int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._normalise_state_dims()

    def _normalise_state_dims(self) -> None:
        layers = self.num_hidden_layers
        state_dims = self.state_size if self.state_dims is None else self.state_dims
        self.state_dims = per_layer_sizes(state_dims, "state_dims", layers)
        channel_dims = self.state_dims if self.channel_dims is None else self.channel_dims
        self.channel_dims = per_layer_sizes(channel_dims, "channel_dims", layers)
        for layer, (r, n) in enumerate(zip(self.state_dims, self.channel_dims)):
            if r > n:
                raise ValueError(
                    f"CompreSSMMamba2Config: layer {layer} has state_dims {r} > channel_dims {n}; the scan cannot run "
                    "more states than in_proj/conv1d produce channels"
                )


__all__ = ["CompreSSMMamba2Config"]
