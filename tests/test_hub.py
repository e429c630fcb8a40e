"""Hub round trip of a reduced model: save_pretrained files, model card, remote-code loading in a process where the
package cannot be imported, Auto-class loading with the package, and an offline push_to_hub."""

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

import modeling_compressm
from modeling_compressm import CompreSSMConfig, CompreSSMForCausalLM, CompreSSMForSequenceClassification

from fake_hub import install_fake_hub  # tests/ helpers
from without_package import BLOCK_PACKAGE

REPO_ROOT = Path(__file__).resolve().parents[1]
REMOTE_CODE_FILES = {
    "modeling_compressm.py",
    "configuration_compressm.py",
    "reduction.py",
    "real_map.py",
    "scan.py",
    "model_card.py",
    "events.py",
    "layer_reduction.py",
}
EXPECTED_FILES = {"config.json", "model.safetensors", "compressm_history.json", "README.md", "hsv_spectrum.png"}
EXPECTED_FILES |= REMOTE_CODE_FILES
LOAD_WARNING_MARKERS = ("size mismatch", "newly initialized", "MISSING", "MISMATCH", "UNEXPECTED", "not initialized")
AUTO_CLASSES = {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification"}


def _reduce_and_record(model, ranks, step=7):
    """model.reduce(ranks) plus the history event CompreSSMCallback would record for it."""
    before = list(model.config.state_dims)
    report = model.reduce(ranks, strict=True, record=False)
    assert [entry.status for entry in report] == ["reduced" if r is not None else "unchanged" for r in ranks]
    model.reduction_history.append({
        "step": step,
        "policy": "fixed",
        "dims_before": before,
        "dims_after": list(model.config.state_dims),
        "kept_energy": [entry.kept_energy if entry.kept_energy is not None else 1.0 for entry in report],
        "hsv": [entry.hsv.tolist() if entry.hsv is not None else None for entry in report],
    })
    return report


@pytest.fixture(scope="module")
def reduced_checkpoints(tmp_path_factory):
    """A reduced classifier (continuous inputs) and a reduced causal LM, saved; with reference inputs/logits."""
    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    classifier = CompreSSMForSequenceClassification(
        CompreSSMConfig(hidden_size=8, num_hidden_layers=2, state_dims=[12, 10], input_dim=1, num_labels=10)
    ).eval()
    _reduce_and_record(classifier, [6, 5])
    lm = CompreSSMForCausalLM(CompreSSMConfig(vocab_size=32, hidden_size=8, num_hidden_layers=2, state_dims=9)).eval()
    _reduce_and_record(lm, [None, 4], step=3)

    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 20, 1, generator=generator)
    tokens = torch.randint(0, 32, (2, 11), generator=generator)
    with torch.no_grad():
        classifier_logits = classifier(inputs_embeds=pixels).logits
        lm_logits = lm(input_ids=tokens).logits
    classifier.save_pretrained(root / "classifier")
    lm.save_pretrained(root / "lm")
    torch.save({"pixels": pixels, "tokens": tokens}, root / "inputs.pt")
    return {
        "root": root,
        "classifier": classifier,
        "lm": lm,
        "pixels": pixels,
        "tokens": tokens,
        "classifier_logits": classifier_logits,
        "lm_logits": lm_logits,
    }


def _load_warnings(messages):
    return [message for message in messages if any(marker in message for marker in LOAD_WARNING_MARKERS)]


