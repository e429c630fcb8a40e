"""Repository contracts: CI runs the README's test command; the package does not shadow Hugging Face's `kernels`."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_setup_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    after_title = text.split("\n", 1)[1].lstrip()
    block = re.match(r"```bash\n(.*?)```", after_title, re.S)
    assert block, "README must open (right after its title) with a bash block holding the two set-up commands"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_exactly_two_setup_commands():
    commands = readme_setup_commands()
    assert len(commands) == 2
    assert "compressm train" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    test_command = readme_setup_commands()[1]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_no_top_level_kernels_package_is_installed():
    setup = (ROOT / "setup.py").read_text()
    packages = re.search(r"packages=\[(.*?)\]", setup, re.S).group(1)
    assert '"kernels"' not in packages and "'kernels'" not in packages
    assert '"compressm_kernels": "kernels"' in setup


def test_checkout_kernels_folder_is_inert_under_the_name_kernels():
    """From a checkout (repository root on sys.path, as under `python -m pytest`), transformers' probe for the
    hub-kernels library imports the folder `kernels/` by that name. It must stay empty: a second copy of the kernel
    modules would re-register the `compressm_kernels::*` ops, and settings put in force through
    `compressm_kernels.kernel_settings` would then no longer reach them."""
    code = (
        "import sys\n"
        "import compressm_kernels\n"
        "from transformers.utils import is_kernels_available\n"
        "assert not is_kernels_available()\n"
        "probed = sys.modules.get('kernels')\n"
        "assert probed is not None and probed.__file__.startswith(sys.argv[1]), probed\n"
        "assert not hasattr(probed, 'diagonal_scan'), 'the folder was loaded a second time as kernels'\n"
        "assert not [m for m in sys.modules if m.startswith('kernels.')], 'kernel modules loaded twice'\n"
        "if compressm_kernels.TRITON_AVAILABLE:  # the registered op must still run this copy's launch code\n"
        "    import torch\n"
        "    calls = []\n"
        "    def counting(kernel, grid, kwargs):\n"
        "        calls.append(grid)\n"
        "        kernel[grid](**kwargs)\n"
        "    x = torch.randn(1, 5, 3)\n"
        "    with compressm_kernels.kernel_settings(launcher=counting):\n"
        "        compressm_kernels.diagonal_scan(x, x, torch.rand(3) / 2, torch.rand(3) / 2)\n"
        "    assert calls, 'the compressm_kernels ops run another copy of the kernel modules'\n"
        "print('OK')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(ROOT)], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, TRITON_INTERPRET="1"),
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr[-3000:]


LONG_FILE_LINES = 520  # "about 500 lines" (issue 13): files up to this length need no reason
SOURCE_FOLDERS = ("modeling_compressm", "kernels", "tests")  # the package, its kernels and the test suite


def _opening_comment(text: str) -> str:
    """The module docstring, or the leading `#` comment lines, of a Python file."""
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#!"))
    docstring = re.match(r'\s*(?:[rRuU]?("""|\'\'\'))(.*?)\1', body, re.S)
    if docstring:
        return docstring.group(2)
    return "\n".join(line for line in body.lstrip().splitlines() if line.startswith("#"))


def test_files_over_about_500_lines_say_why_in_their_opening_comment():
    files = sorted(path for folder in SOURCE_FOLDERS for path in (ROOT / folder).rglob("*.py"))
    assert len(files) > 20  # the folders were found
    unexplained = [
        f"{path.relative_to(ROOT)} ({len(text.splitlines())} lines)"
        for path in files
        if len((text := path.read_text(encoding="utf-8")).splitlines()) > LONG_FILE_LINES
        and "500 lines" not in _opening_comment(text)
    ]
    assert not unexplained, f"files over about 500 lines without a reason in their opening comment: {unexplained}"


def test_readme_layout_table_has_a_row_for_every_top_level_folder():
    listing = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listing.returncode != 0:
        pytest.skip("not a git checkout")
    tracked = listing.stdout
    folders = {path.split("/", 1)[0] for path in tracked.splitlines() if "/" in path and not path.startswith(".")}
    assert {"modeling_compressm", "kernels", "tests"} <= folders
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme.split("## Repository layout", 1)[1].split("\n## ", 1)[0]
    rows = {re.match(r"\| `([^`/]+)", line).group(1) for line in layout.splitlines() if re.match(r"\| `[^`/]+", line)}
    assert folders <= rows, f"folders missing from README's layout table: {sorted(folders - rows)}"
