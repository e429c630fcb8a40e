"""Repository contracts: CI runs the README's test command; the package does not shadow Hugging Face's `kernels`."""

import re
from pathlib import Path

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
