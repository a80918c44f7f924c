"""The local backend reusing keys/values: the prefix cache (one shared copy read by a custom attention, or a copy
per row), the revise stage continuing the critique stage's cache, and rows leaving the batch as they end; each gives
the completions of a fresh prefill on the tiny model (offline, CPU)."""

from __future__ import annotations

import inspect

import pytest

from cai.backends.base import Sampling
from cai.core.prompts import critique_messages

from conftest import items_from, make_constitution, prompt_rows

GREEDY = Sampling(temperature=0.0, max_new_tokens=8)


@pytest.fixture(scope="module")
def backend(tiny_backend):
    return tiny_backend


def test_prefix_cache_gives_the_same_greedy_output(tiny_model_dir, backend):
    """Prompts sharing a long prefix (system prompt + exemplars) give the same completions with or without the
    backend's prefix reuse."""
    from cai.backends.local import LocalBackend

    if "prefix_cache" not in inspect.signature(LocalBackend).parameters:
        pytest.skip("this LocalBackend has no prefix cache")
    c = make_constitution(4)
    convs = [critique_messages(c, [{"role": "user", "content": f"Question {i}: how do tides work, {'really ' * i}?"}],
                               f"An answer {i}.", c.principles[i % 4]) for i in range(3)]
    plain = LocalBackend(str(tiny_model_dir), device="cpu", prefix_cache=False)
    cached = LocalBackend(str(tiny_model_dir), device="cpu", prefix_cache=True)
    expected = [c.text for c in plain.generate(convs, GREEDY, seed=0)]
    for _ in range(2):   # the second call reuses the prefix computed by the first
        assert [c.text for c in cached.generate(convs, GREEDY, seed=0)] == expected
    # a batch of one, with the prefix already cached
    assert cached.generate(convs[:1], GREEDY, seed=0)[0].text == expected[0]
    if hasattr(cached, "prefix_hits"):
        assert cached.prefix_hits > 0, "the shared prefix was never reused: this test did not test the cache"


def test_shared_prefix_attention_matches_the_copied_prefix(tiny_model_dir):
    """The two ways of reusing the prefix (one shared copy read by a custom attention, or a copy per row) and no
    reuse at all decode the same greedy tokens, in prefill (rows of different lengths) and over many decode steps."""
    from cai.backends.local import LocalBackend

    c = make_constitution(4)
    convs = [critique_messages(c, [{"role": "user", "content": f"Tell me about tides {'and moons ' * (3 * i)}now."}],
                               f"An answer {'with more words ' * i}.", c.principles[i % 4]) for i in range(4)]
    long = Sampling(temperature=0.0, max_new_tokens=24)
    plain = LocalBackend(str(tiny_model_dir), device="cpu", prefix_cache=False)
    shared = LocalBackend(str(tiny_model_dir), device="cpu", prefix_cache=True)
    copied = LocalBackend(str(tiny_model_dir), device="cpu", prefix_cache=True)
    copied.shared_prefix = False
    assert shared.shared_prefix, "the tiny Llama runs on SDPA, so the shared-prefix attention must be in use"
    expected = plain.generate(convs, long, seed=0)
    for backend in (shared, copied):
        got = backend.generate(convs, long, seed=0)
        assert [g.text for g in got] == [e.text for e in expected]
        assert [g.completion_tokens for g in got] == [e.completion_tokens for e in expected]
        assert backend.prefix_hits == len(convs)


