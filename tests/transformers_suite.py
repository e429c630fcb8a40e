"""Import transformers' own model test mixins (ModelTesterMixin, ConfigTester, PipelineTesterMixin) for our models.

transformers ships its test modules in the source distribution only, not in the wheel. `load()` downloads the sdist
that matches the installed transformers from the package index (PyPI, the only network CI has), verifies its sha256,
keeps its `tests/` folder in a cache outside the repository (default ~/.cache/compressm-tests, or
$COMPRESSM_TEST_CACHE) and imports it as the package `tests`, as transformers' own test run does.

The sdist holds the top-level test modules but not the modules they import from sub-packages; those imports get the
stand-ins of `transformers_standins.py`, registered under the names transformers' modules import. Pipeline tests read
their tiny models from $TRANSFORMERS_TINY_MODEL_PATH, which `load()` points at a folder of locally built tiny
checkpoints (no Hub access).
"""

from __future__ import annotations

import atexit
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
import urllib.parse
import urllib.request
from pathlib import Path

import transformers

CACHE_ROOT = Path(os.environ.get("COMPRESSM_TEST_CACHE", Path.home() / ".cache" / "compressm-tests"))
INDEX_URL = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")


class SuiteUnavailable(RuntimeError):
    """The transformers source distribution could not be fetched (no network, no index entry)."""


def _sdist_url(version: str) -> tuple[str, str | None]:
    """URL and sha256 of transformers-<version>.tar.gz from the package index's simple (PEP 503) page."""
    page_url = f"{INDEX_URL}/transformers/"
    request = urllib.request.Request(page_url, headers={"Accept": "text/html"})
    with urllib.request.urlopen(request, timeout=60) as response:
        page = response.read().decode("utf-8", "replace")
    filename = f"transformers-{version}.tar.gz"
    for match in re.finditer(r'href="([^"]+)"', page):
        href = match.group(1).replace("&amp;", "&")
        path, _, fragment = href.partition("#")
        if path.rsplit("/", 1)[-1] == filename:
            digest = fragment[len("sha256="):] if fragment.startswith("sha256=") else None
            return urllib.parse.urljoin(page_url, path), digest
    raise SuiteUnavailable(f"{page_url} lists no {filename}")


def _download_sdist(version: str, directory: Path) -> Path:
    """Download the sdist into `directory`: from the simple index with urllib, else with `pip download`."""
    target = directory / f"transformers-{version}.tar.gz"
    try:
        url, digest = _sdist_url(version)
        with urllib.request.urlopen(url, timeout=300) as response:
            payload = response.read()
        if digest is not None and hashlib.sha256(payload).hexdigest() != digest:
            raise SuiteUnavailable(f"sha256 mismatch for {url}")
        target.write_bytes(payload)
        return target
    except (OSError, SuiteUnavailable) as index_error:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                   "--timeout", "30", "--retries", "1",
                   "--dest", str(directory), f"transformers=={version}"]
        completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if completed.returncode != 0 or not target.is_file():
            raise SuiteUnavailable(
                f"could not fetch transformers-{version}.tar.gz: index: {index_error}; pip: "
                f"{completed.stderr.strip()[-300:]}"
            ) from index_error
        return target


def sdist_tests_folder(version: str = transformers.__version__) -> Path:
    """The cached `tests/` folder of the transformers sdist `version` (downloaded on first use)."""
    root = CACHE_ROOT / f"transformers-{version}"
    tests_dir = root / "tests"
    if (tests_dir / "__init__.py").is_file():
        return tests_dir
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE_ROOT) as scratch:
        archive = _download_sdist(version, Path(scratch))
        staging = Path(scratch) / "root"
        prefix = f"transformers-{version}/tests/"
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()]
            if not any(m.name == prefix + "test_modeling_common.py" for m in members):
                raise SuiteUnavailable(f"{archive.name} has no tests/test_modeling_common.py")
            for member in members:
                destination = staging / "tests" / member.name[len(prefix):]
                destination.parent.mkdir(parents=True, exist_ok=True)
                destination.write_bytes(tar.extractfile(member).read())
        # `tests` is a package in the transformers repository; its modules read the package folder and the library
        # source next to it through `direct_transformers_import`, which executes `<folder>/__init__.py` and then
        # returns `sys.modules["transformers"]`. Empty files there make that return the installed transformers
        # instead of a second copy of the library.
        (staging / "tests" / "__init__.py").write_text("")
        (staging / "src" / "transformers").mkdir(parents=True)
        (staging / "src" / "transformers" / "__init__.py").write_text(
            "# Placeholder: resolve `transformers` to the installed library.\n"
        )
        if root.exists():
            shutil.rmtree(root)
        staging.rename(root)
    return tests_dir


