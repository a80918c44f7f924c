"""Training benchmarks, side by side in one run:

1. QLoRA SFT tokens/s with padding-free batches vs padded batches: the same rows, in the same order, the same model
   (4-bit NF4 + LoRA, dropout off), so the first step's loss must agree (to 1e-3) and only the speed differs.
2. Peak memory of the base model loaded 4-bit vs 16-bit (bfloat16), each in a fresh subprocess: the weights'
   footprint and the process's peak RSS after one training step.
3. ``--gpu``: a QLoRA SFT of a ~0.5B Qwen2-style model built from a config (random weights; fine for time and
   memory) on CUDA: step time and peak GPU memory.

    .venv/bin/python bench/train.py                # default model on CPU: 1 and 2
    .venv/bin/python bench/train.py --gpu          # on a machine with a CUDA GPU: 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def mixed_rows(n: int, seed: int = 0) -> list[dict]:
    """Prompt/completion rows of very different lengths (16–400 words, all under 1024 tokens: no truncation in either
    variant), from the repo's prompts and constitution."""
    rng = random.Random(seed)
    prompts = [json.loads(line) for line in (ROOT / "data/prompts/helpful.jsonl").read_text().splitlines() if line]
    words = (ROOT / "constitution/default.yaml").read_text().split()
    rows = []
    for i in range(n):
        p = prompts[i % len(prompts)]
        text = p.get("prompt") or p["messages"][-1]["content"]
        length = int(16 * (25 ** rng.random()))           # log-uniform 16..400 words
        start = rng.randrange(len(words))
        answer = " ".join((words * 2)[start:start + length])
        rows.append({"prompt": [{"role": "user", "content": text}],
                     "completion": [{"role": "assistant", "content": answer}]})
    return rows


def sft_run(model_path: str, rows: list[dict], *, padding_free: bool, steps: int, batch: int, out: str,
            four_bit: bool = True, device: str = "cpu", dtype: str = "float32") -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import ModelConfig, SFTConfig, SFTTrainer

    from cai.train.trainer import load_model

    tok = AutoTokenizer.from_pretrained(model_path)
    mcfg = ModelConfig(load_in_4bit=four_bit, bnb_4bit_quant_type="nf4", use_bnb_nested_quant=True)
    model = load_model(model_path, None, mcfg, device, dtype)
    args = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-4,
                     logging_steps=1, save_strategy="no", report_to="none", use_cpu=device == "cpu",
                     bf16=dtype == "bfloat16", activation_checkpointing=device != "cpu", padding_free=padding_free,
                     max_length=None, seed=0, data_seed=0, disable_tqdm=True, lr_scheduler_type="constant")
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=lora)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    # the real tokens each step sees: the same rows in both variants (same sampler seed)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    logs = [h for h in trainer.state.log_history if "loss" in h]
    tokens = logs[-1]["num_tokens"]
    out = {"seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds, "first_loss": logs[0]["loss"],
           "step_s": seconds / steps}
    if device == "cuda":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return out


