"""Configuration for CompreSSM models: stacks of Linear Recurrent Unit (LRU) blocks with per-layer state sizes."""

from __future__ import annotations

import math
import os
import re

from transformers import PretrainedConfig

# Largest r_max: the LRU parameters are float32, which rounds |λ|^2 = r_max^2 to exactly 1 (a layer whose state never
# decays, with gain sqrt(1 - |λ|^2) = 0) once r_max is within about 1.5e-8 of 1.
R_MAX_LIMIT = 1.0 - 1e-7
# Smallest norm_eps: smaller values vanish when added to float32 activations, and the norm of an all-zero input (the
# padding embedding) divides 0 by 0.
NORM_EPS_MIN = 1e-30

# field -> (allowed range as shown in errors, test of a finite value, what the range means)
FLOAT_RANGES = {
    "r_min": ("(0, 1)", lambda value: 0.0 < value < 1.0, "an eigenvalue modulus, below r_max"),
    "r_max": (f"(0, {R_MAX_LIMIT!r}]", lambda value: 0.0 < value <= R_MAX_LIMIT,
              "an eigenvalue modulus below 1 that float32 can tell apart from 1"),
    "max_phase": ("(0, 2*pi]", lambda value: 0.0 < value <= 2 * math.pi + 1e-4,  # 2*pi written as 6.2832 passes
                  "the largest initial eigenvalue phase, an angle"),
    "dropout": ("[0, 1)", lambda value: 0.0 <= value < 1.0, "a probability"),
    "norm_eps": (f"[{NORM_EPS_MIN:g}, 1]", lambda value: NORM_EPS_MIN <= value <= 1.0,
                 "a small positive number that float32 does not round away; larger ones swamp the activations"),
    "initializer_range": ("[0, 1]", lambda value: 0.0 <= value <= 1.0, "the standard deviation of initial weights"),
}

# Every field check_values checks (its error messages start with the field's name).
CHECKED_FIELDS = {"vocab_size", "hidden_size", "num_hidden_layers", "state_dims", *FLOAT_RANGES, "norm_type",
                  "input_dim", "pooling", "pad_token_id", "bos_token_id", "eos_token_id", "num_labels"}


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
            (in area) on the ring r_min <= |λ| <= r_max; 0 < r_min < r_max <= 1 - 1e-7 (float32, in which the
            weights are kept, rounds moduli closer to 1 to exactly 1).
        max_phase (`float`, defaults to 6.28): eigenvalue phases are initialised uniformly in [0, max_phase];
            0 < max_phase <= 2*pi.
        dropout (`float`, defaults to 0.0): dropout after the LRU non-linearity and after the GLU; in [0, 1).
        norm_type (`str`, defaults to "rmsnorm"): "rmsnorm" or "layernorm" (both causal-safe).
        norm_eps (`float`, defaults to 1e-5): epsilon of the norms; in [1e-30, 1].
        initializer_range (`float`, defaults to 0.02): standard deviation of the initial embedding and linear
            weights; in [0, 1].
        input_dim (`int`, *optional*): if set, inputs are continuous features `(batch, length, input_dim)` passed
            as `inputs_embeds` and encoded by a Linear layer (e.g. pixel sequences, input_dim=1).
        pad_token_id, bos_token_id, eos_token_id (`int`, *optional*): special token ids; with token inputs each must
            lie in [0, vocab_size) (eos_token_id may be a list). Without an attention_mask, the sequence classifier
            treats pad_token_id tokens as padding.
        num_labels (`int`, defaults to 2): classes of `CompreSSMForSequenceClassification`.
        pooling (`str`, defaults to "mean"): how sequence classification pools over time, "mean" (masked mean,
            as in the paper) or "last" (last non-padded position).
        tie_word_embeddings (`bool`, defaults to True): tie the LM head to the token embedding.

    Every float must be a finite number in its range (NaN and infinities are refused): a ValueError names the field.
    `check_values` runs again when a model is built, for values changed after the config was made.
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
        if isinstance(state_dims, int) and not isinstance(state_dims, bool) and isinstance(num_hidden_layers, int):
            state_dims = [state_dims] * num_hidden_layers
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.state_dims = state_dims
        self.r_min = r_min
        self.r_max = r_max
        self.max_phase = max_phase
        self.dropout = dropout
        self.norm_type = norm_type
        self.norm_eps = norm_eps
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
        self.check_values()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PretrainedConfig.from_pretrained`; a value `check_values` refuses that came from the config file (not from
        a keyword argument) is reported with the file's path and what to do."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except ValueError as error:
            field = re.match(r"\w+", str(error))
            if field is None or field.group(0) not in CHECKED_FIELDS or field.group(0) in kwargs:
                raise
            folder = os.path.join(str(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
            source = os.path.join(folder, "config.json") if os.path.isdir(folder) else f"{pretrained_model_name_or_path}"
            raise ValueError(f"{source}: {error}. Correct {field.group(0)} in that file") from None

    def check_values(self) -> None:
        """Raise ValueError naming the first field whose value is invalid (wrong type, out of range, NaN or
        infinite), and store floats as floats and `state_dims` as a list of ints.

        Runs when the config is created and again when a model is built from it, so values set afterwards
        (`config.norm_eps = ...`, or `from_pretrained(path, norm_eps=...)` on releases that set such keyword arguments
        as attributes) are checked before any weight is created or used.
        """
        _require_int("vocab_size", self.vocab_size, minimum=1)
        _require_int("hidden_size", self.hidden_size, minimum=1)
        _require_int("num_hidden_layers", self.num_hidden_layers, minimum=1)
        state_dims = self.state_dims
        if not isinstance(state_dims, (list, tuple)):
            raise ValueError(f"state_dims must be an int or a list of ints, got {type(state_dims).__name__}")
        if len(state_dims) != self.num_hidden_layers:
            raise ValueError(
                f"state_dims has {len(state_dims)} entries but num_hidden_layers is {self.num_hidden_layers}; "
                "give one state size per layer (or a single int)"
            )
        for index, dim in enumerate(state_dims):
            _require_int(f"state_dims[{index}]", dim, minimum=1)
        self.state_dims = [int(dim) for dim in state_dims]
        for name in FLOAT_RANGES:
            setattr(self, name, _require_float(name, getattr(self, name)))
        if self.r_min >= self.r_max:
            raise ValueError(f"r_min must be smaller than r_max, got r_min={self.r_min} and r_max={self.r_max}")
        if self.norm_type not in ("rmsnorm", "layernorm"):
            raise ValueError(f"norm_type must be 'rmsnorm' or 'layernorm', got {self.norm_type!r}")
        if self.input_dim is not None:
            _require_int("input_dim", self.input_dim, minimum=1)
        if self.pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', got {self.pooling!r}")
        if self.input_dim is None:
            for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
                _require_token_ids(name, getattr(self, name, None), self.vocab_size)
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


def _require_float(name: str, value) -> float:
    """`value` as a float if it is a finite number inside the range FLOAT_RANGES gives for `name`; else ValueError
    naming the field, the range and what it means."""
    shown, inside, meaning = FLOAT_RANGES[name]
    try:
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    except OverflowError:  # an int beyond the float range
        number = None
    if number is None or not math.isfinite(number) or not inside(number):
        raise ValueError(f"{name} must be a finite number in {shown} ({meaning}), got {value!r}")
    return number


def _require_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
