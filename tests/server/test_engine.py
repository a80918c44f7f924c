"""The server's inference engine on the tiny model (offline, CPU): greedy output equal to ``generate``, batching,
streaming, stop strings, seeds, cancellation, the bounded queue, drain, adapters, failures, and EngineBackend."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from cai.backends.base import Sampling
from cai.core.errors import ContextLengthError, ModelError
from cai.generate.generator import Generator
from server.engine import (
    Delta,
    Done,
    Engine,
    EngineBackend,
    EngineStopped,
    GenParams,
    QueueFull,
    UnknownModel,
)
from server.engine.request import Request as _Request

from conftest import LONG, MEDIUM, SHORT, items_from, make_constitution, prompt_rows

TINY = [{"role": "user", "content": "x"}]
CONVERSATIONS = [SHORT, MEDIUM, LONG, TINY]

GREEDY = GenParams(max_tokens=24, temperature=0.0)
# On the tiny model the greedy answer to SHORT is a three-token loop with no end-of-sequence token: a request that
# runs until it is stopped.
ENDLESS = GenParams(max_tokens=3000, temperature=0.0)


# ---------------------------------------------------------------------------------------------------------------
# Fixtures and references


@pytest.fixture
def make_engine(tiny_model_dir):
    """A factory of engines on the tiny model (not started unless start=True); all drained at teardown."""
    engines: list[Engine] = []

    def make(start: bool = True, **kwargs) -> Engine:
        kwargs.setdefault("device", "cpu")
        engine = Engine(str(tiny_model_dir), **kwargs)
        engines.append(engine)
        if start:
            engine.start()
        return engine

    yield make
    for engine in engines:
        engine.drain(timeout=5)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    """A shared, started engine for tests that do not look at its counters."""
    e = Engine(str(tiny_model_dir), device="cpu", max_batch=8)
    e.start()
    yield e
    e.drain(timeout=5)


class Reference:
    """What transformers' own ``generate`` (greedy, one prompt alone) gives."""

    def __init__(self, model_dir, adapter_dir=None, dtype=torch.float32):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        if adapter_dir is not None:
            from peft import PeftModel

            lm = PeftModel.from_pretrained(lm, str(adapter_dir))
        self.lm = lm.eval()
        self.eos = self.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def greedy(self, messages, max_tokens: int) -> tuple[str, int, str]:
        """(text, tokens produced with the end-of-sequence one, finish reason)."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.inference_mode():
            out = self.lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                   do_sample=False, eos_token_id=self.eos, pad_token_id=self.tokenizer.pad_token_id)
        new = out[0, ids.shape[1]:].tolist()
        if self.eos in new:
            cut = new.index(self.eos)
            return self.tokenizer.decode(new[:cut], skip_special_tokens=True), cut + 1, "stop"
        return self.tokenizer.decode(new, skip_special_tokens=True), len(new), "length"


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return Reference(tiny_model_dir)


def run(engine: Engine, model: str, messages, params: GenParams, timeout: float = 30) -> Done:
    return engine.submit(model, messages, params).result(timeout)


async def collect(events) -> tuple[list[str], Done]:
    deltas: list[str] = []
    async for event in events:
        if isinstance(event, Delta):
            deltas.append(event.text)
        else:
            return deltas, event
    raise AssertionError("the stream ended without Done")


def wait_until(condition, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


# ---------------------------------------------------------------------------------------------------------------
# 1. Greedy decoding equals generate, alone and in a wave


def test_greedy_alone_equals_hf_generate(engine, reference):
    for conv in CONVERSATIONS:
        done = run(engine, "base", conv, GREEDY)
        text, tokens, reason = reference.greedy(conv, GREEDY.max_tokens)
        assert (done.text, done.completion_tokens, done.finish_reason) == (text, tokens, reason)


def test_a_bf16_engine_decodes_like_generate_in_bf16(make_engine, tiny_model_dir):
    # `cai serve --dtype auto` picks bf16 on a CPU with bf16 in hardware: that path is the same decode loop
    e = make_engine(dtype="bfloat16", max_batch=8)
    assert e.dtype == "bfloat16" and next(e._lm.parameters()).dtype == torch.bfloat16
    reference = Reference(tiny_model_dir, dtype=torch.bfloat16)
    for conv in CONVERSATIONS:
        done = run(e, "base", conv, GREEDY)
        assert (done.text, done.completion_tokens, done.finish_reason) == reference.greedy(conv, GREEDY.max_tokens)


def test_greedy_in_a_wave_of_four_different_lengths_equals_hf_generate(make_engine, reference):
    e = make_engine(start=False, max_batch=8)
    lengths = {e.count_tokens(c) for c in CONVERSATIONS}
    assert len(lengths) == 4                        # four different prompt lengths share the wave
    # one of the rows samples and another has a stop string: the greedy rows must not care
    params = [GREEDY, GenParams(max_tokens=24, temperature=1.0, seed=3), GREEDY,
              GenParams(max_tokens=24, temperature=0.0, stop=("zzz-never",))]
    handles = [e.submit("base", c, p) for c, p in zip(CONVERSATIONS, params)]
    e.start()                                       # all four wait: the first wave takes them together
    results = [h.result(30) for h in handles]
    sizes = e.batch_sizes
    assert sizes[4] >= 1 and max(sizes) == 4        # the prefill (at least) ran the four rows in one pass
    for i in (0, 2, 3):
        text, tokens, reason = reference.greedy(CONVERSATIONS[i], 24)
        assert (results[i].text, results[i].completion_tokens, results[i].finish_reason) == (text, tokens, reason)


def test_the_template_head_computed_once_changes_no_token(make_engine, reference, monkeypatch):
    # the tiny chat template's head ("<|im_start|>user\n") is shorter than the default minimum: allow it here
    monkeypatch.setattr(Engine, "MIN_HEAD", 1)
    e = make_engine(start=False, max_batch=8)
    convs = [c for c in CONVERSATIONS if tuple(e.encode(c)[:len(e.head)]) == e.head]
    assert e.head and len(convs) >= 3
    handles = [e.submit("base", c, GREEDY) for c in convs]
    e.start()
    results = [h.result(30) for h in handles]
    assert e.head_rows == len(convs)                 # every row's prefill reused the head
    for conv, done in zip(convs, results):
        text, tokens, reason = reference.greedy(conv, GREEDY.max_tokens)
        assert (done.text, done.completion_tokens, done.finish_reason) == (text, tokens, reason)
    # and a wave joined later reuses the same head cache
    later = run(e, "base", convs[0], GREEDY)
    assert later.text == results[0].text and e.head_rows == len(convs) + 1


def test_a_request_admitted_into_a_running_wave_is_still_exact(make_engine, reference):
    e = make_engine(max_batch=4)

    async def main():
        long_events = e.stream("base", SHORT, ENDLESS)
        first = await long_events.__anext__()                   # the long request is decoding now
        assert isinstance(first, Delta)
        joining = e.submit("base", MEDIUM, GREEDY)
        done = await asyncio.to_thread(joining.result, 30)
        assert not long_events.handle.done                       # it joined the running wave: no wait for the end
        await long_events.aclose()
        return done

    done = asyncio.run(main())
    text, tokens, reason = reference.greedy(MEDIUM, GREEDY.max_tokens)
    assert (done.text, done.completion_tokens, done.finish_reason) == (text, tokens, reason)
    assert e.batch_sizes[2] >= 1


def test_without_continuous_batching_a_new_request_waits_for_the_wave(make_engine):
    e = make_engine(max_batch=4, continuous=False)
    first = e.submit("base", SHORT, GenParams(max_tokens=300, temperature=0.0))
    assert wait_until(lambda: e.in_flight == 1)
    second = e.submit("base", MEDIUM, GenParams(max_tokens=4, temperature=0.0))
    second.result(30)
    assert first.done and first.result().finish_reason == "length"
    assert max(e.batch_sizes) == 1


# ---------------------------------------------------------------------------------------------------------------
# 2. Streaming text and usage


def test_deltas_concatenate_to_the_text_and_usage_is_counted(engine, reference):
    async def main():
        return [await collect(engine.stream("base", c, GREEDY)) for c in CONVERSATIONS]

    for conv, (deltas, done) in zip(CONVERSATIONS, asyncio.run(main())):
        assert all(deltas)                                       # no empty delta
        assert "".join(deltas) == done.text
        assert done.prompt_tokens == engine.count_tokens(conv)
        text, tokens, _ = reference.greedy(conv, GREEDY.max_tokens)
        assert done.text == text and done.completion_tokens == tokens


def _feed(engine: Engine, token_ids: list[int], params: GenParams) -> tuple[list[str], str | None, str]:
    """Push tokens through the engine's per-token text handling, as the worker does; (deltas, reason, text)."""
    events: list = []
    request = _Request("base", [1], params, torch.Generator(), events.append)
    reason = None
    for token in token_ids:
        reason = engine._on_token(request, token)
        if reason:
            break
    return [e.text for e in events], reason, request.text


