"""Offline datasets for CompreSSM examples, tests and benchmarks (nothing is downloaded).

`load_digits_sequences` turns scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes) into 64-step
pixel sequences, row-major, one pixel per step (`input_dim=1`): a small offline stand-in for sequential MNIST;
`permutation_seed=` applies a fixed random pixel permutation (a permuted-sMNIST stand-in).

`synthetic_text_corpus` generates a deterministic toy corpus of byte-level token sequences for the language-model
presets (vocab 256) without any download.
"""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = [
    "DIGITS_NUM_CLASSES",
    "DIGITS_SEQUENCE_LENGTH",
    "load_digits_sequences",
    "DigitsSequenceDataset",
    "digits_collator",
    "synthetic_text_corpus",
    "TokenBlockDataset",
]

DIGITS_NUM_CLASSES = 10
DIGITS_SEQUENCE_LENGTH = 64


def load_digits_sequences(
    test_size: float = 0.2, seed: int = 0, normalize: bool = True, permutation_seed: int | None = None
) -> dict[str, dict[str, np.ndarray]]:
    """Load sklearn's 8x8 digits as pixel sequences with a fixed stratified train/test split.

    Args:
        test_size: fraction of the 1797 images held out for testing, in (0, 1).
        seed: seed of the (stratified) split; the same seed always gives the same split.
        normalize: scale pixels from [0, 16] to zero mean / unit variance using train-split statistics.
        permutation_seed: None (default) keeps the row-major pixel order; an int applies one fixed random permutation
            of the 64 time steps (`numpy.random.default_rng(permutation_seed).permutation(64)`) to every image, like
            permuted sequential MNIST. The split and the normalisation statistics do not depend on it.
    Returns:
        {"train": {"inputs": float32 (n_train, 64, 1), "labels": int64 (n_train,)},
         "test":  {"inputs": float32 (n_test, 64, 1),  "labels": int64 (n_test,)}}
    """
    if not isinstance(test_size, (int, float)) or not 0.0 < float(test_size) < 1.0:
        raise ValueError(f"test_size must lie strictly between 0 and 1, got {test_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if permutation_seed is not None and (isinstance(permutation_seed, bool) or not isinstance(permutation_seed, int)):
        raise ValueError(f"permutation_seed must be None or an int, got {permutation_seed!r}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32).reshape(len(digits.images), DIGITS_SEQUENCE_LENGTH, 1)
    labels = digits.target.astype(np.int64)
    if permutation_seed is not None:
        images = images[:, np.random.default_rng(permutation_seed).permutation(DIGITS_SEQUENCE_LENGTH)]
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=float(test_size), random_state=seed, stratify=labels
    )
    if normalize:
        mean, std = float(x_train.mean()), float(x_train.std())
        x_train = (x_train - mean) / std
        x_test = (x_test - mean) / std
    return {
        "train": {"inputs": np.ascontiguousarray(x_train, dtype=np.float32), "labels": y_train},
        "test": {"inputs": np.ascontiguousarray(x_test, dtype=np.float32), "labels": y_test},
    }


class DigitsSequenceDataset(torch.utils.data.Dataset):
    """Map-style dataset of `{"inputs_embeds": float32 (64, 1), "labels": int64 ()}` items (Trainer-ready).

    Args:
        split: "train" or "test".
        test_size, seed, normalize, permutation_seed: passed to `load_digits_sequences`.
    """

    def __init__(
        self, split: str = "train", test_size: float = 0.2, seed: int = 0, normalize: bool = True,
        permutation_seed: int | None = None,
    ):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        data = load_digits_sequences(
            test_size=test_size, seed=seed, normalize=normalize, permutation_seed=permutation_seed
        )[split]
        self.inputs = torch.from_numpy(data["inputs"])  # float32 (n, 64, 1)
        self.labels = torch.from_numpy(data["labels"])  # int64 (n,)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"inputs_embeds": self.inputs[index], "labels": self.labels[index]}

    @classmethod
    def splits(
        cls, test_size: float = 0.2, seed: int = 0, normalize: bool = True, permutation_seed: int | None = None
    ) -> tuple["DigitsSequenceDataset", "DigitsSequenceDataset"]:
        """(train, test) datasets from one split computation."""
        data = load_digits_sequences(
            test_size=test_size, seed=seed, normalize=normalize, permutation_seed=permutation_seed
        )
        out = []
        for split in ("train", "test"):
            dataset = cls.__new__(cls)
            dataset.inputs = torch.from_numpy(data[split]["inputs"])
            dataset.labels = torch.from_numpy(data[split]["labels"])
            out.append(dataset)
        return out[0], out[1]


def digits_collator(features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack items into {"inputs_embeds": float32 (batch, 64, 1), "labels": int64 (batch,)}."""
    if not features:
        raise ValueError("digits_collator got an empty batch")
    return {
        "inputs_embeds": torch.stack([feature["inputs_embeds"] for feature in features]),
        "labels": torch.stack([torch.as_tensor(feature["labels"]) for feature in features]).long(),
    }


_WORDS = (
    "the state space model keeps a small hidden state and updates it with every new token while the balanced "
    "truncation removes the directions that are hard to reach and hard to observe so the model becomes smaller "
    "during training without losing what it has learned a linear recurrent unit has complex eigenvalues inside the "
    "unit circle and the hankel singular values measure how much each state matters"
).split()


def synthetic_text_corpus(num_documents: int = 512, words_per_document: int = 48, seed: int = 0) -> list[str]:
    """Deterministic toy text: documents of words drawn from a fixed vocabulary by a seeded first-order Markov chain.

    Returns:
        `num_documents` strings (ASCII), identical for identical arguments.
    """
    for name, value in (("num_documents", num_documents), ("words_per_document", words_per_document)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    rng = random.Random(seed)
    successors: dict[str, list[str]] = {}
    for current, following in zip(_WORDS, _WORDS[1:] + _WORDS[:1]):
        successors.setdefault(current, []).append(following)
    documents = []
    for _ in range(num_documents):
        word = rng.choice(_WORDS)
        words = [word]
        for _ in range(words_per_document - 1):
            word = rng.choice(successors[word]) if rng.random() < 0.85 else rng.choice(_WORDS)
            words.append(word)
        documents.append(" ".join(words) + ".")
    return documents


class TokenBlockDataset(torch.utils.data.Dataset):
    """Byte-level causal-LM dataset: the concatenated UTF-8 bytes of `texts` cut into blocks.

    Items are `{"input_ids": int64 (block_size,), "labels": int64 (block_size,)}` (labels = input_ids; the model
    shifts them). Token ids are bytes, so the vocabulary size is 256.
    """

    def __init__(self, texts: list[str], block_size: int = 128):
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
            raise ValueError(f"block_size must be an int >= 2, got {block_size!r}")
        data = "\n".join(texts).encode("utf-8")
        blocks = len(data) // block_size
        if blocks < 1:
            raise ValueError(f"the texts hold {len(data)} bytes, fewer than one block of {block_size}")
        self.tokens = torch.tensor(list(data[: blocks * block_size]), dtype=torch.long).view(blocks, block_size)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}
