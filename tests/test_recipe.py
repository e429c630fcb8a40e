"""Pieces of the training recipe without training: the reduction schedule, the thread default, the optimizer, the
all-or-nothing output folder and the model card's training section."""

import os

import pytest
import torch

from modeling_compressm import CompreSSMConfig, CompreSSMForCausalLM
from modeling_compressm.model_card import render_model_card
from modeling_compressm.app.output_folder import MANIFEST_FILE, write_output_folder
from modeling_compressm.training.optim import DEFAULT_SSM_LR_FACTOR, DEFAULT_SSM_PARAMETER_NAMES
from modeling_compressm.app.recipe import build_optimizer
from modeling_compressm.app.run_settings import ReductionPlan, TrainingOptions, configure_threads, default_num_threads


def test_reduction_plan_resolves_steps_and_fractions():
    assert ReductionPlan().resolve(1150) == {"start_step": 23, "end_step": 345, "interval": 53}
    plan = ReductionPlan(start_step=0.1, end_step=0.5, interval=0.1)
    assert plan.resolve(200) == {"start_step": 20, "end_step": 100, "interval": 20}
    assert ReductionPlan(start_step=5, end_step=50, interval=7).resolve(10) == {
        "start_step": 5, "end_step": 50, "interval": 7}
    assert ReductionPlan(start_step=0, end_step=0.3).resolve(3)["end_step"] == 1  # a float end stays after start
    callback = ReductionPlan(policy="fixed", fraction=0.5, start_step=0.1, end_step=0.5, interval=0.1, gate=0.8,
                             min_dim=3, total_budget=40).make_callback(200)
    assert (callback.start_step, callback.end_step, callback.interval) == (20, 100, 20)
    assert (callback.policy, callback.fraction, callback.gate, callback.min_dim, callback.total_budget) == (
        "fixed", 0.5, 0.8, 3, 40)
    assert ReductionPlan(compress=False).make_callback(10) is None
    for bad, message in ((ReductionPlan(start_step=-1), "start step must be >= 0"),
                         (ReductionPlan(end_step=1.5), "end step must be an int step or a float fraction"),
                         (ReductionPlan(interval=0), "interval must be an int >= 1 or a float fraction"),
                         (ReductionPlan(interval=1.5), "interval must be an int >= 1 or a float fraction"),
                         (ReductionPlan(start_step=10, end_step=5), r"the end step \(5\) comes before")):
        with pytest.raises(ValueError, match=message):
            bad.resolve(100)
    description = ReductionPlan(start_step=0, end_step=12, interval=3, tau=0.2).describe(24)
    assert description == {"policy": "tolerance", "tau": 0.2, "reduction steps": "every 3 from 0 to 12"}


def test_thread_default(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert default_num_threads() == 1  # a loaded 2-core machine: one thread
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
    assert default_num_threads() == 4
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert configure_threads(None) == (4, "default") and torch.get_num_threads() == 4
        assert configure_threads(2) == (2, "--threads") and torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(3)
        assert configure_threads(None) == (3, "OMP_NUM_THREADS")
        with pytest.raises(ValueError, match="threads must be a positive int"):
            configure_threads(0)
    finally:
        torch.set_num_threads(before)


def test_build_optimizer_decays_weights_but_not_norms_or_ssm_parameters():
    model = CompreSSMForCausalLM(CompreSSMConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, state_dims=4))
    optimizer = build_optimizer(model, learning_rate=0.01, weight_decay=0.1)
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    groups = optimizer.param_groups
    decayed = {names[id(p)] for group in groups if group["weight_decay"] == 0.1 for p in group["params"]}
    plain = {names[id(p)] for group in groups if group["weight_decay"] == 0.0 for p in group["params"]}
    assert decayed | plain == set(names.values()) and not decayed & plain
    ssm = {f"model.layers.0.lru.{name}" for name in DEFAULT_SSM_PARAMETER_NAMES}
    assert all("norm" in name or name.endswith("bias") for name in plain - ssm)
    assert {"model.layers.0.norm.weight", "model.layers.0.glu_proj.bias"} | ssm <= plain
    assert "model.layers.0.lru.C_re" in decayed
    rates = {names[id(p)]: group["lr"] for group in groups for p in group["params"]}
    assert all(rates[name] == pytest.approx(0.01 * DEFAULT_SSM_LR_FACTOR) for name in ssm)
    assert all(rate == 0.01 for name, rate in rates.items() if name not in ssm)


