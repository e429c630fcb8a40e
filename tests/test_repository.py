"""Repository contracts: CI runs the README's test command; the checkout does not shadow Hugging Face's `kernels`."""

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


def test_no_top_level_kernels_package_is_installed_or_importable_from_the_checkout():
    """A top-level package named `kernels` is Hugging Face's hub-kernels library, which transformers imports. The
    kernels live in `kernels/compressm_kernels/`; `kernels/` has no `__init__.py`, so with the repository root on
    sys.path it is at most a namespace portion, and an installed `kernels` package wins over it."""
    setup = (ROOT / "setup.py").read_text()
    packages = re.search(r"packages=\[(.*?)\]", setup, re.S).group(1)
    assert '"kernels"' not in packages and "'kernels'" not in packages
    assert '"compressm_kernels": "kernels/compressm_kernels"' in setup
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "kernels" / "compressm_kernels" / "__init__.py").exists()


def _run_in_repository_root(args, timeout=600):
    """Run `python ARGS` with the repository root as the working directory and nothing that hides it from sys.path
    (no PYTHONSAFEPATH, no PYTHONPATH), as a user typing the command in a fresh clone would."""
    env = {name: value for name, value in os.environ.items() if name not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


GENERATE_IN_THE_ROOT = """
import importlib.util, sys
import torch, transformers, modeling_compressm
from modeling_compressm import CompreSSMConfig, CompreSSMForCausalLM
spec = importlib.util.find_spec("kernels")
root_kernels = sys.argv[1]
if spec is not None and spec.origin is not None:  # an installed hub-kernels library must be the one found
    assert not spec.origin.startswith(root_kernels), ("the checkout's kernels/ folder shadows hub-kernels", spec.origin)
torch.manual_seed(0)
config = CompreSSMConfig(vocab_size=11, hidden_size=8, num_hidden_layers=2, state_dims=[4, 3], pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
model = CompreSSMForCausalLM(config).eval()
prompt = torch.tensor([[1, 5, 6, 7]])
out = model.generate(prompt, max_new_tokens=5, do_sample=False, eos_token_id=None)
assert out.shape == (1, 9), out.shape
assert torch.equal(out[:, :4], prompt)
print("GENERATED", transformers.__version__, out.tolist())
"""


def test_python_started_in_the_repository_root_generates():
    """`python -c`, a REPL or a notebook started in the checkout put its root first on sys.path. transformers (5.25
    and newer) imports Hugging Face's `kernels` package when generating; the checkout must not shadow it."""
    result = _run_in_repository_root(["-c", GENERATE_IN_THE_ROOT, str(ROOT / "kernels")])
    assert result.returncode == 0 and "GENERATED" in result.stdout, result.stdout + result.stderr[-3000:]


def test_pytest_started_in_the_repository_root_runs_a_generation_test():
    """README's test command is `python -m pytest` in the root, which puts the root on sys.path."""
    result = _run_in_repository_root(
        ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_modeling_generation.py",
         "-k", "test_the_model_under_test_generates_varied_continuations"])
    assert result.returncode == 0 and re.search(r"\b1 passed\b", result.stdout), \
        result.stdout[-3000:] + result.stderr[-3000:]


def test_compressm_kernels_is_loaded_once_from_the_checkout():
    """From a checkout, the `compressm_kernels::*` torch ops must be registered by one copy of the kernel modules, so
    that settings put in force through `compressm_kernels.kernel_settings` reach the code the ops run."""
    code = (
        "import sys\n"
        "import compressm_kernels\n"
        "import transformers.utils\n"
        "transformers.utils.is_kernels_available()\n"
        "copies = [m for m in sys.modules if m.endswith('.diagonal_scan') or m.endswith('.ops') and 'kernels' in m]\n"
        "assert [m for m in copies if 'compressm_kernels' in m] == ['compressm_kernels.ops'], copies\n"
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
    result = _run_in_repository_root(["-c", code], timeout=300)
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


def _assignments_to(attribute_chain: tuple[str, ...]) -> list[tuple[str, str | None]]:
    """Sites in the training library and the application that assign `<x>.<chain>` (or an item of it), as
    ("file:line", name of the enclosing function or None)."""
    import ast

    def assigns(target) -> bool:
        while isinstance(target, ast.Subscript):
            target = target.value
        for name in reversed(attribute_chain):
            if not (isinstance(target, ast.Attribute) and target.attr == name):
                return False
            target = target.value
        return True

    package = ROOT / "modeling_compressm"
    files = sorted(path for folder in ("training", "app") for path in (package / folder).glob("*.py"))
    assert len(files) > 10  # the folders were found
    sites = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        enclosing = {}  # node -> innermost function (ast.walk meets outer functions first)
        for function in ast.walk(tree):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(function):
                    if node is not function:
                        enclosing[node] = function.name
        for node in ast.walk(tree):
            targets = getattr(node, "targets", None) or [getattr(node, "target", None)]
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and any(map(assigns, targets)):
                sites.append((f"{path.relative_to(ROOT)}:{node.lineno}", enclosing.get(node)))
    return sites


def test_only_the_models_write_config_state_dims():
    """The training library and the application change sizes through the model (`set_state_dims`, `reduce`,
    `sync_state_dims`), never by writing `config.state_dims` themselves, so sizes and config cannot disagree."""
    writes = _assignments_to(("config", "state_dims"))
    assert not writes, f"config.state_dims written outside the model classes: {writes}"


def test_the_training_library_replaces_a_models_history_in_one_place():
    """Outside a reduction event, sizes and history are given to a model together by `restore_sizes_and_history`
    (resume, reducer state, best-model loading), so no path can change one without the other."""
    writes = [site for site, function in _assignments_to(("reduction_history",))
              if function != "restore_sizes_and_history"]
    assert not writes, f"model.reduction_history replaced outside restore_sizes_and_history: {writes}"
