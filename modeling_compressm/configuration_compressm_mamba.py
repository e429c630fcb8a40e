"""Configuration of CompreSSM Mamba (Mamba-1) models: transformers' `MambaConfig` with a state size per layer."""

from __future__ import annotations

from transformers import MambaConfig

from .configuration_compressm_mamba2 import per_layer_sizes


class CompreSSMMambaConfig(MambaConfig):
    r"""
    A `MambaConfig` whose layers may run different state sizes.

    Args (besides those of `MambaConfig`):
        state_dims (`int` or `list[int]`, defaults to `state_size` for every layer): r per layer. Layer i is a stock
            `MambaMixer` of state size r_i: `A_log` (intermediate, r_i), B and C rows of `x_proj` r_i each, recurrent
            cache state (batch, intermediate, r_i).
    """

    model_type = "compressm_mamba"

    state_dims: list[int] | int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        state_dims = self.state_size if self.state_dims is None else self.state_dims
        self.state_dims = per_layer_sizes(state_dims, "state_dims", self.num_hidden_layers, type(self).__name__)


__all__ = ["CompreSSMMambaConfig"]
