"""The local transformers backend on a tiny randomly initialised model built in a fixture (offline, CPU)."""

from __future__ import annotations

import pytest

from cai.backends.base import Sampling
from cai.cli import main
from cai.core.errors import ContextLengthError, ModelError
from cai.generate.runner import run_generate

from conftest import (
    LONG,
    MEDIUM,
    SHORT,
    build_tiny_model,
    copy_model_without_chat_template,
    items_from,
    make_constitution,
    prompt_rows,
)

GREEDY = Sampling(temperature=0.0, max_new_tokens=8)


@pytest.fixture(scope="module")
def backend(tiny_backend):
    return tiny_backend


def test_loads_the_tiny_model(backend, tiny_model_dir):
    assert backend.name == "local"
    assert backend.context_length == 4096
    assert backend.tokenizer.padding_side == "left"
    assert backend.tokenizer.convert_tokens_to_ids("<|im_end|>") in backend.eos_ids
    rendered = backend.render(SHORT)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert backend.count_tokens(SHORT) < backend.count_tokens(MEDIUM) < backend.count_tokens(LONG)


def test_the_dtype_is_chosen_by_the_hardware_only_when_asked(monkeypatch):
    import torch

    from cai.inference.loading import choose_dtype, native_bf16

    assert choose_dtype("cpu", "bfloat16") is torch.bfloat16 and choose_dtype("cpu", "float16") is torch.float16
    assert choose_dtype("cpu") is torch.float32                  # the library's default on CPU: fp32, always
    for has_bf16 in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda has=has_bf16: has)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        assert native_bf16("cpu") is has_bf16
        assert choose_dtype("cpu", "auto") is (torch.bfloat16 if has_bf16 else torch.float32)
        assert choose_dtype("cpu") is torch.float32
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)   # AMX alone is enough
    assert choose_dtype("cpu", "auto") is torch.bfloat16
    assert not native_bf16("mps")
    assert choose_dtype("cpu:0", "auto") is torch.bfloat16                # a device index changes nothing
    with pytest.raises(ModelError, match="unknown dtype 'fp8'"):
        choose_dtype("cpu", "fp8")


def test_batch_of_different_lengths(backend):
    out = backend.generate([SHORT, LONG, MEDIUM], GREEDY, seed=0)
    assert len(out) == 3
    for conv, comp in zip([SHORT, LONG, MEDIUM], out):
        assert comp.finish_reason in {"stop", "length"}
        assert 0 < comp.completion_tokens <= GREEDY.max_new_tokens
        assert comp.prompt_tokens == backend.count_tokens(conv)
        if comp.finish_reason == "length":
            assert comp.completion_tokens == GREEDY.max_new_tokens
    assert backend.generate([], GREEDY, seed=0) == []


def test_greedy_is_deterministic_and_batch_invariant(backend):
    batch = [SHORT, LONG, MEDIUM]
    together = backend.generate(batch, GREEDY, seed=0)
    again = backend.generate(batch, GREEDY, seed=123)       # greedy: the seed does not matter
    alone = [backend.generate([conv], GREEDY, seed=0)[0] for conv in batch]
    assert [c.text for c in together] == [c.text for c in again]
    # a conversation's greedy completion does not depend on what else is in its batch (left padding is masked
    # and does not shift positions)
    assert [c.text for c in together] == [c.text for c in alone]
    assert [c.completion_tokens for c in together] == [c.completion_tokens for c in alone]
    reordered = backend.generate([MEDIUM, SHORT, LONG], GREEDY, seed=0)
    assert [c.text for c in reordered] == [together[2].text, together[0].text, together[1].text]


def test_sampling_is_reproducible_for_a_seed(backend):
    s = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=8)
    a = backend.generate([SHORT, MEDIUM], s, seed=7)
    b = backend.generate([SHORT, MEDIUM], s, seed=7)
    assert [c.text for c in a] == [c.text for c in b]
    # and the seed is used: over a few seeds, an untrained model's samples differ
    others = {tuple(c.text for c in backend.generate([SHORT, MEDIUM], s, seed=k)) for k in range(1, 5)}
    assert len(others | {tuple(c.text for c in a)}) > 1


def test_generation_stops_at_an_end_of_turn_token(backend, monkeypatch):
    import torch

    enc = backend.tokenizer(backend.render(MEDIUM), return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        first = int(backend.lm(**enc).logits[0, -1].argmax())
    # make the token the model greedily emits first an end-of-turn token: it must stop at once, with no text
    monkeypatch.setattr(backend, "eos_ids", sorted(set(backend.eos_ids) | {first}))
    comp = backend.generate([MEDIUM], GREEDY, seed=0)[0]
    assert comp.finish_reason == "stop"
    assert comp.text == ""
    assert comp.completion_tokens == 1


# ---------------------------------------------------------------------------------------------------------------
# Context length


@pytest.fixture(scope="module")
def short_context_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("short-ctx") / "tiny64", max_position_embeddings=64)


