"""Checks shared by the Mamba-2 and Mamba-1 model tests: stepwise cached decoding, a save / load / generate round trip
with per-layer state sizes, and generation after loading a checkpoint with `trust_remote_code` in a process where this
package cannot be imported."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from without_package import BLOCK_PACKAGE

REPO_ROOT = Path(__file__).resolve().parents[1]

REMOTE_GENERATE = BLOCK_PACKAGE + textwrap.dedent(
    """
    import json, os, sys, torch
    from transformers import AutoModelForCausalLM
    root = sys.argv[2]
    expected = torch.load(os.path.join(root, "expected.pt"))
    model = AutoModelForCausalLM.from_pretrained(os.path.join(root, "ckpt"), trust_remote_code=True).eval()
    generated = model.generate(expected["tokens"], max_new_tokens=5, do_sample=False)
    print(json.dumps({"same": bool(torch.equal(generated, expected["generated"])),
                      "state_dims": model.config.state_dims, "class": type(model).__name__,
                      "package_loaded": any(n.startswith("modeling_compressm") for n in sys.modules)}))
    """
)


@torch.no_grad()
def stepwise_cached_logits(model, tokens: torch.Tensor, prefix: int):
    """(logits of `tokens` computed as a prefill of `prefix` tokens then one cached step per token, the cache)."""
    output = model(tokens[:, :prefix], use_cache=True)
    steps, cache = [output.logits], output.cache
    for position in range(prefix, tokens.shape[1]):
        output = model(tokens[:, position : position + 1], cache=cache, use_cache=True)
        steps.append(output.logits)
    return torch.cat(steps, dim=1), cache


def remote_generation_report(tmp_path: Path, tokens: torch.Tensor, generated: torch.Tensor) -> dict:
    """Load `tmp_path / "ckpt"` with trust_remote_code in a fresh process that blocks this package, generate 5 tokens
    greedily from `tokens`; returns {"same": equal to `generated`, "state_dims", "class", "package_loaded"}."""
    torch.save({"tokens": tokens, "generated": generated}, tmp_path / "expected.pt")
    script = tmp_path / "remote.py"
    script.write_text(REMOTE_GENERATE)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(script), str(REPO_ROOT), str(tmp_path)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def check_save_load_and_generate(model, tmp_path: Path, tokens: torch.Tensor, model_files: set, model_type: str,
                                 state_dims: list) -> None:
    """`model` (a reduced CompreSSM Mamba-2 / Mamba LM) saved to `tmp_path / "ckpt"` holds `model_files` and a config
    with `state_dims` and `model_type`; AutoModelForCausalLM loads it as the same class with equal logits on `tokens`
    and equal greedy generation, here and with trust_remote_code in a process without this package."""
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path / "ckpt")
    assert model_files <= set(os.listdir(tmp_path / "ckpt"))
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["state_dims"] == state_dims and config["model_type"] == model_type
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert type(loaded) is type(model)
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    generated = model.generate(tokens, max_new_tokens=5, do_sample=False)
    assert torch.equal(loaded.generate(tokens, max_new_tokens=5, do_sample=False), generated)
    report = remote_generation_report(tmp_path, tokens, generated)
    assert report == {"same": True, "state_dims": state_dims, "class": type(model).__name__, "package_loaded": False}
