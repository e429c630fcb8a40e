"""CompreSSMReducer in plain PyTorch, accelerate and Trainer loops: same sizes from the same seed and schedule, the
optimizer keeps exactly the model's parameters (state repaired, groups and scheduler untouched), a live autograd graph
survives a reduction, resume through state_dict, one factorisation per layer and event, and the seams the other
streams plug into (optimizer-state repair modes, distributed strategies, the defaults object)."""

import copy
import inspect

import pytest
import torch
from accelerate import Accelerator
from transformers import TrainingArguments, get_linear_schedule_with_warmup

import modeling_compressm.training.reducer as reducer_module
from modeling_compressm import (
    CompreSSMCallback,
    CompreSSMReducer,
    CompreSSMTrainer,
    StaleOptimizerStateError,
    reduce_with_optimizer,
)
from modeling_compressm.training import distributed as distributed_module
from modeling_compressm.training import optimizer_state as optimizer_state_module
from modeling_compressm.training.settings import DEFAULTS
from tasks import SignTask, one_thread, tiny_classifier  # noqa: F401 (fixture)

MAX_STEPS = 24
# transformers >= 5 can keep the dataset order; older releases shuffle within the (single) batch, which only permutes
# the terms of the batch mean.
SEQUENTIAL = (
    {"train_sampling_strategy": "sequential"} if "train_sampling_strategy" in TrainingArguments.__dataclass_fields__
    else {}
)
SCHEDULE = dict(policy="tolerance", tau=0.05, start_step=4, end_step=0.5, interval=4)
LEARNING_RATE = 3e-3


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(seed=0, state_dims=16):
    return tiny_classifier(state_dims=state_dims, seed=seed)


def batch(size=16, seed=0):
    data = SignTask(size, seed=seed)
    return {"inputs_embeds": data.inputs, "labels": data.labels}


def ssm_parameter_ids(model):
    return {id(p) for layer in model.lru_layers() for p in layer.ssm_parameters()}


# --------------------------------------------------------------------------------------------- three loops
def plain_loop(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, MAX_STEPS)
    reducer = CompreSSMReducer(model, optimizer, max_steps=MAX_STEPS, **SCHEDULE)
    inputs = batch()
    for step in range(1, MAX_STEPS + 1):
        loss = model(**inputs).loss  # still referenced while the reducer runs: the previous graph is alive
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        reducer.step(step)
    return reducer


def accelerate_loop(model):
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, MAX_STEPS)
    prepared, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    reducer = CompreSSMReducer(prepared, optimizer, max_steps=MAX_STEPS, **SCHEDULE)
    inputs = batch()
    for step in range(1, MAX_STEPS + 1):
        loss = prepared(**inputs).loss
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        reducer.step(step)
    return reducer


def trainer_loop(model, tmp_path):
    callback = CompreSSMCallback(**SCHEDULE)
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=MAX_STEPS, per_device_train_batch_size=16,
        learning_rate=LEARNING_RATE, weight_decay=0.0, optim="adamw_torch", max_grad_norm=0.0, report_to="none",
        disable_tqdm=True, save_strategy="no", use_cpu=True, seed=0, lr_scheduler_type="linear", logging_steps=100,
        **SEQUENTIAL,
    )
    # 16 examples = one batch: every step sees the same examples, as in the loops above.
    trainer = CompreSSMTrainer(model=model, args=args, train_dataset=SignTask(16), callbacks=[callback])
    trainer.train()
    return callback


def test_plain_accelerate_and_trainer_loops_reduce_to_the_same_sizes(tmp_path):
    plain_model, accelerate_model, trainer_model = make_model(), make_model(), make_model()
    plain = plain_loop(plain_model)
    accelerated = accelerate_loop(accelerate_model)
    trained = trainer_loop(trainer_model, tmp_path)

    steps = [event.step for event in plain.history]
    assert steps == [4, 8, 12] and plain.history[-1].dims_after != [16, 16]
    for other in (accelerated, trained):
        assert [event.step for event in other.history] == steps
        assert [event.dims_after for event in other.history] == [event.dims_after for event in plain.history]
    assert plain_model.config.state_dims == accelerate_model.config.state_dims == trainer_model.config.state_dims
    reference = plain_model.state_dict()
    for model, tolerance in ((accelerate_model, 0.0), (trainer_model, 0.0 if SEQUENTIAL else 1e-3)):
        for name, tensor in model.state_dict().items():
            torch.testing.assert_close(tensor, reference[name], rtol=tolerance, atol=tolerance, msg=name)


