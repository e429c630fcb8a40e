"""In-training reduction of CompreSSM Mamba-1 models by selection: statistics from training passes only (padding
excluded, activation-checkpointing recomputation not counted, also for Mamba-2), Adam moments sliced exactly, the
Trainer callback, and the refusal of a balanced reduction before training."""

import pytest
import torch

from modeling_compressm import modeling_compressm_mamba as modeling1

if modeling1.MISSING_FROM_TRANSFORMERS:
    pytest.skip(f"this transformers release lacks the Mamba 5.x pieces ({modeling1.MISSING_FROM_TRANSFORMERS})",
                allow_module_level=True)

from transformers import Trainer, TrainingArguments  # noqa: E402

from modeling_compressm import CompreSSMMamba2ForCausalLM, CompreSSMMambaForCausalLM  # noqa: E402
from modeling_compressm.training.selective_ssm_training import (  # noqa: E402
    SelectiveSSMGramianCollector,
    SelectiveSSMReductionCallback,
    repair_optimizer,
)
from test_mamba import STATE, VOCAB, _calibration, _stock_model  # noqa: E402 - tests/ helpers
from test_mamba2 import _stock_model as _stock_mamba2  # noqa: E402

TIME_STEP_RANK = 4


def test_collector_counts_training_passes_only_and_excludes_padding():
    model = CompreSSMMambaForCausalLM.from_mamba(_stock_model())
    collector = SelectiveSSMGramianCollector()
    collector.start(model)
    tokens = _calibration(batches=1)[0]  # (2, 16)
    mask = torch.ones_like(tokens)
    mask[1, 10:] = 0
    model.train()
    model(input_ids=tokens, attention_mask=mask)
    model.eval()
    with torch.no_grad():
        model(input_ids=tokens)  # an evaluation pass is not counted
    collector.stop()
    assert [statistics.count for statistics in collector.statistics] == [int(mask.sum())] * 2
    # the same statistics as the model's own calibration pass on that batch
    expected = model.gramian_statistics([{"input_ids": tokens, "attention_mask": mask}])
    for got, want in zip(collector.statistics, expected):
        assert all(torch.allclose(g, w, rtol=1e-5, atol=1e-9) for g, w in zip(got.gramians(), want.gramians()))


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_activation_checkpointing_recomputation_is_not_counted_twice(family):
    """For both Mamba models (the Mamba-2 case moved here from test_mamba2_training.py)."""
    model = (CompreSSMMambaForCausalLM.from_mamba(_stock_model()) if family == "mamba"
             else CompreSSMMamba2ForCausalLM.from_mamba2(_stock_mamba2()))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    collector = SelectiveSSMGramianCollector()
    collector.start(model)
    tokens = _calibration(batches=1)[0]
    model(tokens, labels=tokens, use_cache=False).loss.backward()
    collector.stop()
    assert [statistics.count for statistics in collector.statistics] == [tokens.numel()] * 2


def test_selection_slices_adam_moments_exactly_and_training_continues():
    model = CompreSSMMambaForCausalLM.from_mamba(_stock_model())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for tokens in _calibration(batches=2, seed=3):
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    old_parameters = dict(model.named_parameters())
    names = ["backbone.layers.0.mixer.A_log", "backbone.layers.0.mixer.x_proj.weight"]
    old_states = {name: {key: value.clone() for key, value in optimizer.state[old_parameters[name]].items()}
                  for name in names}
    keep = [1, 2, 5, 6, 7]
    results = model.reduce([len(keep), None], keep=[keep, None])
    repair_optimizer(optimizer, old_parameters, model, results)

    new = dict(model.named_parameters())
    rows = list(range(TIME_STEP_RANK)) + [TIME_STEP_RANK + i for i in keep] + [TIME_STEP_RANK + STATE + i for i in keep]
    for moment in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(optimizer.state[new[names[0]]][moment], old_states[names[0]][moment][:, keep])
        assert torch.equal(optimizer.state[new[names[1]]][moment], old_states[names[1]][moment][rows])
    assert float(optimizer.state[new[names[0]]]["step"]) == 2
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters()} and len(optimizer.state) == len(optimized)
    before = new[names[0]].detach().clone()
    tokens = _calibration(batches=1, seed=5)[0]
    model(tokens, labels=tokens).loss.backward()
    optimizer.step()
    assert not torch.equal(new[names[0]], before)


def _trainer(model, callback, tmp_path, steps=6):
    generator = torch.Generator().manual_seed(4)
    rows = [torch.randint(3, VOCAB, (16,), generator=generator) for _ in range(24)]
    arguments = TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3, report_to=[],
        save_strategy="no", logging_steps=1, use_cpu=True, dataloader_num_workers=0,
    )
    return Trainer(model=model, args=arguments, train_dataset=[{"input_ids": row, "labels": row} for row in rows],
                   callbacks=[callback])


def test_trainer_reduces_a_mamba1_model_by_selection_from_training_batches(tmp_path):
    model = CompreSSMMambaForCausalLM.from_mamba(_stock_model())
    callback = SelectiveSSMReductionCallback(ranks=[5, 3], start_step=2, window_steps=2)  # method: the model's
    trainer = _trainer(model, callback, tmp_path)
    trainer.train()
    assert model.config.state_dims == [5, 3]
    assert [(result.status, result.method) for result in callback.results] == [("reduced", "select")] * 2
    # statistics came from exactly the window's training batches: 2 steps x 4 sequences x 16 positions per layer
    assert [statistics.count for statistics in callback.collector.statistics] == [2 * 4 * 16] * 2
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters()}
    a_log = model.backbone.layers[1].mixer.A_log
    assert a_log.shape == (32, 3) and trainer.optimizer.state[a_log]["exp_avg"].shape == (32, 3)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))


def test_a_balanced_reduction_of_mamba1_is_refused_before_the_first_step(tmp_path):
    model = CompreSSMMambaForCausalLM.from_mamba(_stock_model())
    trainer = _trainer(model, SelectiveSSMReductionCallback(ranks=4, method="balanced"), tmp_path)
    with pytest.raises(ValueError, match="method must be 'select' for Mamba-1 layers"):
        trainer.train()
    assert trainer.state.global_step == 0 and model.config.state_dims == [STATE, STATE]


def test_a_window_that_no_statistics_reach_stops_with_a_clear_error(tmp_path, monkeypatch):
    """Where the training forward skips the hooked modules (transformers' fused CUDA path), no reduction from no
    data: the callback names the cause."""
    model = CompreSSMMambaForCausalLM.from_mamba(_stock_model())

    def start_without_hooks(self, model):  # active, but its hook sits on a module the model never runs
        self.statistics = [modeling1.MambaGramianStatistics() for _ in range(2)]
        self._handles = [torch.nn.Identity().register_forward_hook(lambda *args: None)]

    monkeypatch.setattr(SelectiveSSMGramianCollector, "start", start_without_hooks)
    trainer = _trainer(model, SelectiveSSMReductionCallback(ranks=4, start_step=0, window_steps=1), tmp_path)
    with pytest.raises(RuntimeError, match=r"no Gramian statistics reached layers \[0, 1\].*mamba_inner_fn"):
        trainer.train()
    assert model.config.state_dims == [STATE, STATE]
