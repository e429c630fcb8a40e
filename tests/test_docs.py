"""Every ```python block of README.md and docs/*.md runs as written: offline, in a fresh folder, the blocks of one
file in order and sharing one namespace (like a notebook). Uploads go to an offline fake Hub.

Authors of docs: a python block must run in seconds (tiny sizes, a few steps) without network; shell commands go
in ```bash blocks, which are not run."""

import os
import re
import traceback
from pathlib import Path

import pytest

from fake_hub import install_fake_hub

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """(first line number, code) of each ```python block of a Markdown file."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, match.start(2)) + 1, match.group(2))
            for match in FENCE.finditer(text) if match.group(1) in ("python", "py")]


def test_blocks_are_found():
    blocks = python_blocks(ROOT / "README.md")
    assert len(blocks) >= 3 and all(code.strip() for _, code in blocks)
    first_line, first_code = blocks[0]
    assert (ROOT / "README.md").read_text().splitlines()[first_line - 1] == first_code.splitlines()[0]


@pytest.mark.parametrize("path", DOC_FILES, ids=[str(path.relative_to(ROOT)) for path in DOC_FILES])
def test_python_blocks_run(path, tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    blocks = python_blocks(path)
    if not blocks:
        pytest.skip(f"{path.name} has no python blocks")
    monkeypatch.chdir(tmp_path)
    hub = install_fake_hub(monkeypatch)
    # downloads fail at once instead of waiting for the network; push_to_hub uploads reach the fake Hub above
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    namespace = {"__name__": "__docs__"}
    for line, code in blocks:
        try:
            exec(compile(code, f"{path.relative_to(ROOT)}:{line}", "exec"), namespace)
        except Exception:  # noqa: BLE001 - report which block failed and why
            pytest.fail(f"the python block at {path.relative_to(ROOT)}:{line} failed:\n{traceback.format_exc()}")
    assert os.getcwd() == str(tmp_path)
    if any("push_to_hub" in code for _, code in blocks):
        assert hub.commits, "a block calls push_to_hub but nothing reached the (fake) Hub"
