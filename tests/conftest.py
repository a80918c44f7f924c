"""Shared fixtures: a tiny causal LM built offline, small constitutions, prompt files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# The models here are tiny (or 135M): one CPU thread is as fast as two, and on a busy 2-core machine two OpenMP
# threads that wait on each other at every op make a tiny-model run up to 100x slower. Set before torch is imported;
# subprocesses inherit it. An explicit OMP_NUM_THREADS wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Helper modules that test files import by name (tests/<dir>/ is on sys.path): pytest rewrites their asserts too.
pytest.register_assert_rewrite("train_fixtures", "data_fixtures", "fixtures.server_fixtures",
                               "fixtures.engine_fixtures", "fixtures.review_fixtures",
                               "fixtures.browser", "review_app", "fixtures.gateway_fixtures")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _training_lines() -> list[str]:
    lines: list[str] = []
    for path in sorted((REPO / "data" / "prompts").glob("*.jsonl")):
        lines += path.read_text(encoding="utf-8").splitlines()
    lines += (REPO / "constitution" / "default.yaml").read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip()]


def build_tiny_model(path: Path, *, max_position_embeddings: int = 4096, chat_template: bool = True) -> Path:
    """Write a tiny, randomly initialised Llama-style chat model (tokenizer + weights) to ``path``, offline."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_training_lines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>"])
    if chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_position_embeddings,
                         eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                         pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), bos_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny")


@pytest.fixture(scope="session")
def tiny_backend(tiny_model_dir):
    """One LocalBackend on the tiny model, shared (it holds no state between calls)."""
    from cai.backends.local import LocalBackend

    return LocalBackend(str(tiny_model_dir), device="cpu")


# ---------------------------------------------------------------------------------------------------------------
# Constitutions


def constitution_yaml(n: int = 4, *, name: str = "small", weights: dict[str, float] | None = None,
                      critique: dict[str, str] | None = None, exemplars: bool = True,
                      system_prompt: str | None = "Be good.") -> str:
    """A valid constitution as YAML text: principles p1..pN; texts overridable per id."""
    weights = weights or {}
    critique = critique or {}
    out = [f"name: {name}", 'version: "1"', "description: a small test constitution"]
    if system_prompt:
        out.append(f"system_prompt: {json.dumps(system_prompt)}")
    out.append("principles:")
    for i in range(1, n + 1):
        pid = f"p{i}"
        out += [f"  - id: {pid}",
                f"    critique: {json.dumps(critique.get(pid, f'Critique request number {i}: find problem {i}.'))}",
                f"    revision: {json.dumps(f'Revision request number {i}: fix problem {i}.')}",
                f"    weight: {weights.get(pid, 1.0)}"]
    if exemplars:
        out += ["exemplars:",
                "  - principle: p1",
                '    prompt: "Exemplar prompt one"',
                '    response: "Exemplar response one"',
                '    critique: "Exemplar critique one"',
                '    revision: "Exemplar revision one"',
                "  - prompt: \"Exemplar prompt two\"",
                '    response: "Exemplar response two"',
                '    critique: "Exemplar critique two"',
                '    revision: "Exemplar revision two"']
    return "\n".join(out) + "\n"


def make_constitution(n: int = 4, **kwargs):
    from cai.core.constitution import parse_constitution

    return parse_constitution(constitution_yaml(n, **kwargs), "<test>")


@pytest.fixture
def small_constitution():
    """A factory: ``small_constitution(n=4, **overrides)`` -> a validated Constitution."""
    return make_constitution


# ---------------------------------------------------------------------------------------------------------------
# Prompt files


# Conversations of different lengths, for backends and the engine (batched vs alone)
SHORT = [{"role": "user", "content": "Hi"}]
MEDIUM = [{"role": "user", "content": "What is the best way to keep a garden healthy during a very dry summer?"}]
LONG = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "Tell me about the history of the printing press in Europe."},
    {"role": "assistant", "content": "The printing press spread quickly after Gutenberg's work around 1450."},
    {"role": "user", "content": "And how did it change the way people shared news and scientific ideas?"},
]


def prompt_rows(n: int, prefix: str = "q", **extra) -> list[dict]:
    return [{"id": f"{prefix}{i:03d}", "prompt": f"Test question number {i} about topic {i % 7}?", **extra}
            for i in range(n)]


def write_prompts(path: Path, rows: list[dict | str]) -> Path:
    """Write rows (dicts, or raw strings written as they are) as JSONL."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


@pytest.fixture
def prompt_file(tmp_path):
    """A factory: ``prompt_file(rows, name="prompts.jsonl")`` -> path of a JSONL file in tmp_path."""

    def make(rows, name: str = "prompts.jsonl") -> Path:
        return write_prompts(tmp_path / name, rows)

    return make


def items_from(rows: list[dict]):
    """PromptItems for rows, through the real loader's row parser."""
    from cai.core.prompt_files import _build

    result = _build((("<test>", n, row) for n, row in enumerate(rows, start=1)), strict=True)
    return result.items


@pytest.fixture
def cli_env(monkeypatch):
    """Run the CLI in-process from the repo root (relative defaults resolve), without fake delays."""
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("CAI_FAKE_DELAY", raising=False)
    return REPO


def subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("CAI_FAKE_DELAY", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def copy_model_without_chat_template(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    return dst


# ---------------------------------------------------------------------------------------------------------------
# Preferences (what `cai label` writes)


def preference_line(rec, label: float | None, *, n: int = 0, model: str = "judge-7b",
                    principles: tuple[str, ...] = ("harmless", "ethical"), texts: tuple[str, str] | None = None,
                    sources: tuple[str, str] = ("record:final", "record:initial")) -> dict:
    """A preferences.jsonl line (cai.core.preference) about a Record: ``responses[0]`` its final revision,
    ``responses[1]`` its initial answer (or ``texts``), ``label`` = P(responses[0] is better), None: unlabelled."""
    a, b = texts or (rec.final, rec.initial)
    judgements = [{"principle": p, "principle_sha256": hashlib.sha256(p.encode()).hexdigest(), "order": order,
                   "p_a": label, "p_first": label if order == "ab" else (None if label is None else 1 - label)}
                  for p in principles for order in ("ab", "ba")]
    return {"id": f"pair-{rec.id[:12]}-{n}", "prompt_id": rec.prompt_id, "messages": [dict(m) for m in rec.messages],
            "responses": [{"text": a, "source": sources[0], "record": rec.id},
                          {"text": b, "source": sources[1], "record": rec.id}],
            "judgements": judgements, "label": label, "status": "unlabelled" if label is None else "labelled",
            "provenance": {"feedback": {"backend": "local", "model": model, "revision": None, "adapter": None},
                           "principles": list(principles), "orders": ["ab", "ba"], "cot": False, "clamp": None,
                           "seed": 0, "policy": "records"}}


def write_preferences(run: Path, lines: list[dict]) -> Path:
    path = run / "preferences.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path
