"""Does ``dtype: auto`` pick the faster precision on each class of CPU? Measured on the default models.

    python bench/precision.py [--steps 4] [--new-tokens 16]

For each ISA class this machine can present (native, and AVX2-only by capping oneDNN and MKL with
``ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``, which is what an AVX2-only AMD EPYC or a
laptop runs), a fresh subprocess:

1. runs the precision probe (``distill.hardware.probe_cpu_matmul`` at SmolLM2-135M's shapes) and
   notes what ``auto`` picks and how long the probe took;
2. times the two stages the choice matters most for, in fp32 and in bf16, side by side:
   teacher generation (``--batch`` rows, greedy) and student training steps (the default recipe's
   10-layer student, live teacher, chunked fused loss, ``--batch`` sequences), warm-up excluded.
   Batches are small because emulated bf16 on the AVX2 class runs at ~1 GFLOP/s; what is
   compared is the ratio of the two dtypes within each class.

The choice is right when the dtype ``auto`` picked is the faster one in both stages.
Figures go to bench/results/precision.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "precision.json"
CLASSES = {"native": {}, "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}


def child(steps: int, new_tokens: int, batch: int) -> dict:
    import torch

    from distill.core import hardware
    from distill.core.config import TrainConfig
    from distill.core.data import make_example, prompt_token_ids, read_prompts
    from distill.core.models import load_model, load_tokenizer
    from distill.evaluate.metrics import timed_generation
    from distill.student.prune import evenly_spaced_layers, shrink_layers
    from distill.teacher.signal import LiveTeacher
    from distill.train.loop import micro_batches
    from distill.train.step import distill_loss

    torch.manual_seed(0)
    ref = "smollm2-135m-instruct"
    tok = load_tokenizer(ref)
    teacher32 = load_model(ref)
    h, inter = teacher32.config.hidden_size, teacher32.config.intermediate_size
    t0 = time.perf_counter()
    probe = hardware.probe_cpu_matmul(h, inter)
    probe_s = time.perf_counter() - t0
    picked = "bfloat16" if probe["bf16_over_fp32_time"] < 0.9 else "float32"
    prompts = read_prompts(None)[:batch]
    rows = [prompt_token_ids(tok, p) for p in prompts]
    gen, step = {}, {}
    examples = [make_example(r, r[-24:], 256) for r in rows * 2]  # answers' length: a typical 24
    for name, dtype in hardware.DTYPES.items():
        model = teacher32.to(dtype)
        timed_generation(model, tok, rows[:2], 2)  # warm-up
        gen[name] = timed_generation(model, tok, rows, new_tokens)
        teacher32 = model.float()
        student = shrink_layers(teacher32, evenly_spaced_layers(30, 10)).train()
        live = LiveTeacher(load_model(ref, dtype=dtype))
        cfg = TrainConfig(batch_size=batch, dtype=name, max_seq_len=256)
        opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
        times = []
        for s in range(steps + 1):  # the first compiles the fused loss
            b = micro_batches(examples, s, cfg, tok.pad_token_id)[0]
            t1 = time.perf_counter()
            distill_loss(student, live, b, cfg, b.num_target_tokens).loss.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - t1)
        step[name] = sum(times[1:]) / steps
    faster_gen = max(gen, key=gen.get)
    faster_train = min(step, key=step.get)
    return {
        "probe": probe,
        "probe_seconds": round(probe_s, 3),
        "auto_picks": picked,
        "generate_tokens_per_s": gen,
        "train_seconds_per_step": step,
        "bf16_over_fp32_generate_speed": gen["bfloat16"] / gen["float32"],
        "bf16_over_fp32_train_speed": step["float32"] / step["bfloat16"],
        "auto_is_faster_in_both": picked == faster_gen == faster_train,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2, help="timed training steps (after one warm-up)")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4, help="generation rows and training sequences")
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.steps, args.new_tokens, args.batch)))
        return
    out = {}
    for name, caps in CLASSES.items():
        env = dict(os.environ, **caps)
        cmd = [sys.executable, __file__, "--child", "--steps", str(args.steps),
               "--new-tokens", str(args.new_tokens), "--batch", str(args.batch)]  # fmt: skip
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        out[name] = json.loads(res.stdout.strip().splitlines()[-1])
        out[name]["env"] = caps
        print(name, json.dumps({k: v for k, v in out[name].items() if k != "probe"}, indent=1))
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "?")
    result = {
        "auto_is_faster_in_both_native": out["native"]["auto_is_faster_in_both"],
        "auto_is_faster_in_both_avx2": out["avx2"]["auto_is_faster_in_both"],
        "classes": out,
        "cpu": model,
        "machine": platform.machine(),
        "command": "python bench/precision.py " + " ".join(sys.argv[1:]),
        "date": dt.date.today().isoformat(),
    }
    RESULTS.write_text(json.dumps(result, indent=1))
    print(f"-> {RESULTS}")


if __name__ == "__main__":
    main()