def _bundle_imports(package: Path, module_file: str) -> list[str]:
    """The package-relative imports of one flat module (top-level and inside functions), as dotted names relative to
    the package root: "events", "training.optimizer_state", ..."""
    found = []
    for node in ast.walk(ast.parse((package / module_file).read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            if node.level != 1:
                found.append("." * (node.level - 1) + (node.module or ""))
            elif node.module:
                found.append(node.module)
            else:
                found.extend(alias.name for alias in node.names)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
            found.extend(f"<absolute {name}>" for name in names if name.split(".")[0] == "modeling_compressm")
    return found


def _bundle_of(package: Path, entry_files) -> set[str]:
    """The flat modules `entry_files` need, transitively (what transformers copies next to the weights); AssertionError
    naming the importing module for an import that leaves the flat bundle (a subpackage, or the installed package)."""
    bundle, todo = set(), list(entry_files)
    while todo:
        module_file = todo.pop()
        if module_file in bundle:
            continue
        bundle.add(module_file)
        for name in _bundle_imports(package, module_file):
            outside = name.startswith(("<", ".")) or "." in name or not (package / f"{name}.py").is_file()
            assert not outside, f"{module_file} imports {name}: the remote-code bundle must stay flat and self-contained"
            todo.append(f"{name}.py")
    return bundle


def test_the_remote_code_bundle_imports_neither_the_training_library_nor_the_application():
    """Every model and config file, and what it imports transitively, stays among the flat modules of the package:
    none reaches `modeling_compressm.training` or `modeling_compressm.app` (those are not copied into checkpoints)."""
    package = Path(modeling_compressm.__file__).parent
    entry_files = sorted(path.name for pattern in ("modeling_*.py", "configuration_*.py") for path in package.glob(pattern))
    bundle = _bundle_of(package, entry_files)
    for subpackage in ("training", "app"):
        moved = {path.name for path in (package / subpackage).glob("*.py")} - {"__init__.py"}
        assert not bundle & moved, f"the bundle shares module names with {subpackage}/: {sorted(bundle & moved)}"
    assert _bundle_of(package, ["modeling_compressm.py", "configuration_compressm.py"]) == REMOTE_CODE_FILES


def test_saved_files_config_and_weights(reduced_checkpoints):
    path = reduced_checkpoints["root"] / "classifier"
    assert set(os.listdir(path)) == EXPECTED_FILES
    # A checkpoint's Python files are the bundle the modeling file needs, and no module of the training loop.
    assert {name for name in os.listdir(path) if name.endswith(".py")} == REMOTE_CODE_FILES
    assert "optimizer_state.py" not in os.listdir(path) and "reducer.py" not in os.listdir(path)
    config = json.loads((path / "config.json").read_text())
    assert config["state_dims"] == [6, 5]
    assert config["model_type"] == "compressm"
    assert set(config["auto_map"]) == AUTO_CLASSES
    assert config["auto_map"]["AutoModelForSequenceClassification"] == (
        "modeling_compressm.CompreSSMForSequenceClassification"
    )
    assert config["auto_map"]["AutoConfig"] == "configuration_compressm.CompreSSMConfig"
    weights = load_file(str(path / "model.safetensors"))
    for layer, dim in enumerate([6, 5]):
        lru = {name: tensor for name, tensor in weights.items() if f"layers.{layer}." in name and ".lru." in name}
        assert lru, f"no LRU weights for layer {layer}: {sorted(weights)}"
        shapes = {name.rsplit(".", 1)[1]: tuple(tensor.shape) for name, tensor in lru.items()}
        assert shapes["B_re"] == shapes["B_im"] == (dim, 8), shapes  # (N, H)
        assert shapes["C_re"] == shapes["C_im"] == (8, dim), shapes  # (H, N)
        assert shapes["D"] == (8,), shapes
        per_state = [shape for name, shape in shapes.items() if name not in ("B_re", "B_im", "C_re", "C_im", "D")]
        assert per_state and all(shape == (dim,) for shape in per_state), shapes
    history = json.loads((path / "compressm_history.json").read_text())
    assert history["state_dims"] == [6, 5]
    assert [event["dims_after"] for event in history["events"]] == [[6, 5]]
    # the remote-code files are the package's own sources
    for name in REMOTE_CODE_FILES:
        assert (path / name).read_bytes() == (Path(modeling_compressm.__file__).parent / name).read_bytes()


def test_model_card_lists_dims_history_and_plot(reduced_checkpoints):
    path = reduced_checkpoints["root"] / "classifier"
    card = (path / "README.md").read_text()
    assert "- compressm" in card and "library_name: transformers" in card
    assert "AutoModelForSequenceClassification.from_pretrained" in card
    assert "| 0 | 12 | 6 |" in card and "| 1 | 10 | 5 |" in card  # initial and current dims per layer
    assert "total state size: 11 (initially 22)" in card
    assert "| 7 | [12, 10] | [6, 5] |" in card  # reduction history row
    assert "![Hankel singular values per layer](hsv_spectrum.png)" in card
    assert (path / "hsv_spectrum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lm_card = (reduced_checkpoints["root"] / "lm" / "README.md").read_text()
    assert "AutoModelForCausalLM.from_pretrained" in lm_card and "| 1 | 9 | 4 |" in lm_card


def test_user_model_card_is_kept(reduced_checkpoints, tmp_path):
    (tmp_path / "README.md").write_text("# my own card\n")
    reduced_checkpoints["lm"].save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "# my own card\n"
    assert (tmp_path / "compressm_history.json").exists()


def test_auto_classes_without_remote_code(reduced_checkpoints, transformers_warnings):
    root = reduced_checkpoints["root"]
    classifier = AutoModelForSequenceClassification.from_pretrained(root / "classifier").eval()
    assert type(classifier) is CompreSSMForSequenceClassification
    assert classifier.config.state_dims == [6, 5]
    saved_events = json.loads((root / "classifier" / "compressm_history.json").read_text())["events"]
    assert [event.to_dict() for event in classifier.reduction_history] == saved_events
    lm = AutoModelForCausalLM.from_pretrained(root / "lm").eval()
    assert type(lm) is CompreSSMForCausalLM and lm.config.state_dims == [9, 4]
    assert _load_warnings(transformers_warnings) == []
    # the bare backbone from a classifier checkpoint: only the classification head is left over
    backbone, loading_info = AutoModel.from_pretrained(root / "classifier", output_loading_info=True)
    backbone.eval()
    assert sorted(loading_info["unexpected_keys"]) == ["score.bias", "score.weight"]
    assert not loading_info["missing_keys"] and not loading_info["mismatched_keys"]
    with torch.no_grad():
        torch.testing.assert_close(classifier(inputs_embeds=reduced_checkpoints["pixels"]).logits,
                                   reduced_checkpoints["classifier_logits"], rtol=0, atol=0)
        torch.testing.assert_close(lm(input_ids=reduced_checkpoints["tokens"]).logits,
                                   reduced_checkpoints["lm_logits"], rtol=0, atol=0)
        torch.testing.assert_close(backbone(inputs_embeds=reduced_checkpoints["pixels"]).last_hidden_state,
                                   classifier.model(inputs_embeds=reduced_checkpoints["pixels"]).last_hidden_state)


def test_warning_capture_sees_a_size_mismatch(reduced_checkpoints, transformers_warnings):
    """Control for the test above: loading at the wrong state sizes is reported through the captured logger."""
    AutoModelForSequenceClassification.from_pretrained(
        reduced_checkpoints["root"] / "classifier", state_dims=[12, 10], ignore_mismatched_sizes=True
    )
    assert _load_warnings(transformers_warnings)


REMOTE_SCRIPT = BLOCK_PACKAGE + textwrap.dedent(
    r"""
    import json, logging
    try:
        import modeling_compressm  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("modeling_compressm is importable: the test would not test remote code")

    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers import logging as hf_logging

    messages = []
    class Capture(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())
    hf_logging.set_verbosity_warning()
    hf_logging.get_logger().addHandler(Capture(level=logging.WARNING))

    root = sys.argv[2]
    inputs = torch.load(os.path.join(root, "inputs.pt"))
    classifier = AutoModelForSequenceClassification.from_pretrained(
        os.path.join(root, "classifier"), trust_remote_code=True).eval()
    lm = AutoModelForCausalLM.from_pretrained(os.path.join(root, "lm"), trust_remote_code=True).eval()
    same_class_warnings = list(messages)
    backbone = AutoModel.from_pretrained(os.path.join(root, "classifier"), trust_remote_code=True).eval()
    with torch.no_grad():
        out = {
            "classifier": classifier(inputs_embeds=inputs["pixels"]).logits,
            "lm": lm(input_ids=inputs["tokens"]).logits,
        }
    torch.save(out, os.path.join(root, "remote_logits.pt"))
    print(json.dumps({
        "classes": [type(m).__module__ + "." + type(m).__name__ for m in (classifier, lm, backbone)],
        "state_dims": [classifier.config.state_dims, lm.config.state_dims],
        "history_steps": [e["step"] for e in classifier.reduction_history],
        "loaded_modules": sorted(n for n in sys.modules if n.split(".")[0] in ("modeling_compressm", "compressm_kernels")),
        "warnings": same_class_warnings,
    }))
    """
)


def test_remote_code_loading_without_the_package(reduced_checkpoints, tmp_path):
    root = reduced_checkpoints["root"]
    script = tmp_path / "load_remote.py"
    script.write_text(REMOTE_SCRIPT)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, str(script), str(REPO_ROOT), str(root)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loaded_modules"] == []
    assert all(name.startswith("transformers_modules.") for name in report["classes"]), report["classes"]
    assert [name.rsplit(".", 1)[1] for name in report["classes"]] == [
        "CompreSSMForSequenceClassification", "CompreSSMForCausalLM", "CompreSSMModel"
    ]
    assert report["state_dims"] == [[6, 5], [9, 4]]
    assert report["history_steps"] == [7]
    assert _load_warnings(report["warnings"]) == []
    remote = torch.load(root / "remote_logits.pt")
    torch.testing.assert_close(remote["classifier"], reduced_checkpoints["classifier_logits"], rtol=0, atol=0)
    torch.testing.assert_close(remote["lm"], reduced_checkpoints["lm_logits"], rtol=0, atol=0)


@pytest.fixture
def fake_hub(monkeypatch):
    return install_fake_hub(monkeypatch)


def _assert_same_upload(files, saved_dir):
    assert set(files) == set(os.listdir(saved_dir))
    for name in ("config.json", "compressm_history.json", "README.md", *REMOTE_CODE_FILES):
        assert files[name] == (saved_dir / name).read_bytes(), name
    uploaded = load_safetensors_bytes(files["model.safetensors"])
    saved = load_file(str(saved_dir / "model.safetensors"))
    assert uploaded.keys() == saved.keys()
    for key in saved:
        assert torch.equal(uploaded[key], saved[key]), key
    card = files["README.md"].decode()
    assert "- compressm" in card and "automatically generated" not in card


def test_push_to_hub_uploads_what_save_pretrained_writes(reduced_checkpoints, fake_hub):
    model = reduced_checkpoints["classifier"]
    model.push_to_hub("compressm-test")
    assert fake_hub.repos == [("compressm-test", None)]
    (commit,) = fake_hub.commits
    assert commit["repo_id"] == "compressm-test"
    _assert_same_upload(commit["files"], reduced_checkpoints["root"] / "classifier")


def test_save_pretrained_with_push_uploads_history_and_card(reduced_checkpoints, fake_hub, tmp_path):
    model = reduced_checkpoints["lm"]
    # a str folder: transformers < 5 splits the path to default repo_id even when one is given
    model.save_pretrained(str(tmp_path / "lm"), push_to_hub=True, repo_id="compressm-lm")
    (commit,) = fake_hub.commits
    _assert_same_upload(commit["files"], reduced_checkpoints["root"] / "lm")
    assert set(os.listdir(tmp_path / "lm")) == set(commit["files"])