def test_shared_prefix_attention_logits_equal_full_attention(tiny_model_dir):
    """Logit-level check of prefix_attention.py: rows of different lengths after a shared prefix, through the
    prefill and two decode steps, give the logits of plain attention over the whole sequence (to float tolerance)."""
    import torch
    from transformers import DynamicCache

    from cai.backends.local import LocalBackend
    from cai.inference.prefix_attention import SuffixCache

    backend = LocalBackend(str(tiny_model_dir), device="cpu", prefix_cache=True)
    assert backend.shared_prefix
    lm, pad = backend.lm, backend.tokenizer.pad_token_id
    torch.manual_seed(0)
    vocab = lm.config.vocab_size
    prefix = torch.randint(5, vocab, (1, 40))
    suffixes = [torch.randint(5, vocab, (n,)).tolist() for n in (3, 9, 6)]
    width = max(map(len, suffixes))
    ids = torch.tensor([[pad] * (width - len(x)) + x for x in suffixes])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in suffixes])

    with torch.inference_mode():
        prefix_cache = DynamicCache(config=lm.config)
        lm(input_ids=prefix, past_key_values=prefix_cache, use_cache=True)
        cache = SuffixCache(lm.config, prefix_cache)
        positions = 40 + (mask.cumsum(-1) - 1).clamp(min=0)
        shared = lm(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache).logits[:, -1]

        full_ids = torch.cat([prefix.expand(3, -1), ids], 1)
        full_mask = torch.cat([torch.ones(3, 40, dtype=torch.long), mask], 1)
        full_pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
        ref_cache = DynamicCache(config=lm.config)
        ref = lm(input_ids=full_ids, attention_mask=full_mask, position_ids=full_pos,
                 past_key_values=ref_cache).logits[:, -1]
        torch.testing.assert_close(shared, ref, atol=1e-4, rtol=1e-4)

        for _ in range(2):   # decode steps: one query per row, the path that reads the prefix once for all rows
            step = ref.argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
            full_mask = torch.cat([full_mask, torch.ones(3, 1, dtype=torch.long)], 1)
            positions = positions[:, -1:] + 1
            full_pos = full_pos[:, -1:] + 1
            shared = lm(input_ids=step, attention_mask=mask, position_ids=positions,
                        past_key_values=cache).logits[:, -1]
            ref = lm(input_ids=step, attention_mask=full_mask, position_ids=full_pos,
                     past_key_values=ref_cache).logits[:, -1]
            torch.testing.assert_close(shared, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-prefix", "copied-prefix"])
def test_the_revise_stage_continues_the_critique_stages_cache_with_the_same_output(tiny_model_dir, shared):
    """Records generated with the previous call's cache continued (only the revision request fed, not the critique
    prompt and critique again) equal those of a fresh prefill of every stage, greedy, over two rounds; rows that
    drop out or come in another order are matched by their tokens."""
    from cai.backends.local import LocalBackend
    from cai.generate.generator import Generator

    from conftest import items_from, prompt_rows

    c = make_constitution(4)
    items = items_from(prompt_rows(5))
    records = {}
    for cont in (True, False):
        b = LocalBackend(str(tiny_model_dir), device="cpu", continuation=cont)
        if not shared:
            b.shared_prefix = False
        g = Generator(c, b, rounds=2, sampling=Sampling(temperature=0.0, max_new_tokens=12))
        records[cont] = [r.to_json() for r in g.run_batch(g.plan(items))]
        assert (b.continued_tokens > 0) == cont
    for a, b_ in zip(records[True], records[False]):
        assert a["initial"] == b_["initial"] and a["rounds"] == b_["rounds"]
    # the next call takes some of the rows, reordered: still the same completions as a fresh backend gives
    b = LocalBackend(str(tiny_model_dir), device="cpu")
    convs = [critique_messages(c, [{"role": "user", "content": f"Question {i}: how do tides work?"}], f"Answer {i}.",
                               c.principles[i % 4]) for i in range(4)]
    first = b.generate(convs, GREEDY, seed=0)
    revise = [conv + [{"role": "assistant", "content": done.text}, {"role": "user", "content": "Now revise it."}]
              for conv, done in zip(convs, first)]
    order = [2, 0, 3]
    got = [x.text for x in b.generate([revise[i] for i in order], GREEDY, seed=0)]
    fresh = LocalBackend(str(tiny_model_dir), device="cpu", continuation=False)
    assert got == [x.text for x in fresh.generate([revise[i] for i in order], GREEDY, seed=0)]
    assert b.continued_tokens > 0


def test_rows_that_end_early_leave_the_batch_and_the_records_are_generates(tiny_model_dir):
    """With end tokens that stop rows at different steps, two rounds of records (each revise stage continuing the
    critique's cache, rows that left early included) equal those of transformers' own generate loop."""
    from cai.backends.local import LocalBackend
    from cai.generate.generator import Generator

    c = make_constitution(4)
    items = items_from(prompt_rows(5))
    sampling = Sampling(temperature=0.0, max_new_tokens=12)
    probe = LocalBackend(str(tiny_model_dir), device="cpu")
    free = probe.generate([it.messages for it in items], sampling, seed=0)
    toks = [probe.tokenizer(x.text, add_special_tokens=False)["input_ids"] for x in free]
    ends = sorted({toks[0][2], toks[1][6]} - {t[0] for t in toks})
    records, stops = {}, {}
    for own in (True, False):
        b = LocalBackend(str(tiny_model_dir), device="cpu")
        b.own_loop = own
        b.eos_ids = list(b.eos_ids) + ends
        g = Generator(c, b, rounds=2, sampling=sampling)
        records[own] = [r.to_json() for r in g.run_batch(g.plan(items))]
        stops[own] = [x.finish_reason for x in b.generate([it.messages for it in items], sampling, seed=0)]
        assert b.continued_tokens > 0
    assert stops[True] == stops[False] and {"stop", "length"} <= set(stops[True])
    for a, b_ in zip(records[True], records[False]):
        assert a["initial"] == b_["initial"] and a["rounds"] == b_["rounds"]