def test_partial_utf8_characters_are_held_back(engine):
    text = "é€😀 naïve"
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text) - 3                 # the tokenizer splits these characters into several tokens
    deltas, reason, _ = _feed(engine, ids, GenParams(max_tokens=len(ids), temperature=0.0))
    assert reason == "length"
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)   # never a half character on the wire


def test_stop_strings_hold_back_text_until_decided(engine):
    ids = engine.tokenizer("Hello world, hello moon", add_special_tokens=False)["input_ids"]
    deltas, reason, _ = _feed(engine, ids, GenParams(max_tokens=100, stop=("o moon", "wor")))
    assert reason == "stop"
    assert "".join(deltas) == "Hello "              # the earliest stop string wins; its start was never sent
    deltas, reason, _ = _feed(engine, ids, GenParams(max_tokens=100, stop=("o moon",)))
    assert "".join(deltas) == "Hello world, hell" and reason == "stop"
    deltas, reason, _ = _feed(engine, ids + [engine.eos_ids[0]], GenParams(max_tokens=100, stop=("xyzzy",)))
    assert "".join(deltas) == "Hello world, hello moon" and reason == "stop"   # held-back text flushed at the end


# ---------------------------------------------------------------------------------------------------------------
# 3. max_tokens and stop strings end a request


