"""Serving speed: the student against its teacher in llama.cpp (f16 and q8_0 GGUF) and in
transformers, single stream and batched, measured side by side.

    python bench/serve.py --student runs/default/student [--new-tokens 64] [--batch 8] [--rounds 3]

Both models go through the same writer (``distill.export.gguf.write_ggufs``): the teacher is loaded
from its bundled GGUF, saved as a Hugging Face folder and written back as f16 and q8_0, so the
student is compared with a teacher in the same file types, not with the teacher's bundled Q4_1.

- llama.cpp, single stream: the prompt is evaluated, then ``--new-tokens`` tokens are decoded one
  at a time (argmax, no sampler, EOS not honoured so every run decodes the same count); tokens/s
  of the decode phase.
- llama.cpp, batched: ``--batch`` sequences in one context (one sequence id each), a batch of one
  token per sequence per step.
- transformers: ``distill.evaluate.metrics.compare_speed`` in the precision this machine was measured to
  prefer, batch 1 and ``--batch``.

Each round measures every model once in turn, and each keeps its best round (a slow spell of a
shared machine hits all alike). Figures go to bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "serve.json"
PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a neural network is in two sentences.",
    "Give me three tips for a job interview.",
    "What is 17 times 3?",
    "Describe a cat to someone who has never seen one.",
    "Why is the sky blue?",
    "Name a famous painting and its painter.",
]


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")


def llama_single(llm, prompts: list[list[int]], n_new: int) -> float:
    """Decode tokens/s, one stream: each prompt in turn, ``n_new`` greedy tokens after it."""
    total_t, total_n = 0.0, 0
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        t0 = time.perf_counter()
        for _ in range(n_new):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        total_t += time.perf_counter() - t0
        total_n += n_new
    return total_n / total_t


def llama_batched(llm, prompts: list[list[int]], n_new: int, threads: int) -> float:
    """Decode tokens/s with every prompt a sequence of one context, one token each per step."""
    import llama_cpp

    n = len(prompts)
    params = llama_cpp.llama_context_default_params()
    per_seq = -(-(max(map(len, prompts)) + n_new + 8) // 256) * 256  # llama.cpp pads to 256
    params.n_ctx = n * per_seq
    params.n_batch = max(sum(map(len, prompts)), n)
    params.n_seq_max = n
    params.n_threads = params.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
    vocab = llm.n_vocab()
    batch = llama_cpp.llama_batch_init(params.n_batch, 0, n)

    def fill(items: list[tuple[int, int, int, bool]]) -> None:  # (token, pos, seq, want logits)
        batch.n_tokens = len(items)
        for i, (tok, pos, seq, want) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, want

    def argmax(i: int) -> int:
        ptr = llama_cpp.llama_get_logits_ith(ctx, i)
        return int(
            np.argmax(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), (vocab,)))
        )

    try:
        items = [(t, p, s, p == len(ids) - 1) for s, ids in enumerate(prompts) for p, t in enumerate(ids)]
        fill(items)
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed on the prompts")
        last = [sum(len(x) for x in prompts[: s + 1]) - 1 for s in range(n)]
        nxt = [argmax(i) for i in last]
        pos = [len(ids) for ids in prompts]
        t0 = time.perf_counter()
        for _ in range(n_new):
            fill([(nxt[s], pos[s], s, True) for s in range(n)])
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            nxt = [argmax(s) for s in range(n)]
            pos = [p + 1 for p in pos]
        return n * n_new / (time.perf_counter() - t0)
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--student", type=Path, required=True, help="a trained student folder (run/student)")
    ap.add_argument("--teacher", default="smollm2-135m-instruct")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from distill.core.config import EvaluateConfig
    from distill.core.hardware import DTYPES, choose_precision
    from distill.core.models import load_model, load_tokenizer, resolve_gguf
    from distill.evaluate.metrics import compare_speed
    from distill.export.gguf import open_llama, write_ggufs

    torch.set_num_threads(args.threads)
    tok = load_tokenizer(str(args.student))
    chats = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, return_dict=False
        )
        for p in PROMPTS
    ]
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    teacher = load_model(args.teacher)
    teacher.save_pretrained(work / "teacher")
    load_tokenizer(args.teacher).save_pretrained(work / "teacher")
    files = {
        name: write_ggufs(folder, {k: work / f"{name}-{k}.gguf" for k in ("f16", "q8_0")},
                          teacher_gguf=resolve_gguf(args.teacher))
        for name, folder in (("teacher", work / "teacher"), ("student", args.student))
    }  # fmt: skip
    sizes = {name: {k: p.stat().st_size for k, p in fs.items()} for name, fs in files.items()}

    llama: dict[str, dict[str, dict[str, float]]] = {}
    for _ in range(args.rounds):
        for kind in ("f16", "q8_0"):
            for name in ("teacher", "student"):
                llm = open_llama(files[name][kind], n_ctx=512, threads=args.threads)
                rec = llama.setdefault(name, {}).setdefault(kind, {"single": 0.0, "batched": 0.0})
                rec["single"] = max(rec["single"], llama_single(llm, chats[:4], args.new_tokens))
                rec["batched"] = max(
                    rec["batched"], llama_batched(llm, chats[: args.batch], args.new_tokens, args.threads)
                )
                del llm
                print(name, kind, rec, flush=True)

    from transformers import AutoModelForCausalLM

    tc = teacher.config
    precision = choose_precision("auto", torch.device("cpu"), tc.hidden_size, tc.intermediate_size)
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32).eval()
    ecfg = EvaluateConfig(
        speed_new_tokens=args.new_tokens, speed_batch_size=args.batch, speed_repeats=args.rounds
    )
    hf = compare_speed({"teacher": teacher, "student": student}, tok, chats, ecfg, DTYPES[precision.dtype])
    print("transformers", precision.dtype, hf, flush=True)

    ratio = {
        kind: {
            mode: llama["student"][kind][mode] / llama["teacher"][kind][mode]
            for mode in ("single", "batched")
        }
        for kind in ("f16", "q8_0")
    }
    out = {
        # the headline: q8_0 (the file a CPU user would serve), one stream
        "student_vs_teacher_llamacpp_tokens_per_s_ratio": ratio["q8_0"]["single"],
        "student_vs_teacher_hf_tokens_per_s_ratio": hf["student"]["tokens_per_s_batch1"]
        / hf["teacher"]["tokens_per_s_batch1"],
        "llamacpp_ratios": ratio,
        "hf_batched_ratio": hf["student"]["tokens_per_s_batched"] / hf["teacher"]["tokens_per_s_batched"],
        "llamacpp_tokens_per_s": llama,
        "hf_tokens_per_s": hf,
        "hf_precision": precision.as_dict(),
        "gguf_bytes": sizes,
        "student": str(args.student),
        "student_shape": json.loads((args.student / "config.json").read_text()),
        "new_tokens": args.new_tokens,
        "batch": args.batch,
        "rounds": args.rounds,
        "threads": args.threads,
        "cpu": cpu_model(),
        "command": "python bench/serve.py " + " ".join(sys.argv[1:]),
        "date": dt.date.today().isoformat(),
    }
    out["student_shape"] = {
        k: out["student_shape"].get(k)
        for k in ("num_hidden_layers", "intermediate_size", "num_attention_heads", "hidden_size")
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if "ratio" in k}, indent=1))


if __name__ == "__main__":
    main()