def memory_child(model_path: str, mode: str) -> None:
    """In a fresh process: load the base as ``mode`` (4bit | 16bit), run one SFT step, print footprint and RSS."""
    import torch  # noqa: F401  (imports counted in the baseline)
    import trl  # noqa: F401
    from trl import ModelConfig

    from cai.train.trainer import load_model

    base = _status("VmRSS")
    mcfg = ModelConfig(load_in_4bit=mode == "4bit", bnb_4bit_quant_type="nf4", use_bnb_nested_quant=True)
    model = load_model(model_path, None, mcfg, "cpu", "bfloat16")     # the same compute dtype for both
    footprint = model.get_memory_footprint()
    rss_loaded = _status("VmRSS") - base
    del model
    with tempfile.TemporaryDirectory() as tmp:
        sft_run(model_path, mixed_rows(8), padding_free=False, steps=1, batch=4, out=tmp,
                four_bit=mode == "4bit", dtype="bfloat16")
    print(json.dumps({"footprint": footprint, "rss_loaded": rss_loaded, "rss_peak": _status("VmHWM") - base}))


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes (VmHWM: this process's peak RSS; reset by exec, unlike
    getrusage's ru_maxrss, which a child inherits from the parent it was forked from)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def gib(n: float) -> str:
    return f"{n / 2 ** 30:.3f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--gpu", action="store_true", help="the CUDA measurement (3) instead of 1 and 2")
    ap.add_argument("--memory-only", action="store_true", help="only the memory comparison (2)")
    ap.add_argument("--memory-child", choices=["4bit", "16bit"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets

    datasets.disable_progress_bars()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    from cai.inference.loading import resolve_model

    path = resolve_model(a.model).path
    if a.memory_child:
        memory_child(path, a.memory_child)
        return
    if a.gpu:
        return gpu_bench(a)
    if not a.memory_only:
        throughput(a, path)
    memory(a)


def throughput(a, path: str) -> None:
    import torch

    rows = mixed_rows(a.rows)
    print(f"{a.model}: QLoRA SFT (4-bit NF4 + LoRA r16 all-linear, dropout 0), {a.rows} rows of 16-400 words, "
          f"batch {a.batch}, {a.steps} steps, CPU, torch threads {torch.get_num_threads()}")
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, pf in (("padded", False), ("padding-free", True)):
            res[name] = sft_run(path, rows, padding_free=pf, steps=a.steps, batch=a.batch, out=tmp)
    print(f"{'batches':<14}{'tokens':>8}{'seconds':>9}{'tok/s':>8}{'first loss':>12}")
    for name, r in res.items():
        print(f"{name:<14}{r['tokens']:>8.0f}{r['seconds']:>9.1f}{r['tok_s']:>8.1f}{r['first_loss']:>12.5f}")
    ratio = res["padding-free"]["tok_s"] / res["padded"]["tok_s"]
    dloss = abs(res["padding-free"]["first_loss"] - res["padded"]["first_loss"])
    print(f"padding-free / padded tok/s = {ratio:.2f}  (target >= 1.3)")
    print(f"|first-step loss difference| = {dloss:.2e}  (target <= 1e-3)")


def memory(a) -> None:
    mem = {}
    for mode in ("16bit", "4bit"):
        p = subprocess.run([sys.executable, __file__, "--model", a.model, "--memory-child", mode],
                           capture_output=True, text=True, check=True)
        mem[mode] = json.loads(p.stdout.strip().splitlines()[-1])
    print("base model in bfloat16 vs 4-bit NF4 (compute in bfloat16), one QLoRA step of batch 4; memory above the "
          "process's baseline after imports, a fresh process each:")
    print(f"{'base':<8}{'weights':>14}{'RSS loaded':>14}{'RSS peak (1 step)':>20}")
    for mode, m in mem.items():
        print(f"{mode:<8}{gib(m['footprint']):>14}{gib(m['rss_loaded']):>14}{gib(m['rss_peak']):>20}")
    print(f"4-bit / 16-bit weights = {mem['4bit']['footprint'] / mem['16bit']['footprint']:.2f}; "
          f"peak RSS = {mem['4bit']['rss_peak'] / mem['16bit']['rss_peak']:.2f}")


def gpu_bench(a) -> None:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from cai.inference.loading import resolve_model

    if not torch.cuda.is_available():
        sys.exit("--gpu needs a CUDA GPU")
    tok_src = resolve_model("default").path
    tok = AutoTokenizer.from_pretrained(tok_src)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        n = sum(p.numel() for p in Qwen2ForCausalLM(cfg).parameters())
        print(f"Qwen2-style model from a config: {n / 1e6:.0f}M parameters, random weights, "
              f"{torch.cuda.get_device_name()}")
        rows = mixed_rows(a.rows * 2)
        for pf in (False, True):
            r = sft_run(tmp, rows, padding_free=pf, steps=a.steps, batch=a.batch, out=tmp + "/o", device="cuda",
                        dtype="bfloat16")
            print(f"QLoRA SFT {'padding-free' if pf else 'padded':<13} batch {a.batch}: {r['step_s']:.3f} s/step, "
                  f"{r['tok_s']:.0f} tok/s, peak GPU memory {r['peak_gpu_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