def test_max_tokens_ends_with_length(engine, reference):
    done = run(engine, "base", MEDIUM, GenParams(max_tokens=5, temperature=0.0))
    assert done.finish_reason == "length" and done.completion_tokens == 5
    assert done.text == reference.greedy(MEDIUM, 5)[0]


def test_a_stop_string_cuts_the_text_before_it(engine, reference):
    full, _, _ = reference.greedy(MEDIUM, 40)
    stop = full[12:15]
    assert stop and full.index(stop) >= 1

    async def main():
        return await collect(engine.stream("base", MEDIUM, GenParams(max_tokens=40, temperature=0.0, stop=(stop,))))

    deltas, done = asyncio.run(main())
    assert done.finish_reason == "stop"
    assert done.text == full[:full.index(stop)]
    assert "".join(deltas) == done.text                      # nothing of the stop string, or after it, was streamed
    assert done.completion_tokens < 40


# ---------------------------------------------------------------------------------------------------------------
# 4. Seeds


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
# 5. Cancellation


def test_closing_the_stream_cancels_the_request(make_engine):
    e = make_engine()

    async def main():
        events = e.stream("base", SHORT, ENDLESS)
        first = await events.__anext__()
        assert isinstance(first, Delta)
        await events.aclose()
        return events.handle

    handle = asyncio.run(main())
    done = handle.result(timeout=2)
    assert done.finish_reason == "cancelled"
    assert 0 < done.completion_tokens < ENDLESS.max_tokens
    assert wait_until(lambda: e.in_flight == 0)
    assert run(e, "base", MEDIUM, GenParams(max_tokens=4, temperature=0.0)).finish_reason == "length"


def test_cancelling_the_reading_task_cancels_the_request(make_engine):
    e = make_engine()

    async def main():
        events = e.stream("base", SHORT, ENDLESS)
        started = asyncio.Event()

        async def read():
            async for _ in events:
                started.set()

        task = asyncio.create_task(read())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return events.handle

    assert asyncio.run(main()).result(timeout=2).finish_reason == "cancelled"
    assert wait_until(lambda: e.in_flight == 0)


def test_cancelling_a_queued_request_frees_its_place_at_once(make_engine):
    e = make_engine(start=False, queue_size=1)
    handle = e.submit("base", SHORT, GREEDY)
    assert e.queue_depth == 1
    handle.cancel()
    assert e.queue_depth == 0
    assert handle.result(timeout=0).finish_reason == "cancelled"
    e.submit("base", SHORT, GREEDY)                          # the place is free again


# ---------------------------------------------------------------------------------------------------------------
# 6. The bounded queue


