"""The local backend's decode loop against transformers' ``generate``: the same tokens (greedy and sampled) and the
same keys/values in every real column of the cache it leaves, with rows leaving the batch at different steps."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from cai.backends.local import TopPSampler
from cai.inference.batching import left_pad
from cai.inference.decode import decode
from cai.inference.kv import growing, reserve

PAD = 1
STEPS = 20


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def _rows():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(5, 500, (n,), generator=g).tolist() for n in (7, 12, 4, 9)]


def _reference(lm, padded, eos, sampler=None):
    cache = DynamicCache(config=lm.config)
    extra = {"logits_processor": [sampler]} if sampler else {}
    with torch.inference_mode():
        out = lm.generate(input_ids=padded.ids, attention_mask=padded.mask, past_key_values=cache, do_sample=False,
                          max_new_tokens=STEPS, eos_token_id=eos, pad_token_id=PAD, temperature=None, top_p=None,
                          top_k=None, **extra)
    return out[:, padded.ids.shape[1]:].tolist(), cache


def _ours(lm, padded, eos, sampler=None):
    cache = growing(DynamicCache(config=lm.config))
    reserve(cache, padded.ids.shape[1] + STEPS)
    with torch.inference_mode():
        done = decode(lm, padded.ids, padded.mask, cache, max_new_tokens=STEPS, eos_ids=eos, pad_id=PAD,
                      pick=sampler.draw if sampler else None)
    return done, cache


def _ending_tokens(lm, padded, sampler_seed=None) -> list[int]:
    """End tokens that stop the rows at different steps: tokens each row makes once it is a few steps in."""
    sampler = TopPSampler(1.0, 0.95, sampler_seed) if sampler_seed is not None else None
    free, _ = _reference(lm, padded, [10**6], sampler)
    return sorted({row[k] for k, row in zip((2, 6, 11), free)} - {row[0] for row in free})


@pytest.mark.parametrize("seed", [None, 7], ids=["greedy", "sampled"])
def test_the_tokens_and_the_kept_cache_are_generates_with_rows_leaving_early(lm, seed):
    padded = left_pad(_rows(), PAD)
    eos = _ending_tokens(lm, padded, seed)
    mk = (lambda: TopPSampler(1.0, 0.95, seed)) if seed is not None else (lambda: None)
    want, ref_cache = _reference(lm, padded, eos, mk())
    done, cache = _ours(lm, padded, eos, mk())
    assert done.tokens == want
    ends = [next((k for k, t in enumerate(row) if t in eos), None) for row in want]
    assert len({e for e in ends if e is not None}) >= 2 and ends.count(None) < len(ends), ends  # left early

    # each row's real columns (prompt, and every generated token fed back, its end token included) are generate's
    assert sorted(done.slots) == list(range(4))
    width = padded.ids.shape[1]
    assert cache.get_seq_length() == ref_cache.get_seq_length() == width + len(want[0]) - 1
    for slot, row in enumerate(done.slots):   # padding columns hold no token of the row, masked by both
        fed = min((ends[row] + 1) if ends[row] is not None else STEPS, len(want[0]) - 1)
        real = torch.cat([padded.mask[row].nonzero().flatten(), torch.arange(width, width + fed)])
        for ours, ref in zip(cache.layers, ref_cache.layers):
            torch.testing.assert_close(ours.keys[slot, :, real], ref.keys[row, :, real], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ours.values[slot, :, real], ref.values[row, :, real], rtol=1e-5, atol=1e-5)


def test_a_cache_of_plain_layers_is_refused(lm):
    padded = left_pad(_rows(), PAD)
    with pytest.raises(TypeError, match="GrowingLayer"):
        decode(lm, padded.ids, padded.mask, DynamicCache(config=lm.config), max_new_tokens=2, eos_ids=[0],
               pad_id=PAD)


def test_a_call_with_nothing_left_to_feed_is_refused(lm):
    padded = left_pad(_rows(), PAD)
    cache = growing(DynamicCache(config=lm.config))
    with torch.inference_mode():
        lm(input_ids=padded.ids, attention_mask=padded.mask, past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="no token left to feed"):
        decode(lm, padded.ids, padded.mask, cache, max_new_tokens=2, eos_ids=[0], pad_id=PAD)
