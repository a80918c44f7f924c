"""Each row's next token: a seed gives the same sample alone or batched, top-p stays inside the nucleus, and
log-probabilities are the model's own."""

from __future__ import annotations

import asyncio

import pytest
import torch
from fixtures.engine_fixtures import TINY, run

from server.engine import (
    Delta,
    Done,
    GenParams,
)

from conftest import LONG, MEDIUM, SHORT

pytest_plugins = ["fixtures.engine_fixtures"]     # make_engine, engine, reference


# ---------------------------------------------------------------------------------------------------------------
# Seeds


def test_a_seed_gives_the_same_sample_alone_or_batched(make_engine):
    sampled = GenParams(max_tokens=16, temperature=1.0, seed=7)
    e = make_engine(max_batch=8)
    alone = run(e, "base", MEDIUM, sampled).text
    again = run(e, "base", MEDIUM, sampled).text
    crowd = make_engine(start=False, max_batch=8)
    others = [crowd.submit("base", c, GenParams(max_tokens=16, temperature=1.0, seed=k))
              for k, c in enumerate([LONG, SHORT, TINY])]
    mine = crowd.submit("base", MEDIUM, sampled)
    crowd.start()
    batched = mine.result(30).text
    for h in others:
        h.result(30)
    assert crowd.batch_sizes[4] >= 1                         # it really shared a wave
    assert alone == again == batched
    different = {run(e, "base", MEDIUM, GenParams(max_tokens=16, temperature=1.0, seed=s)).text
                 for s in range(1, 5)}
    assert len(different | {alone}) > 1


def test_top_p_keeps_sampling_inside_the_nucleus(engine, reference):
    # top_p this small keeps only the most likely token: sampling then equals greedy decoding
    done = run(engine, "base", LONG, GenParams(max_tokens=12, temperature=1.0, top_p=1e-6, seed=1))
    assert done.text == reference.greedy(LONG, 12)[0]


# ---------------------------------------------------------------------------------------------------------------
# Log-probabilities


def teacher_forced_logprobs(reference, messages, tokens) -> torch.Tensor:
    """log_softmax of the reference model's logits at each generated position: [len(tokens), vocab]."""
    text = reference.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = reference.tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        logits = reference.lm(input_ids=torch.tensor([prompt + tokens])).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1:len(prompt) - 1 + len(tokens)], dim=-1)


def test_logprobs_are_the_models_own_and_stream_with_the_text(engine, reference):
    params = GenParams(max_tokens=12, temperature=0.0, logprobs=5)
    deltas, done = asyncio.run(_collect_stream(engine, SHORT, params))
    lps = done.logprobs
    assert lps and engine.tokenizer.decode([t.token for t in lps]) == done.text     # one entry per token of the text
    assert not {t.token for t in lps} & set(engine.tokenizer.all_special_ids)
    assert tuple(x for d in deltas for x in d.logprobs) == lps[:sum(len(d.logprobs) for d in deltas)]
    expected = teacher_forced_logprobs(reference, SHORT, [t.token for t in lps])
    for t, row in zip(lps, expected):
        assert t.logprob == pytest.approx(float(row[t.token]), abs=1e-4)
        top = row.topk(5)
        assert [i for i, _ in t.top] == top.indices.tolist()           # likeliest first
        assert [lp for _, lp in t.top] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert t.top[0][0] == t.token                                   # greedy picks the likeliest
    plain = run(engine, "base", SHORT, GenParams(max_tokens=12, temperature=0.0))
    assert plain.logprobs is None and plain.text == done.text          # asking for them changes no token
    assert run(engine, "base", SHORT, GenParams(max_tokens=2, temperature=0.0, logprobs=0)).logprobs[0].top == ()
    with pytest.raises(ValueError, match="logprobs"):
        GenParams(max_tokens=2, logprobs=-1)


async def _collect_stream(engine, messages, params) -> tuple[list[Delta], Done]:
    deltas: list[Delta] = []
    async for event in engine.stream("base", messages, params):
        if isinstance(event, Done):
            return deltas, event
        deltas.append(event)
    raise AssertionError("the stream ended without Done")