def test_queue_full_is_raised_with_a_retry_estimate(make_engine):
    e = make_engine(start=False, max_batch=1, queue_size=1)
    first = e.submit("base", SHORT, ENDLESS)
    with pytest.raises(QueueFull) as info:
        e.submit("base", MEDIUM, GREEDY)
    assert info.value.retry_after >= 1

    async def from_the_loop():
        with pytest.raises(QueueFull):
            e.stream("base", MEDIUM, GREEDY)                 # raised by the call itself, before any event

    asyncio.run(from_the_loop())
    with pytest.raises(QueueFull):
        e.submit("base", MEDIUM, GREEDY, block=True, timeout=0.05)
    e.start()
    assert wait_until(lambda: e.queue_depth == 0)            # the worker took the first: a place is free
    second = e.submit("base", MEDIUM, GREEDY)
    first.cancel()
    assert second.result(30).finish_reason == "length"


# ---------------------------------------------------------------------------------------------------------------
# 7. Drain


def test_drain_finishes_everything_then_refuses_work(make_engine, reference):
    e = make_engine(max_batch=2, queue_size=8)
    handles = [e.submit("base", c, GREEDY) for c in CONVERSATIONS + CONVERSATIONS[:2]]
    e.drain(timeout=30)
    assert not e.running
    for conv, h in zip(CONVERSATIONS + CONVERSATIONS[:2], handles):
        done = h.result(timeout=0)
        assert done.finish_reason in ("stop", "length")
        assert done.text == reference.greedy(conv, GREEDY.max_tokens)[0]
    with pytest.raises(EngineStopped):
        e.submit("base", SHORT, GREEDY)


def test_drain_with_a_timeout_cancels_what_is_left(make_engine):
    e = make_engine(max_batch=1)
    running = e.submit("base", SHORT, ENDLESS)
    queued = e.submit("base", MEDIUM, ENDLESS)
    assert wait_until(lambda: e.in_flight == 1)
    e.drain(timeout=0.1)
    assert not e.running
    assert running.result(timeout=0).finish_reason == "cancelled"
    assert queued.result(timeout=0).finish_reason == "cancelled"


# ---------------------------------------------------------------------------------------------------------------
# 8. Adapters


def _lora_adapter(model_dir, out, seed: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                               task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:                             # B starts at zero (a no-op adapter): make it act
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"sft": _lora_adapter(tiny_model_dir, root / "sft", 1),
            "dpo": _lora_adapter(tiny_model_dir, root / "dpo", 2)}


def test_adapters_are_served_beside_the_base_model(make_engine, adapter_dirs, tiny_model_dir, reference):
    e = make_engine(start=False, adapters={k: str(v) for k, v in adapter_dirs.items()})
    assert e.model_names == ["base", "sft", "dpo"]
    # interleaved requests for three models: each wave holds one model only
    order = [("base", MEDIUM), ("sft", MEDIUM), ("base", LONG), ("dpo", MEDIUM), ("sft", LONG)]
    handles = [e.submit(name, conv, GREEDY) for name, conv in order]
    e.start()
    results = [h.result(30).text for h in handles]
    refs = {"base": reference, **{k: Reference(tiny_model_dir, v) for k, v in adapter_dirs.items()}}
    for (name, conv), text in zip(order, results):
        assert text == refs[name].greedy(conv, GREEDY.max_tokens)[0], name
    assert results[1] != results[0]                          # the adapter changes the output
    assert results[3] not in (results[0], results[1])
    assert max(e.batch_sizes) == 2                           # base+base, then sft+sft, then dpo


def test_bad_adapters_are_model_errors(tiny_model_dir, tmp_path, adapter_dirs):
    with pytest.raises(ModelError, match="adapter 'x'.*does not exist"):
        Engine(str(tiny_model_dir), {"x": str(tmp_path / "missing")}, device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="adapter 'y'.*no adapter_config.json"):
        Engine(str(tiny_model_dir), {"y": str(tmp_path / "empty")}, device="cpu")
    with pytest.raises(ModelError, match="not allowed"):
        Engine(str(tiny_model_dir), {"base": str(adapter_dirs["sft"])}, device="cpu")


# ---------------------------------------------------------------------------------------------------------------
# 9. Bad requests fail before any event


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


def test_a_prompt_tokenized_by_the_caller_is_not_tokenized_again(engine, reference, monkeypatch):
    ids = engine.encode(SHORT)
    monkeypatch.setattr(engine, "encode", lambda messages: pytest.fail("tokenized twice"))
    done = engine.submit("base", SHORT, GREEDY, prompt_ids=ids).result(30)
    assert done.prompt_tokens == len(ids)
    assert (done.text, done.completion_tokens, done.finish_reason) == reference.greedy(SHORT, GREEDY.max_tokens)


