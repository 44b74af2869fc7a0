"""On-policy sampling on a CPU: transformers' generate with the dynamic KV cache vs the static one.

    python bench/sampling_cache.py RUN/student     -> bench/results/sampling_cache.json

The student samples 8 answers of 64 tokens (the on-policy step's call), each cache twice in turn,
best kept, in bf16 and fp32. No torch.compile: the training loop does not compile.
"""

import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from distill.core.models import load_tokenizer

torch.set_num_threads(2)
student = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
tok = load_tokenizer(sys.argv[1])
qs = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain gravity.",
    "Name three fruits.",
    "What is 17 times 3?",
    "Describe a cat.",
    "Why is the sky blue?",
    "Give me a tip for sleep.",
]
rows = [
    tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, return_dict=False)
    for q in qs
]
L = max(map(len, rows))
ids = torch.tensor([[tok.pad_token_id] * (L - len(r)) + r for r in rows])
mask = (torch.arange(L)[None] >= torch.tensor([L - len(r) for r in rows])[:, None]).long()
res = {}
for dtype in (torch.bfloat16, torch.float32):
    m = student.to(dtype)
    for impl in ("dynamic", "static", "dynamic", "static"):
        kw = {} if impl == "dynamic" else {"cache_implementation": "static"}
        torch.manual_seed(0)
        t0 = time.perf_counter()
        out = m.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=64,
            min_new_tokens=64,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            pad_token_id=tok.pad_token_id,
            **kw,
        )
        secs = time.perf_counter() - t0
        key = f"{str(dtype)[6:]}-{impl}"
        res[key] = max(res.get(key, 0), 8 * 64 / secs)
        print(key, round(8 * 64 / secs, 1), "tokens/s", flush=True)
lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
cpu = next(line.split(":", 1)[1].strip() for line in lscpu if line.startswith("Model name"))
out = {
    "static_vs_dynamic_bf16": res["bfloat16-static"] / res["bfloat16-dynamic"],
    "static_vs_dynamic_fp32": res["float32-static"] / res["float32-dynamic"],
    "tokens_per_s": res,
    "rows": 8,
    "new_tokens": 64,
    "student": sys.argv[1],
    "cpu": cpu,
    "command": "python bench/sampling_cache.py " + sys.argv[1],
    "date": dt.date.today().isoformat(),
}
Path(__file__).with_name("results").joinpath("sampling_cache.json").write_text(json.dumps(out, indent=1))
print(json.dumps(out, indent=1))