def test_output_folder_is_written_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out"

    def write_two(folder):
        (tmp_path / "seen").write_text(folder)
        for name in ("a.txt", "b.txt"):
            with open(os.path.join(folder, name), "w") as handle:
                handle.write(name)

    assert write_output_folder(str(target), write_two) == str(target)
    assert sorted(os.listdir(target)) == [MANIFEST_FILE, "a.txt", "b.txt"]
    assert os.path.dirname((tmp_path / "seen").read_text()) == str(tmp_path)  # staged beside the target

    def fail_half_way(folder):
        with open(os.path.join(folder, "a.txt"), "w") as handle:
            handle.write("new")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_output_folder(str(target), fail_half_way)
    assert (target / "a.txt").read_text() == "a.txt" and sorted(os.listdir(target)) == [MANIFEST_FILE, "a.txt", "b.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out", "seen"]  # no staging folder left behind

    write_output_folder(str(target), lambda folder: open(os.path.join(folder, "c.txt"), "w").close())
    assert sorted(os.listdir(target)) == [MANIFEST_FILE, "c.txt"]  # what the last write wrote: no stale files
    assert sorted(os.listdir(tmp_path)) == ["out", "seen"]


def test_training_options_check_before_training(tmp_path):
    with pytest.raises(ValueError, match="unknown --report-to 'nope'"):
        TrainingOptions(report_to=["nope"]).validate()
    with pytest.raises(ValueError, match="max_steps must be a positive int"):
        TrainingOptions(max_steps=0).validate()
    assert TrainingOptions(max_steps=7).total_steps(1000, 3.0) == 7
    assert TrainingOptions(batch_size=10).total_steps(95, 2.0) == 20
    assert TrainingOptions(save_steps=5).checkpoint_folder(str(tmp_path / "m")) == str(tmp_path / "m") + "-checkpoints"
    assert TrainingOptions().checkpoint_folder(str(tmp_path / "m")) is None
    with pytest.raises(ValueError, match="no checkpoint-\\* folder in"):
        TrainingOptions(resume_from_checkpoint="last").resolve_resume(str(tmp_path / "m"))


def test_model_card_training_section_and_post_hoc_wording():
    model = CompreSSMForCausalLM(CompreSSMConfig(vocab_size=16, hidden_size=8, num_hidden_layers=2, state_dims=6))
    info = {"Data": {"dataset": "my|data\nset.txt", "block size": 64}, "Metrics": {"eval loss": 1.234567891}}
    card = render_model_card(model, training_info=info)
    assert "## Training" in card and "### Data" in card and "| block size | 64 |" in card
    assert "| dataset | my\\|data set.txt |" in card  # a pipe or a line break cannot break the table
    assert "| eval loss | 1.23457 |" in card
    model.compressm_training_info = info
    assert render_model_card(model) == card
    assert "reduced during training" in card
    model.reduce([3, None])  # a post-hoc reduction records a "manual" event
    assert "reduced after training (post hoc)" in render_model_card(model)
    model.reduction_history.insert(0, {"step": 10, "policy": "tolerance", "dims_before": [8, 8],
                                       "dims_after": [6, 6], "kept_energy": [1.0, 1.0]})
    assert "during training and afterwards (post hoc" in render_model_card(model)


def test_declared_dependencies_are_used():
    """Every install_requires entry earns its place (imported by the package, or needed by the Trainer at run time);
    `evaluate` is not declared: it would fetch metric modules from the Hub."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    block = re.search(r"install_requires=\[(.*?)\]", (root / "setup.py").read_text(), re.S).group(1)
    names = {re.match(r"[A-Za-z0-9_.-]+", item).group(0).lower()
             for item in re.findall(r'"([^"]+)"', block)}
    assert "evaluate" not in names and "tqdm" not in names
    sources = "\n".join(path.read_text() for folder in ("modeling_compressm", "kernels")
                        for path in (root / folder).rglob("*.py"))
    imported_as = {"scikit-learn": "sklearn"}
    needed_by_the_trainer_or_format = {"accelerate", "safetensors"}
    for name in names - needed_by_the_trainer_or_format:
        module = imported_as.get(name, name).replace("-", "_")
        assert re.search(rf"^\s*(import|from) {module}\b", sources, re.M), f"{name} is declared but never imported"
