"""Tokenizers for CompreSSM language models: a byte-level tokenizer that ships with the package, and loading any
`AutoTokenizer` with errors that say what to change.

The byte-level tokenizer is a standard `tokenizers`-backed fast tokenizer (`PreTrainedTokenizerFast`), not a custom
class: saved next to a model it is two files (`tokenizer.json`, `tokenizer_config.json`) with no `auto_map`, and
`PreTrainedTokenizerFast.from_pretrained(folder)` loads it offline without this package and without any question.
`AutoTokenizer.from_pretrained(folder)` of transformers 5 first reads the folder's `config.json`, whose model type is
CompreSSM's remote code: where this package is not imported it asks the `trust_remote_code` question for that config
(not for the tokenizer); `trust_remote_code=True` (as for the model and `pipeline`) runs only the configuration class.

    from modeling_compressm import byte_level_tokenizer
    tokenizer = byte_level_tokenizer()
    tokenizer("héllo")["input_ids"]     # [104, 195, 169, 108, 108, 111]: token id = UTF-8 byte value
    len(tokenizer)                      # 258: 256 bytes, "<|endoftext|>" (bos/eos, id 256), "<pad>" (id 257)
"""

from __future__ import annotations

import json
import os

__all__ = [
    "BYTES_TOKENIZER",
    "BYTE_EOS_TOKEN",
    "BYTE_PAD_TOKEN",
    "byte_level_tokenizer",
    "load_tokenizer",
    "set_pad_token",
    "save_tokenizer",
]

BYTES_TOKENIZER = "bytes"  # the name `--tokenizer` / `load_tokenizer` take for the byte-level tokenizer
BYTE_EOS_TOKEN = "<|endoftext|>"
BYTE_PAD_TOKEN = "<pad>"
_MODEL_MAX_LENGTH = 1_000_000_000  # recurrent model: no positional limit


def _byte_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character map of byte-level BPE (GPT-2): printable Latin-1 bytes map to
    themselves, the other 68 bytes to the characters U+0100..U+0143, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def byte_level_tokenizer():
    """A byte-level fast tokenizer: one token per UTF-8 byte, token id = byte value (0..255).

    Special tokens: "<|endoftext|>" (id 256; bos and eos, appended between documents when text is packed) and
    "<pad>" (id 257). `len(tokenizer) == 258`. Decoding invalid UTF-8 byte runs gives U+FFFD.

    Returns:
        transformers `PreTrainedTokenizerFast` (backed by a `tokenizers.Tokenizer` with a BPE model without merges
        over the 256 byte symbols and the ByteLevel pre-tokenizer/decoder).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: byte for byte, symbol in _byte_to_unicode().items()}
    vocab[BYTE_EOS_TOKEN] = 256
    vocab[BYTE_PAD_TOKEN] = 257
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BYTE_EOS_TOKEN,
        eos_token=BYTE_EOS_TOKEN,
        pad_token=BYTE_PAD_TOKEN,
        model_max_length=_MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(name_or_path: str, *, pad_token: str | None = None, trust_remote_code: bool = False):
    """`byte_level_tokenizer()` for "bytes", otherwise `AutoTokenizer.from_pretrained(name_or_path)` (a local folder,
    or a Hub id online or from the local Hugging Face cache).

    Args:
        name_or_path: "bytes", a folder written by `save_pretrained`, or a Hub id.
        pad_token: set the padding token (see `set_pad_token`); None keeps the tokenizer's own.
        trust_remote_code: passed to `AutoTokenizer`.
    Raises:
        ValueError with a one-line message when the tokenizer cannot be found or loaded (e.g. a Hub id that is not
        cached while offline).
    """
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"tokenizer must be 'bytes', a folder or a Hub id, got {name_or_path!r}")
    if name_or_path == BYTES_TOKENIZER:
        tokenizer = byte_level_tokenizer()
    else:
        from transformers import AutoTokenizer

        looks_local = os.path.isabs(name_or_path) or name_or_path.startswith(".") or name_or_path.count("/") > 1
        if looks_local and not os.path.isdir(name_or_path):
            raise ValueError(f"tokenizer folder {name_or_path!r} does not exist; give a folder, a Hub id or 'bytes'")
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError) as error:
            if os.path.isdir(name_or_path):
                raise ValueError(
                    f"could not load a tokenizer from folder {name_or_path!r} ({first_line(error)}); it needs the "
                    "files tokenizer.save_pretrained writes (e.g. tokenizer.json + tokenizer_config.json)"
                ) from None
            raise ValueError(
                f"tokenizer {name_or_path!r} is not a local folder and could not be loaded from the Hugging Face Hub "
                f"or its local cache ({_offline_hint()}{first_line(error)}); give a local tokenizer folder or "
                "'bytes', or download it once while online"
            ) from None
    if pad_token is not None:
        set_pad_token(tokenizer, pad_token)
    return tokenizer


def set_pad_token(tokenizer, pad_token: str) -> bool:
    """Make `pad_token` the tokenizer's padding token; a token not yet in the vocabulary is added as a special token.

    Returns:
        True when the vocabulary grew (the model's embedding must follow `len(tokenizer)`).
    """
    if not isinstance(pad_token, str) or not pad_token:
        raise ValueError(f"pad token must be a non-empty string, got {pad_token!r}")
    before = len(tokenizer)
    if pad_token in tokenizer.get_vocab():
        tokenizer.pad_token = pad_token
    else:
        tokenizer.add_special_tokens({"pad_token": pad_token})
    return len(tokenizer) != before


def save_tokenizer(tokenizer, directory: str) -> list[str]:
    """`tokenizer.save_pretrained(directory)`, written so that both transformers 4.x and 5.x load it.

    transformers 5 records a fast tokenizer's class as "TokenizersBackend", a name transformers 4 does not know; the
    equivalent "PreTrainedTokenizerFast" loads in both. Returns the names of the files written.
    """
    written = [os.path.basename(path) for path in tokenizer.save_pretrained(directory)]
    config_path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
        if config.get("tokenizer_class") == "TokenizersBackend":
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
            with open(config_path, "w", encoding="utf-8") as handle:
                json.dump(config, handle, indent=2, ensure_ascii=False)
                handle.write("\n")
    return sorted(set(written))


def first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


def _offline_hint() -> str:
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return "offline mode is on (HF_HUB_OFFLINE=1): "
    except ImportError:  # pragma: no cover
        pass
    return ""