def test_prompt_longer_than_the_context(short_context_model):
    from cai.backends.local import LocalBackend

    b = LocalBackend(str(short_context_model), device="cpu")
    assert b.context_length == 64
    long = [{"role": "user", "content": "please explain " * 60}]
    with pytest.raises(ContextLengthError) as info:
        b.generate([SHORT, long], GREEDY, seed=0)
    assert len(info.value.issues) == 1 and "conversation 1" in info.value.issues[0].message
    # a short one still works
    assert b.generate([SHORT], Sampling(temperature=0, max_new_tokens=4), seed=0)[0].completion_tokens > 0


def test_run_generate_preflight_before_the_folder_exists(short_context_model, tmp_path):
    from cai.backends.local import LocalBackend

    b = LocalBackend(str(short_context_model), device="cpu")
    out = tmp_path / "run"
    with pytest.raises(ContextLengthError):
        run_generate(constitution=make_constitution(3), items=items_from(prompt_rows(2)), backend=b, out=out,
                     sampling=GREEDY)
    assert not out.exists()


def test_run_generate_end_to_end(backend, tmp_path):
    out = tmp_path / "run"
    s = run_generate(constitution=make_constitution(3), items=items_from(prompt_rows(3)), backend=backend, out=out,
                     rounds=1, sampling=GREEDY, batch_size=2)
    assert s.written == 3
    from cai.core.record import read_records

    recs = read_records(out)
    assert {r.provenance.backend for r in recs} == {"local"}
    assert all(r.usage["completion_tokens"] > 0 for r in recs)
    from cai.core.record import FLAGS

    for r in recs:
        assert set(r.flags) <= set(FLAGS)
        assert r.final == r.rounds[0].revision
        assert r.provenance.sampling["temperature"] == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Model errors


def test_model_without_chat_template(tiny_model_dir, tmp_path):
    from cai.backends.local import LocalBackend

    folder = copy_model_without_chat_template(tiny_model_dir, tmp_path / "no-template")
    with pytest.raises(ModelError, match="chat template"):
        LocalBackend(str(folder), device="cpu")


def test_nonexistent_local_path(tmp_path, monkeypatch):
    from cai.backends.local import LocalBackend

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="not found"):
        LocalBackend("./nope", device="cpu")


def test_folder_without_config(tmp_path):
    from cai.backends.local import LocalBackend

    (tmp_path / "empty-model").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        LocalBackend(str(tmp_path / "empty-model"), device="cpu")


def test_cli_missing_prompt_file(cli_env, tmp_path, capsys):
    rc = main(["generate", "--backend", "fake", "--prompts", str(tmp_path / "missing.jsonl"),
               "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "missing.jsonl" in err and "not found" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_cli_missing_model(cli_env, tmp_path, capsys, prompt_file):
    prompts = prompt_file(prompt_rows(2))
    assert not (cli_env / "does-not-exist").exists()
    rc = main(["generate", "--model", "./does-not-exist", "--prompts", str(prompts), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "does-not-exist" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_cli_local_generate_on_the_tiny_model(cli_env, tiny_model_dir, tmp_path, capsys, prompt_file):
    prompts = prompt_file(prompt_rows(3))
    out = tmp_path / "run"
    rc = main(["generate", "--model", str(tiny_model_dir), "--device", "cpu", "--prompts", str(prompts),
               "--out", str(out), "--max-new-tokens", "4", "--temperature", "0", "--batch-size", "2"])
    assert rc == 0, capsys.readouterr().err
    assert len((out / "records.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("k", [1024, 3])   # k=3: the nucleus is not inside the top k, the full-sort fallback runs
def test_top_p_sampler_draws_from_the_nucleus_distribution(k):
    """The sampler's empirical frequencies match temperature + top-p computed by hand."""
    import torch

    from cai.backends.local import TopPSampler

    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, -6.0]])
    temperature, top_p = 0.8, 0.9
    probs = torch.softmax(logits[0] / temperature, -1)
    order = probs.argsort(descending=True)
    before = probs[order].cumsum(0) - probs[order]
    nucleus = order[before < top_p]                    # the smallest top set whose mass reaches top_p
    expected = torch.zeros_like(probs)
    expected[nucleus] = probs[nucleus] / probs[nucleus].sum()

    sampler = TopPSampler(temperature, top_p, seed=0, k=k)
    draws = 6000
    counts = torch.zeros_like(probs)
    for _ in range(draws):
        out = sampler(None, logits.clone())
        assert torch.isfinite(out).sum() == 1          # exactly one candidate left: the drawn token
        counts[out[0].argmax()] += 1
    freq = counts / draws
    assert set(freq.nonzero().flatten().tolist()) <= set(nucleus.tolist())   # never outside the nucleus
    assert torch.allclose(freq, expected, atol=0.03), (freq, expected)


def test_top_p_sampler_is_seeded():
    import torch

    from cai.backends.local import TopPSampler

    logits = torch.randn(4, 500)
    a = [TopPSampler(1.0, 0.95, seed=7)(None, logits).argmax(-1).tolist() for _ in range(2)]
    assert a[0] == a[1]                                      # same seed, same draws
    s = TopPSampler(1.0, 0.95, seed=7)
    runs = [s(None, logits).argmax(-1).tolist() for _ in range(5)]
    assert len({tuple(r) for r in runs}) > 1                 # but successive steps draw afresh
