"""The growing key/value cache layer: the same keys, values and logits as transformers' DynamicCache, filled in
place (no copy of the cache per step once room is reserved), and every way other code reassigns a layer's keys."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from cai.inference.kv import GrowingLayer, growing, reserve


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def _decode(lm, cache, ids, steps: int):
    """Greedy: a prefill of ``ids`` then ``steps`` single-token steps; each step's logits, and the layers' buffers'
    addresses after each step."""
    mask = torch.ones_like(ids)
    logits, addresses = [], []
    with torch.inference_mode():
        out = lm(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        for _ in range(steps):
            nxt = out.logits[:, -1:].argmax(-1)
            logits.append(out.logits[:, -1])
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            out = lm(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
            addresses.append(tuple(layer._k.data_ptr() for layer in cache.layers if isinstance(layer, GrowingLayer)))
    return torch.stack(logits), addresses


def test_growing_gives_dynamic_caches_logits_and_fills_one_buffer_in_place(lm):
    ids = torch.randint(5, 500, (3, 17), generator=torch.Generator().manual_seed(0))
    want, _ = _decode(lm, DynamicCache(config=lm.config), ids, 12)
    cache = growing(DynamicCache(config=lm.config))
    assert all(isinstance(layer, GrowingLayer) for layer in cache.layers)
    reserve(cache, 17 + 12)
    got, addresses = _decode(lm, cache, ids, 12)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(set(addresses)) == 1                        # room for the whole call: never reallocated
    assert cache.get_seq_length() == 17 + 12 and cache.layers[0].capacity == 17 + 12

    # without a reservation it still works, growing by half again: a few reallocations, not one per step
    cache = growing(DynamicCache(config=lm.config))
    got, addresses = _decode(lm, cache, ids, 12)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert 1 < len(set(addresses)) <= 4 and cache.get_seq_length() == 29


def test_growing_keeps_a_filled_caches_keys_and_takes_reassigned_rows(lm):
    ids = torch.randint(5, 500, (3, 9), generator=torch.Generator().manual_seed(1))
    plain = DynamicCache(config=lm.config)
    with torch.inference_mode():
        lm(input_ids=ids, past_key_values=plain, use_cache=True)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in plain.layers]
    cache = growing(plain)
    for layer, (k, v) in zip(cache.layers, before):
        assert isinstance(layer, GrowingLayer) and torch.equal(layer.keys, k) and torch.equal(layer.values, v)

    # rows selected (as the continuation does), then room made and a step appended: old columns intact
    index = torch.tensor([2, 0])
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, index)
        layer.values = layer.values.index_select(0, index)
    reserve(cache, 4)
    assert cache.layers[0].capacity == 13 and cache.get_seq_length() == 9
    k_new = torch.randn(2, lm.config.num_key_value_heads, 1, lm.config.head_dim)
    keys, values = cache.layers[0].update(k_new, k_new * 2)
    assert torch.equal(keys[..., :9, :], before[0][0][index]) and torch.equal(keys[..., 9:, :], k_new)
    assert torch.equal(values[..., :9, :], before[0][1][index]) and torch.equal(values[..., 9:, :], k_new * 2)

    # cropping and repeating rows go through the same assignment
    cache.crop(-1)
    assert cache.get_seq_length() == 9 and torch.equal(cache.layers[0].keys, before[0][0][index])
    cache.batch_repeat_interleave(2)
    assert cache.layers[0].keys.shape[0] == 4 and torch.equal(cache.layers[0].keys[1], before[0][0][2])