# ------------------------------------------------------------------------------------------ optimizer contract
def test_optimizer_keeps_exactly_the_model_parameters_groups_and_schedule():
    model = make_model()
    ssm = ssm_parameter_ids(model)
    ssm_params = [p for p in model.parameters() if id(p) in ssm]
    other_params = [p for p in model.parameters() if id(p) not in ssm]
    optimizer = torch.optim.AdamW(
        [{"params": ssm_params, "lr": 1e-3, "weight_decay": 0.0}, {"params": other_params, "weight_decay": 0.1}],
        lr=3e-3,
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    groups_before = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    reducer = CompreSSMReducer(model, optimizer, tau=0.05, start_step=2, end_step=2, interval=2, gate=1.0)
    inputs = batch()
    for step in range(1, 5):
        model(**inputs).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        event = reducer.step(step)
        if step == 2:
            assert event is not None and all(status == "reduced" for status in event.status)
            # no state for the reduced parameters, everything else keeps its moments
            assert all(p not in optimizer.state for p in ssm_params)
            assert all(float(optimizer.state[p]["step"]) == 2 for p in other_params)
    held = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(held) == sorted(id(p) for p in model.parameters())
    assert [{k: v for k, v in group.items() if k not in ("params", "lr", "initial_lr")}
            for group in optimizer.param_groups] == [{k: v for k, v in group.items() if k not in ("lr", "initial_lr")}
                                                     for group in groups_before]
    assert [group["lr"] for group in optimizer.param_groups] == [1e-3 * 0.5, 3e-3 * 0.5]  # StepLR went on
    for parameter in ssm_params:  # fresh moments of the new shapes
        assert optimizer.state[parameter]["exp_avg"].shape == parameter.shape
        assert float(optimizer.state[parameter]["step"]) == 2


def test_model_reduce_with_live_graph_and_stale_optimizer_state_fails_clearly_or_is_repaired():
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inputs = batch()
    loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    reduce_with_optimizer(model, [8, 8])  # `loss` still holds the previous graph; no optimizer passed
    model(**inputs).loss.backward()  # the live graph does not break the next backward
    assert model.lru_layers()[0].B_re.grad.shape == (8, 16)
    with pytest.raises(StaleOptimizerStateError, match=r"optimizer=optimizer"):
        optimizer.step()
    optimizer.zero_grad()

    reduce_with_optimizer(model, [4, 4], optimizer=optimizer)  # the clean way: state of the reduced parameters is repaired
    loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    assert model.lru_layers()[0].B_re.shape == (4, 16)
    assert optimizer.state[model.lru_layers()[0].B_re]["exp_avg"].shape == (4, 16)


def test_reducing_without_an_optimizer_does_not_keep_the_model_alive():
    """The stale-state guard watches parameters reduced without their optimizer; a model dropped after a post-hoc
    reduction (nothing ever steps for it) must be freed, not held by the guard forever."""
    import gc
    import weakref

    model = make_model()
    reduce_with_optimizer(model, [8, 8])
    watched = weakref.ref(model.lru_layers()[0].B_re)
    assert id(watched()) in optimizer_state_module._STALE  # it is being watched
    del model
    gc.collect()
    assert watched() is None


def test_optimizer_that_does_not_train_the_model_is_rejected():
    model, other = make_model(), make_model(seed=1)
    with pytest.raises(ValueError, match="holds none of the model's SSM parameters"):
        CompreSSMReducer(model, torch.optim.SGD(other.parameters(), lr=0.1))


# ---------------------------------------------------------------------------------------------------- resume
def run_with_checkpoint(save_at=None, resume=None):
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    reducer = CompreSSMReducer(model, optimizer, tau=0.05, start_step=3, end_step=9, interval=3)
    first = 1
    if resume is not None:
        reducer.load_state_dict(resume["reducer"])  # re-sizes the model first
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        first = resume["step"] + 1
    checkpoint = None
    inputs = batch()
    for step in range(first, 13):
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        reducer.step(step)
        if step == save_at:
            checkpoint = {"step": step, "model": {k: v.clone() for k, v in model.state_dict().items()},
                          "optimizer": copy.deepcopy(optimizer.state_dict()), "reducer": reducer.state_dict()}
    return model, reducer, checkpoint


def test_state_dict_resume_matches_the_uninterrupted_run(tmp_path):
    full_model, full_reducer, checkpoint = run_with_checkpoint(save_at=7)
    path = tmp_path / "loop.pt"
    torch.save(checkpoint, path)
    resumed_model, resumed_reducer, _ = run_with_checkpoint(resume=torch.load(path, weights_only=True))
    assert [e.step for e in resumed_reducer.history] == [e.step for e in full_reducer.history] == [3, 6, 9]
    assert resumed_model.config.state_dims == full_model.config.state_dims
    for name, tensor in resumed_model.state_dict().items():
        torch.testing.assert_close(tensor, full_model.state_dict()[name], rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------------------------------- one factorisation
def test_each_layer_is_factorised_once_per_event(monkeypatch):
    model = make_model()
    calls = []
    real_balance = reducer_module.balance

    def counting_balance(lam, B, C, system="real"):
        calls.append(lam.shape[0])
        return real_balance(lam, B, C, system)

    def no_second_factorisation(*args, **kwargs):
        raise AssertionError("model.reduce factorised a layer again")

    monkeypatch.setattr(reducer_module, "balance", counting_balance)
    monkeypatch.setattr("modeling_compressm.modeling_compressm.balanced_truncation", no_second_factorisation)
    reducer = CompreSSMReducer(model, None, tau=0.05, gate=1.0)
    event = reducer.reduce_now(1)
    assert event is not None and event.status == ["reduced", "reduced"]
    assert calls == [16, 16]


# ------------------------------------------------------------------------------------------------------ seams
def test_registered_optimizer_state_repair_receives_the_basis_maps(monkeypatch):
    seen = []

    def record(optimizer, changes):
        for change in changes:
            seen.append((change.layer, change.project.shape, change.lift.shape,
                         tuple(change.previous["B_re"].shape), tuple(change.parameters["B_re"].shape)))
            for parameter in change.parameters.values():
                optimizer.state.pop(parameter, None)

    monkeypatch.setitem(optimizer_state_module.OPTIMIZER_STATE_REPAIRS, "record", record)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    reducer = CompreSSMReducer(model, optimizer, policy="fixed", fraction=0.5, optimizer_state="record",
                               system="complex")
    reducer.reduce_now(1)
    assert seen == [(0, (8, 16), (16, 8), (16, 16), (8, 16)), (1, (8, 16), (16, 8), (16, 16), (8, 16))]
    with pytest.raises(ValueError, match="optimizer_state must be one of"):
        CompreSSMReducer(model, optimizer, optimizer_state="unknown")


@pytest.fixture
def strategy_calls(monkeypatch):
    """The calls the reducer makes into its distributed strategy (a recording strategy registered for every model)."""
    calls = []

    class Recording(distributed_module.ReductionStrategy):
        def __init__(self, model, optimizer, timeout):
            calls.append(("created", optimizer is not None, timeout))

        def gathered(self, model):
            calls.append("gathered")
            return super().gathered(model)

        def before_change(self, model):
            calls.append("before_change")

        def share(self, value, what, step):
            calls.append(("share", what))
            return value

        def share_parameters(self, model, layers, step):
            calls.append(("share_parameters", tuple(layers)))

        def after_change(self, model):
            calls.append("after_change")
            return {}

    monkeypatch.setattr(distributed_module, "_STRATEGIES", [])
    distributed_module.register_strategy(lambda model: True, Recording)
    return calls


def test_distributed_strategy_seam_call_order(strategy_calls):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reducer = CompreSSMReducer(model, optimizer, policy="fixed", fraction=0.5, collective_timeout=7.0)
    reducer.reduce_now(1)
    assert strategy_calls == [("created", True, 7.0), "gathered", "before_change", ("share", "the reduction decision"),
                              ("share_parameters", (0, 1)), "after_change"]


def test_best_checkpoint_sizes_go_through_the_reducers_strategy(strategy_calls, tmp_path):
    """Loading the best checkpoint (`load_best_model_at_end`) re-sizes the model through the run's reducer, so the
    distributed strategy is told as at an event or a rollback, and the optimizer state of the re-sized parameters
    is deleted while the other parameters' state is kept."""
    from modeling_compressm.training.checkpoints import restore_checkpoint_sizes

    model = make_model()
    model.save_pretrained(tmp_path / "checkpoint-1")  # the best checkpoint, at 16 states
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    reducer = CompreSSMReducer(model, optimizer, policy="fixed", fraction=0.5)
    model(**batch()).loss.backward()
    optimizer.step()
    reducer.reduce_now(1)
    model(**batch()).loss.backward()
    optimizer.step()
    strategy_calls.clear()
    assert restore_checkpoint_sizes(model, tmp_path / "checkpoint-1", 2, optimizer, reducer=reducer)
    assert strategy_calls == ["gathered", "before_change", "after_change"]
    assert model.config.state_dims == [16, 16] and model.lru_layers()[0].B_re.shape == (16, 16)
    assert [event.kind for event in model.reduction_history] == ["restored"]
    ssm_parameters = [parameter for layer in model.lru_layers() for parameter in layer.ssm_parameters()]
    assert all(not optimizer.state.get(parameter) for parameter in ssm_parameters)
    assert optimizer.state[model.lru_layers()[0].D]  # untouched parameters keep their state


def test_compiled_model_is_accepted():
    model = make_model()
    compiled = torch.compile(model, backend="eager")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    reducer = CompreSSMReducer(compiled, optimizer, policy="fixed", fraction=0.5)
    assert reducer.model is model
    inputs = batch()
    compiled(**inputs).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    reducer.reduce_now(1)
    compiled(**inputs).loss.backward()
    optimizer.step()
    assert model.config.state_dims == [8, 8]


def test_schedule_and_policy_defaults_live_in_one_object():
    inferred = {"policy", "tau", "fraction"}  # None: inferred by ReductionSettings.from_arguments
    for cls in (CompreSSMReducer, CompreSSMCallback):
        # the callback's collective_timeout None is resolved from DEFAULTS (and ddp_timeout) when training starts
        resolved_later = inferred | ({"collective_timeout"} if cls is CompreSSMCallback else set())
        for name, parameter in inspect.signature(cls).parameters.items():
            if hasattr(DEFAULTS, name):
                expected = None if name in resolved_later else getattr(DEFAULTS, name)
                assert parameter.default == expected, (cls.__name__, name)
    callback = CompreSSMCallback()
    assert (callback.policy, callback.tau, callback.fraction) == (DEFAULTS.policy, DEFAULTS.tau, DEFAULTS.fraction)


def test_schedule_fractions_need_max_steps_and_resolve():
    model = make_model()
    without_length = CompreSSMReducer(model, None, end_step=0.5, interval=10)
    with pytest.raises(ValueError, match="max_steps=..."):
        without_length.step(10)
    assert model.config.state_dims == [16, 16]
    reducer = CompreSSMReducer(model, None, start_step=0.1, end_step=0.5, interval=0.1, max_steps=100)
    assert [step for step in range(1, 101) if reducer.is_due(step)] == [10, 20, 30, 40, 50]


def test_tensor_hooks_on_reduced_parameters_keep_firing():
    model = make_model()
    parameter = model.lru_layers()[0].B_re
    gradients, accumulated = [], []
    parameter.register_hook(lambda grad: gradients.append(tuple(grad.shape)))
    parameter.register_post_accumulate_grad_hook(lambda tensor: accumulated.append(tuple(tensor.grad.shape)))
    inputs = batch()
    model(**inputs).loss.backward()
    model.reduce([8, None])
    model.zero_grad()
    model(**inputs).loss.backward()
    assert gradients == [(16, 16), (8, 16)] and accumulated == [(16, 16), (8, 16)]


def test_event_due_while_a_rollback_check_pends_is_skipped_with_a_warning(caplog):
    """Issue 20.6: a plain loop that does not resolve the check of one event before the next is due loses that next
    event; it must say so (and keep the skipped steps), not skip it silently."""
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    reducer = CompreSSMReducer(model, optimizer, policy="rollback", tau=0.05, start_step=2, end_step=6, interval=2)
    data = batch()
    with caplog.at_level("WARNING", logger="modeling_compressm.training.reducer"):
        for step in range(1, 7):
            model(**data).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            reducer.step(step)
    assert [event.step for event in reducer.history] == [2] and reducer.pending is not None
    assert reducer.skipped_steps == [4, 6]
    messages = [record.getMessage() for record in caplog.records]
    assert any("step 4 is skipped" in message and "step 2 still awaits" in message for message in messages)
