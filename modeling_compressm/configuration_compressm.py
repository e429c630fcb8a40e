"""Configuration for CompreSSM models: stacks of Linear Recurrent Unit (LRU) blocks with per-layer state sizes."""

from __future__ import annotations

from transformers import PretrainedConfig


class CompreSSMConfig(PretrainedConfig):
    r"""
    Configuration of a CompreSSM model: an embedding (token ids) or a linear encoder (continuous inputs),
    `num_hidden_layers` pre-norm residual blocks `x + GLU(GELU(LRU(norm(x))))`, a final norm and a task head.

    Every block holds one LRU with its own complex state size; `state_dims[i]` is the state size of block `i`.
    In-training balanced truncation (`CompreSSMCallback`, `model.reduce`) shrinks these sizes and rewrites the list,
    so a saved checkpoint reloads at its reduced sizes.

    Args:
        vocab_size (`int`, defaults to 256): token vocabulary size (ignored when `input_dim` is set).
        hidden_size (`int`, defaults to 64): model width H (the LRU input/output size).
        num_hidden_layers (`int`, defaults to 2): number of LRU blocks.
        state_dims (`int` or `list[int]`, defaults to 64): complex state size N per layer. An int is expanded to
            one entry per layer; a list must have `num_hidden_layers` entries, each >= 1.
        r_min, r_max (`float`, defaults to 0.9 / 0.999): the eigenvalue moduli |λ| are initialised uniformly
            (in area) on the ring r_min <= |λ| <= r_max; 0 < r_min < r_max < 1.
        max_phase (`float`, defaults to 6.28): eigenvalue phases are initialised uniformly in [0, max_phase].
        dropout (`float`, defaults to 0.0): dropout after the LRU non-linearity and after the GLU.
        norm_type (`str`, defaults to "rmsnorm"): "rmsnorm" or "layernorm" (both causal-safe).
        norm_eps (`float`, defaults to 1e-5): epsilon of the norms.
        input_dim (`int`, *optional*): if set, inputs are continuous features `(batch, length, input_dim)` passed
            as `inputs_embeds` and encoded by a Linear layer (e.g. pixel sequences, input_dim=1).
        pad_token_id, bos_token_id, eos_token_id (`int`, *optional*): special token ids; with token inputs each must
            lie in [0, vocab_size) (eos_token_id may be a list). Without an attention_mask, the sequence classifier
            treats pad_token_id tokens as padding.
        num_labels (`int`, defaults to 2): classes of `CompreSSMForSequenceClassification`.
        pooling (`str`, defaults to "mean"): how sequence classification pools over time, "mean" (masked mean,
            as in the paper) or "last" (last non-padded position).
        tie_word_embeddings (`bool`, defaults to True): tie the LM head to the token embedding.
    """

    model_type = "compressm"

    def __init__(
        self,
        vocab_size: int = 256,
        hidden_size: int = 64,
        num_hidden_layers: int = 2,
        state_dims: int | list[int] = 64,
        r_min: float = 0.9,
        r_max: float = 0.999,
        max_phase: float = 6.28,
        dropout: float = 0.0,
        norm_type: str = "rmsnorm",
        norm_eps: float = 1e-5,
        input_dim: int | None = None,
        pooling: str = "mean",
        initializer_range: float = 0.02,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        _require_int("vocab_size", vocab_size, minimum=1)
        _require_int("hidden_size", hidden_size, minimum=1)
        _require_int("num_hidden_layers", num_hidden_layers, minimum=1)
        if isinstance(state_dims, int) and not isinstance(state_dims, bool):
            state_dims = [state_dims] * num_hidden_layers
        if not isinstance(state_dims, (list, tuple)):
            raise ValueError(f"state_dims must be an int or a list of ints, got {type(state_dims).__name__}")
        state_dims = list(state_dims)
        if len(state_dims) != num_hidden_layers:
            raise ValueError(
                f"state_dims has {len(state_dims)} entries but num_hidden_layers is {num_hidden_layers}; "
                "give one state size per layer (or a single int)"
            )
        for index, dim in enumerate(state_dims):
            _require_int(f"state_dims[{index}]", dim, minimum=1)
        for name, value in (("r_min", r_min), ("r_max", r_max)):
            if not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
                raise ValueError(f"{name} must lie strictly between 0 and 1, got {value!r}")
        if r_min >= r_max:
            raise ValueError(f"r_min must be smaller than r_max, got r_min={r_min} and r_max={r_max}")
        if not isinstance(max_phase, (int, float)) or max_phase <= 0:
            raise ValueError(f"max_phase must be a positive number, got {max_phase!r}")
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
        if norm_type not in ("rmsnorm", "layernorm"):
            raise ValueError(f"norm_type must be 'rmsnorm' or 'layernorm', got {norm_type!r}")
        if not isinstance(norm_eps, (int, float)) or norm_eps <= 0:
            raise ValueError(f"norm_eps must be positive, got {norm_eps!r}")
        if input_dim is not None:
            _require_int("input_dim", input_dim, minimum=1)
        if pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
        if input_dim is None:
            for name, token_id in (("pad_token_id", pad_token_id), ("bos_token_id", bos_token_id),
                                   ("eos_token_id", eos_token_id)):
                _require_token_ids(name, token_id, vocab_size)

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.state_dims = [int(dim) for dim in state_dims]
        self.r_min = float(r_min)
        self.r_max = float(r_max)
        self.max_phase = float(max_phase)
        self.dropout = float(dropout)
        self.norm_type = norm_type
        self.norm_eps = float(norm_eps)
        self.input_dim = input_dim
        self.pooling = pooling
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        if getattr(self, "num_labels", 2) < 1:
            raise ValueError(f"num_labels must be >= 1, got {self.num_labels}")

    @property
    def layer_types(self) -> list[str]:
        """Every block keeps a recurrent state only, so generation caches use linear-attention cache layers."""
        return ["linear_attention"] * self.num_hidden_layers

    @property
    def total_state_dim(self) -> int:
        """Sum of the per-layer state sizes."""
        return sum(self.state_dims)


def _require_token_ids(name: str, value, vocab_size: int) -> None:
    """A special token id (or a list of them, as eos_token_id may be) must be None or lie in [0, vocab_size)."""
    for token_id in value if isinstance(value, (list, tuple)) else [value]:
        if token_id is None:
            continue
        if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < vocab_size:
            raise ValueError(
                f"{name} must be a token id in [0, {vocab_size - 1}] (vocab_size = {vocab_size}), got {value!r}"
            )


def _require_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
