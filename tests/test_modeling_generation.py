"""Generation with the recurrent cache: every cached decoding path equals its uncached equivalent.

The model is trained briefly on a synthetic next-token task (so greedy continuations vary with the prompt) and then
reduced with `model.reduce` (so the layers have different, reduced state sizes), and every equivalence runs over 20
seeds. `.ci/run` runs this module under the newest and the oldest supported transformers release.
"""

from __future__ import annotations

import copy

import pytest
import torch

from modeling_compressm import CompreSSMCache, CompreSSMConfig, CompreSSMForCausalLM

import generation_checks as checks

VOCAB = 18  # token 0 is padding, 1..17 carry the task
SEEDS = range(20)


def _task_batch(generator: torch.Generator, batch: int, length: int) -> torch.Tensor:
    """Sequences x_{t+1} = (x_t + x_{t-1}) mod 17 + 1 from random starts: the next token depends on the context."""
    tokens = torch.randint(1, VOCAB, (batch, 2), generator=generator)
    while tokens.shape[1] < length:
        tokens = torch.cat([tokens, (tokens[:, -1:] + tokens[:, -2:-1]) % (VOCAB - 1) + 1], dim=1)
    return tokens


@pytest.fixture(scope="module")
def reduced_lm() -> CompreSSMForCausalLM:
    """A tiny LM trained for 120 steps on the task, then reduced from [16, 12] to [7, 5] states."""
    torch.manual_seed(0)
    config = CompreSSMConfig(vocab_size=VOCAB, hidden_size=24, num_hidden_layers=2, state_dims=[16, 12],
                             pad_token_id=0, bos_token_id=None, eos_token_id=None, r_min=0.5)
    model = CompreSSMForCausalLM(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(120):
        batch = _task_batch(generator, 32, 16)
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.reduce([7, 5])
    assert model.config.state_dims == [7, 5]
    return model.eval()


def _prompt(seed: int, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 + seed)
    length = int(torch.randint(3, 9, (1,), generator=generator))
    return torch.randint(1, VOCAB, (batch, length), generator=generator)


def test_the_model_under_test_generates_varied_continuations(reduced_lm):
    """Guard of the equivalence tests below: a model repeating one token could not reveal a wrong cache."""
    continuations = torch.cat([checks.greedy_by_full_forward(reduced_lm, _prompt(seed))[0][:, -8:] for seed in SEEDS])
    assert len(torch.unique(continuations)) >= 8
    changes_within_rows = (continuations.diff(dim=1) != 0).float().mean()
    assert changes_within_rows > 0.5


@pytest.mark.parametrize("argument", ["cache", "past_key_values"])
def test_a_decoding_step_continues_from_the_cached_state(reduced_lm, argument):
    """The cache is read under both names transformers releases use; a step from a zero state would differ."""
    ids = _prompt(0, batch=3)
    with torch.no_grad():
        full = reduced_lm(ids, use_cache=False).logits[:, -1]
        prefix_cache = checks.cache_of(reduced_lm(ids[:, :-1], use_cache=True))
        step = reduced_lm(ids[:, -1:], **{argument: copy.deepcopy(prefix_cache)}).logits[:, -1]
        from_zero_state = reduced_lm(ids[:, -1:], use_cache=False).logits[:, -1]
    torch.testing.assert_close(step, full, **checks.LOGITS_TOLERANCE)
    assert (from_zero_state - full).abs().max() > 0.1  # the comparison can tell a restarted state apart


def test_cache_is_refused_under_both_names_at_once_and_when_it_is_not_a_compressm_cache(reduced_lm):
    ids = _prompt(0)
    cache = checks.cache_of(reduced_lm(ids, use_cache=True))
    with pytest.raises(ValueError, match="not both"):
        reduced_lm(ids[:, -1:], cache=cache, past_key_values=cache)
    from transformers import DynamicCache

    with pytest.raises(TypeError, match="CompreSSMCache"):
        reduced_lm(ids, cache=DynamicCache())


@pytest.mark.parametrize("seed", SEEDS)
def test_cached_greedy_equals_uncached_greedy(reduced_lm, seed):
    checks.assert_cached_greedy_matches_uncached(reduced_lm, _prompt(seed))


@pytest.mark.parametrize("seed", SEEDS)
def test_cached_sampling_equals_uncached_sampling_with_a_fixed_seed(reduced_lm, seed):
    checks.assert_cached_sampling_matches_uncached(reduced_lm, _prompt(seed), seed=seed)


@pytest.mark.parametrize("seed", SEEDS)
def test_cached_beam_search_equals_uncached_beam_search(reduced_lm, seed):
    checks.assert_cached_beam_search_matches_uncached(reduced_lm, _prompt(seed))


@pytest.mark.parametrize("seed", SEEDS)
def test_left_padded_batch_equals_each_row_alone(reduced_lm, seed):
    generator = torch.Generator().manual_seed(2000 + seed)
    prompts = [torch.randint(1, VOCAB, (int(n),), generator=generator) for n in torch.randint(2, 10, (3,))]
    checks.assert_padded_batch_matches_rows(reduced_lm, prompts, pad_token_id=0)


def test_padded_steps_inside_a_sequence_leave_the_state_untouched(reduced_lm):
    """A hole in the mask: the steps after it see the state the steps before it left, as if the hole were cut out."""
    ids = _prompt(4, batch=1)[:, :6].repeat(1, 2)[:, :9]
    mask = torch.ones_like(ids)
    mask[0, 3:5] = 0
    with torch.no_grad():
        with_hole = reduced_lm(ids, attention_mask=mask, use_cache=True)
        cut_out = reduced_lm(ids[:, mask[0].bool()], use_cache=True)
    torch.testing.assert_close(with_hole.logits[:, mask[0].bool()], cut_out.logits, **checks.LOGITS_TOLERANCE)
    for layer in range(2):
        torch.testing.assert_close(checks.cache_of(with_hole).get_state(layer), checks.cache_of(cut_out).get_state(layer))


@pytest.mark.parametrize("seed", range(5))
def test_left_padded_cached_greedy_equals_a_greedy_loop_of_full_forwards(reduced_lm, seed):
    ids = _prompt(seed, batch=3)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[1, :1] = 0
    checks.assert_cached_greedy_matches_uncached(reduced_lm, ids.masked_fill(mask == 0, 0), attention_mask=mask)


@pytest.mark.parametrize("seed", range(5))
def test_generate_continues_from_a_returned_cache(reduced_lm, seed):
    checks.assert_generation_continues_from_returned_cache(reduced_lm, _prompt(seed))


@pytest.mark.parametrize("seed", range(5))
def test_left_padded_second_turn_from_a_returned_cache_equals_a_greedy_loop_of_full_forwards(reduced_lm, seed):
    """A chat-style second turn: a left-padded batch generates, then continues from the cache that call returned with
    more prompt tokens and the mask extended over them; it equals full forwards over the whole masked sequence."""
    ids = _prompt(seed, batch=3)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[2, :1] = 0
    first = checks.generate(reduced_lm, ids.masked_fill(mask == 0, 0), 3, attention_mask=mask)
    new_steps = first.sequences.shape[1] - ids.shape[1] + 2
    second_turn = torch.cat([first.sequences, ids[:, -2:]], dim=1)
    second_mask = torch.cat([mask, mask.new_ones(3, new_steps)], dim=1)
    continued = checks.generate(reduced_lm, second_turn, 5, attention_mask=second_mask, cache=checks.cache_of(first))
    reference, reference_logits = checks.greedy_by_full_forward(reduced_lm, second_turn, second_mask, new_tokens=5)
    assert torch.equal(continued.sequences, reference)
    torch.testing.assert_close(torch.stack(continued.logits, 1), reference_logits, **checks.LOGITS_TOLERANCE)


@pytest.mark.parametrize("seed", range(5))
def test_generate_from_inputs_embeds_equals_generate_from_ids(reduced_lm, seed):
    checks.assert_generation_from_inputs_embeds_matches_ids(reduced_lm, _prompt(seed))


def test_greedy_beam_search_of_one_beam_equals_greedy(reduced_lm):
    prompt = _prompt(3)
    assert torch.equal(checks.generate(reduced_lm, prompt, num_beams=1).sequences,
                       checks.generate(reduced_lm, prompt).sequences)


def test_cache_reorder_and_batch_operations_move_every_layer_state(reduced_lm):
    cache = checks.cache_of(reduced_lm(_prompt(1, batch=3), use_cache=True))
    assert isinstance(cache, CompreSSMCache) and [cache.get_state(i).shape[-1] for i in range(2)] == [7, 5]
    before = [cache.get_state(i).clone() for i in range(2)]
    order = torch.tensor([2, 0, 0])
    cache.reorder_cache(order)
    assert all(torch.equal(cache.get_state(i), before[i][order]) for i in range(2))
    cache.batch_repeat_interleave(2)
    assert all(torch.equal(cache.get_state(i), before[i][order].repeat_interleave(2, dim=0)) for i in range(2))
    with pytest.raises(NotImplementedError, match="rolled back"):
        cache.crop(2)


def test_static_cache_implementations_are_refused_with_a_clear_message(reduced_lm):
    with pytest.raises(ValueError, match="cache_implementation"):
        reduced_lm.generate(_prompt(0), max_new_tokens=2, cache_implementation="static")