def test_unknown_model_and_too_long_prompts_raise_before_any_event(engine):
    with pytest.raises(UnknownModel, match="nope"):
        engine.submit("nope", SHORT, GREEDY)
    assert isinstance(UnknownModel("a", ["b"]), ValueError)
    too_long = GenParams(max_tokens=engine.context_length, temperature=0.0)
    with pytest.raises(ContextLengthError):
        engine.submit("base", SHORT, too_long)

    async def main():
        with pytest.raises(UnknownModel):
            engine.stream("nope", SHORT, GREEDY)
        with pytest.raises(ContextLengthError):
            engine.stream("base", SHORT, too_long)

    asyncio.run(main())
    assert engine.queue_depth == 0
    with pytest.raises(ValueError):
        GenParams(max_tokens=0)
    with pytest.raises(ValueError):
        GenParams(max_tokens=4, top_p=0)


# ---------------------------------------------------------------------------------------------------------------
# 10. EngineBackend runs the critique pipeline


def test_engine_backend_returns_completions_in_order(make_engine):
    e = make_engine(queue_size=2)                            # smaller than the batch: generate waits for room
    backend = EngineBackend(e)
    assert (backend.name, backend.model, backend.context_length) == ("server", e.model_id, e.context_length)
    batch = [SHORT, LONG, MEDIUM, TINY]
    greedy = backend.generate(batch, Sampling(temperature=0.0, max_new_tokens=8), seed=0)
    assert [c.text for c in greedy] == [run(e, "base", conv, GenParams(8, 0.0)).text.strip() for conv in batch]
    assert [c.prompt_tokens for c in greedy] == [e.count_tokens(conv) for conv in batch]
    sampled = backend.generate(batch, Sampling(temperature=1.0, top_p=0.9, max_new_tokens=8), seed=100)
    assert [c.text for c in sampled] == [
        run(e, "base", conv, GenParams(8, 1.0, 0.9, seed=100 + i)).text.strip() for i, conv in enumerate(batch)]
    with pytest.raises(ContextLengthError):
        backend.generate([SHORT, LONG], Sampling(max_new_tokens=e.context_length), seed=0)
    assert e.queue_depth == 0 and e.in_flight == 0           # nothing of the refused batch was queued


def test_engine_backend_drives_the_critique_pipeline(make_engine):
    e = make_engine()
    backend = EngineBackend(e)
    gen = Generator(make_constitution(3), backend, rounds=1, sampling=Sampling(temperature=0.0, max_new_tokens=8))
    records = gen.run_batch(gen.plan(items_from(prompt_rows(3))))
    assert [r.prompt_id for r in records] == ["q000", "q001", "q002"]
    for r in records:
        assert len(r.rounds) == 1
        assert r.provenance.backend == "server" and r.provenance.model == e.model_id
        assert r.usage["completion_tokens"] > 0


# ---------------------------------------------------------------------------------------------------------------
# Failures


class _Broken:
    """A model whose forward pass fails (like a CUDA out-of-memory error would)."""

    def __call__(self, **kwargs):
        raise RuntimeError("simulated out of memory")


def test_a_failing_wave_ends_its_requests_with_an_error_and_the_worker_goes_on(make_engine, monkeypatch):
    e = make_engine()
    working = e._model
    monkeypatch.setattr(e, "_model", _Broken())
    done = run(e, "base", SHORT, GREEDY)
    assert done.finish_reason == "error" and "simulated out of memory" in done.error
    failed = EngineBackend(e).generate([SHORT, MEDIUM], Sampling(max_new_tokens=4), seed=0)
    assert [c.finish_reason for c in failed] == ["error", "error"] and all(c.error for c in failed)
    assert e.error is None and e.in_flight == 0
    monkeypatch.setattr(e, "_model", working)
    assert run(e, "base", SHORT, GREEDY).finish_reason == "length"


def test_a_dead_worker_is_reported_and_refuses_work(make_engine, monkeypatch):
    e = make_engine(start=False)

    def explode(*args, **kwargs):
        raise RuntimeError("worker bug")

    monkeypatch.setattr(e, "_take", explode)
    pending = e.submit("base", SHORT, GREEDY)
    e.start()
    done = pending.result(timeout=5)
    assert done.finish_reason == "error" and "worker bug" in done.error
    assert wait_until(lambda: not e.running)
    assert "worker bug" in e.error
    with pytest.raises(EngineStopped):
        e.submit("base", SHORT, GREEDY)
