"""Generation equivalences, shared by test_modeling_common.py (the common tests' tiny model) and
test_modeling_generation.py (a briefly trained, reduced model, over many seeds).

Every check compares generated tokens and the logits behind them: a cache that restarted from a zero state, lost a
padded step or was reordered wrongly changes the logits even where an untrained model would emit the same tokens.
"""

from __future__ import annotations

import copy

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers 5.24 renamed the cache argument/output field from `past_key_values` to `cache`.
CACHE_ARGUMENT = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
LOGITS_TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}


def cache_of(output):
    """The cache returned by a forward or by generate(return_dict_in_generate=True)."""
    return getattr(output, CACHE_ARGUMENT)


def generate(model, input_ids=None, new_tokens=8, attention_mask=None, inputs_embeds=None, cache=None, **settings):
    """model.generate with a dict output and per-step logits; `settings` override the generation config.

    The model's own config is used without an end-of-sequence token, so every run produces all `new_tokens`.
    """
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = None
    config.pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    settings = {"do_sample": False, "return_dict_in_generate": True, "output_logits": True, **settings}
    unused = config.update(max_new_tokens=new_tokens, **settings)
    assert not unused, unused
    inputs = {"attention_mask": attention_mask, "inputs_embeds": inputs_embeds, CACHE_ARGUMENT: cache}
    with torch.no_grad():
        return model.generate(input_ids, generation_config=config, **{k: v for k, v in inputs.items() if v is not None})


def greedy_by_full_forward(model, input_ids, attention_mask=None, new_tokens=8):
    """Reference decoding without a cache: one full forward over the whole sequence per new token.

    Returns: tokens int64 (batch, L + new_tokens), logits float32 (batch, new_tokens, vocab).
    """
    ids, mask, steps = input_ids, attention_mask, []
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(ids, attention_mask=mask, use_cache=False).logits[:, -1]
            steps.append(logits)
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return ids, torch.stack(steps, dim=1)


def assert_cached_greedy_matches_uncached(model, input_ids, attention_mask=None, new_tokens=8):
    """generate() with and without the cache equals a plain greedy loop of full forwards, in tokens and logits."""
    reference, reference_logits = greedy_by_full_forward(model, input_ids, attention_mask, new_tokens)
    for use_cache in (True, False):
        output = generate(model, input_ids, new_tokens, attention_mask=attention_mask, use_cache=use_cache)
        assert torch.equal(output.sequences, reference), f"use_cache={use_cache}"
        torch.testing.assert_close(torch.stack(output.logits, dim=1), reference_logits, **LOGITS_TOLERANCE)
    return reference


def assert_cached_sampling_matches_uncached(model, input_ids, seed, new_tokens=8):
    """Sampling with a fixed seed draws the same tokens with and without the cache."""
    outputs = []
    for use_cache in (True, False):
        torch.manual_seed(seed)
        outputs.append(generate(model, input_ids, new_tokens, do_sample=True, top_k=0, use_cache=use_cache))
    cached, uncached = outputs
    torch.testing.assert_close(torch.stack(cached.logits, 1), torch.stack(uncached.logits, 1), **LOGITS_TOLERANCE)
    assert torch.equal(cached.sequences, uncached.sequences)
    return cached.sequences


def assert_cached_beam_search_matches_uncached(model, input_ids, num_beams=3, new_tokens=6):
    """Beam search (which reorders the cached states every step) equals beam search without a cache."""
    outputs = [
        generate(model, input_ids, new_tokens, num_beams=num_beams, use_cache=use_cache, output_scores=True)
        for use_cache in (True, False)
    ]
    cached, uncached = outputs
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, **LOGITS_TOLERANCE)
    return cached.sequences


def assert_padded_batch_matches_rows(model, prompts: list[torch.Tensor], pad_token_id: int, new_tokens=8):
    """A left-padded batch generates, row by row, what each prompt generates alone (tokens and logits)."""
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = prompt
        attention_mask[row, width - len(prompt):] = 1
    batch = generate(model, input_ids, new_tokens, attention_mask=attention_mask)
    batch_logits = torch.stack(batch.logits, dim=1)
    for row, prompt in enumerate(prompts):
        alone = generate(model, prompt[None], new_tokens)
        assert torch.equal(batch.sequences[row, width - len(prompt):], alone.sequences[0]), f"row {row}"
        torch.testing.assert_close(batch_logits[row], torch.stack(alone.logits, dim=1)[0], **LOGITS_TOLERANCE)


def assert_generation_continues_from_returned_cache(model, input_ids, first_tokens=3, new_tokens=5):
    """generate() continued from the cache an earlier generate() returned, after appending more prompt tokens (a
    second turn), equals generate() on the whole sequence without a cache."""
    first = generate(model, input_ids, first_tokens)
    cache = cache_of(first)
    assert cache is not None and cache.get_seq_length() == first.sequences.shape[1] - 1
    second_turn = torch.cat([first.sequences, input_ids[:, :2]], dim=1)
    continued = generate(model, second_turn, new_tokens, cache=cache)
    from_scratch = generate(model, second_turn, new_tokens, use_cache=False)
    assert torch.equal(continued.sequences, from_scratch.sequences)
    torch.testing.assert_close(torch.stack(continued.logits, 1), torch.stack(from_scratch.logits, 1),
                               **LOGITS_TOLERANCE)


def assert_generation_from_inputs_embeds_matches_ids(model, input_ids, new_tokens=6):
    """A prompt given as embeddings generates what the same prompt given as token ids generates."""
    reference = generate(model, input_ids, new_tokens)
    inputs_embeds = model.get_input_embeddings()(input_ids).detach()
    for use_cache in (True, False):
        output = generate(model, None, new_tokens, inputs_embeds=inputs_embeds, use_cache=use_cache)
        assert torch.equal(output.sequences[:, -new_tokens:], reference.sequences[:, -new_tokens:]), use_cache
        torch.testing.assert_close(
            torch.stack(output.logits, 1), torch.stack(reference.logits, 1), **LOGITS_TOLERANCE
        )