def _register_module(name: str, module: types.ModuleType | None = None) -> types.ModuleType:
    if module is None:
        module = types.ModuleType(name)
        module.__path__ = []  # a package, so that submodules can be registered below it
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
    return module


def _import_tests_package(tests_dir: Path) -> types.ModuleType:
    """Import the cached folder as the package `tests` (replacing the namespace package of our own tests/ folder, which
    Python would otherwise find first when the repository root is on sys.path)."""
    spec = importlib.util.spec_from_file_location(
        "tests", tests_dir / "__init__.py", submodule_search_locations=[str(tests_dir)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules["tests"] = package
    spec.loader.exec_module(package)
    return package


def _register_standins() -> None:
    import transformers_standins as standins

    for name, module in standins.modules().items():
        parts = name.split(".")
        for depth in range(2, len(parts)):
            package = ".".join(parts[:depth])
            if package not in sys.modules:
                _register_module(package)
        _register_module(name, module)


def load(tiny_model_builder=None) -> types.SimpleNamespace:
    """Import transformers' test mixins for the installed transformers.

    Args:
        tiny_model_builder: callable(folder: Path) -> dict; writes the tiny checkpoints the pipeline tests load into
            `folder/<model_type>/<architecture>` and returns the tiny-model summary entries ({architecture: {...}}).
    Returns:
        namespace with ModelTesterMixin, ConfigTester, PipelineTesterMixin, GenerationTesterMixin, ids_tensor, floats_tensor,
        random_attention_mask, version, tests_dir.
    Raises:
        SuiteUnavailable when the sdist cannot be fetched.
    """
    tests_dir = sdist_tests_folder()
    if tiny_model_builder is not None:
        tiny_root = Path(tempfile.mkdtemp(prefix="compressm-tiny-models-"))
        atexit.register(shutil.rmtree, tiny_root, ignore_errors=True)
        summary = tiny_model_builder(tiny_root)
        (tiny_root / "reports").mkdir()
        (tiny_root / "reports" / "tiny_model_summary.json").write_text(json.dumps(summary, indent=1))
        os.environ["TRANSFORMERS_TINY_MODEL_PATH"] = str(tiny_root)
    _import_tests_package(tests_dir)
    _register_standins()
    try:
        modeling_common = importlib.import_module("tests.test_modeling_common")
        configuration_common = importlib.import_module("tests.test_configuration_common")
        pipeline_mixin = importlib.import_module("tests.test_pipeline_mixin")
    except ModuleNotFoundError as error:
        if not (error.name or "").startswith("tests."):
            raise
        raise SuiteUnavailable(
            f"transformers {transformers.__version__}'s test modules import {error.name}, which its sdist lacks and "
            "transformers_standins.py does not provide (the stand-ins follow the newest supported release)"
        ) from error
    return types.SimpleNamespace(
        ModelTesterMixin=modeling_common.ModelTesterMixin,
        ConfigTester=configuration_common.ConfigTester,
        PipelineTesterMixin=pipeline_mixin.PipelineTesterMixin,
        GenerationTesterMixin=sys.modules["tests.generation.test_utils"].GenerationTesterMixin,
        ids_tensor=modeling_common.ids_tensor,
        floats_tensor=modeling_common.floats_tensor,
        random_attention_mask=modeling_common.random_attention_mask,
        version=transformers.__version__,
        tests_dir=tests_dir,
    )


__all__ = ["load", "SuiteUnavailable", "sdist_tests_folder", "CACHE_ROOT"]
