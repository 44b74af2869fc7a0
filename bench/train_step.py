"""Student training throughput on the default recipe: distill fp32 / bf16 vs TRL's GKDTrainer.

    python bench/train_step.py [--steps 6] [--batch 8] [--seq 256] [--no-trl]

Teacher SmolLM2-135M-Instruct, student its 10-of-30-layer shrink (``runs/default/student_init``,
from ``make demo``), the same fixed-length sequences for every contender (windows of the teacher's
real answers, the first 32 tokens of each counted as prompt). Each contender runs in its own
subprocess, so its peak RSS is its own; tokens/s is the median over the steps after the first
(warm-up). TRL is a bench-only extra: ``pip install trl==1.16.0 datasets``.

MFU = (2 * N_teacher + 6 * N_student) * tokens/s / peak, where N counts the parameters that take
part in matmuls (linear layers and the LM head) and the peak is this machine's bf16 matmul rate,
measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "train_step.json"
RUN = Path("runs/default")
PROMPT = 32


def windows(n: int, seq: int) -> list[tuple[list[int], list[bool]]]:
    """``n`` sequences of exactly ``seq`` tokens cut from the teacher's answers (prompt + answer ids)."""
    stream: list[int] = []
    for line in (RUN / "answers.jsonl").read_text().splitlines():
        stream += json.loads(line)["token_ids"]
    if len(stream) < n * seq:
        stream = stream * (n * seq // len(stream) + 1)
    return [(stream[i * seq : (i + 1) * seq], [False] * PROMPT + [True] * (seq - PROMPT)) for i in range(n)]


def matmul_params(model) -> int:
    import torch

    seen, total = set(), 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            total += m.weight.numel()
    return total


def peak_bf16_flops(size: int = 2048, reps: int = 10) -> float:
    import torch

    a = torch.randn(size, size, dtype=torch.bfloat16)
    b = torch.randn(size, size, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - t0))
    return best


def run_distill(bf16: bool, steps: int, batch: int, seq: int, chunked: bool = True) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from distill.core.config import TrainConfig
    from distill.core.models import load_model
    from distill.teacher.signal import LiveTeacher
    from distill.train.loop import train

    teacher = load_model("smollm2-135m-instruct", dtype=torch.bfloat16 if bf16 else torch.float32)
    student = AutoModelForCausalLM.from_pretrained(RUN / "student_init", dtype=torch.float32)
    examples = windows(batch * steps, seq)
    cfg = TrainConfig(max_steps=steps, batch_size=batch, bf16=bf16, warmup_steps=1, max_seq_len=seq,
                      checkpoint_every=10**6, lr=3e-4, chunked_loss=chunked)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        train(student, LiveTeacher(teacher), examples, cfg, Path(tmp), pad_id=0)
        rows = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows[1:]),
        "per_step_tokens_per_s": [r["tokens_per_s"] for r in rows],
        "n_teacher": matmul_params(teacher),
        "n_student": matmul_params(student),
    }


def run_trl(bf16: bool, steps: int, batch: int, seq: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from distill.core.models import resolve_model_dir

    tdir = resolve_model_dir("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(tdir)
    teacher = AutoModelForCausalLM.from_pretrained(tdir, dtype=torch.float32)
    student = AutoModelForCausalLM.from_pretrained(RUN / "student_init", dtype=torch.float32)
    rows = []
    for ids, _ in windows(batch * steps, seq):
        prompt = tok.decode(ids[: PROMPT - 12], skip_special_tokens=True)
        answer = tok.decode(ids[PROMPT - 12 :], skip_special_tokens=True)
        rows.append(
            {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
        )

    times: list[float] = []
    counts: list[int] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as tmp:
        args = GKDConfig(
            output_dir=tmp, per_device_train_batch_size=batch, max_steps=steps, lmbda=0.0, beta=0.0,
            temperature=1.0, bf16=bf16, use_cpu=True, logging_steps=1, save_strategy="no", report_to=[],
            max_length=seq, learning_rate=3e-4, dataloader_num_workers=0, seq_kd=False,
        )  # fmt: skip
        data = Dataset.from_list(rows)
        trainer = GKDTrainer(
            model=student, teacher_model=teacher, args=args, train_dataset=data, processing_class=tok,
            callbacks=[Timer()],
        )  # fmt: skip
        batch0 = next(iter(trainer.get_train_dataloader()))
        counts.append(int(batch0["attention_mask"].sum()))
        trainer.train()
    tokens_per_step = counts[0]
    return {
        "tokens_per_s": statistics.median(tokens_per_step / t for t in times[1:]),
        "per_step_seconds": times,
        "tokens_per_step": tokens_per_step,
    }


def child(kind: str, bf16: bool, steps: int, batch: int, seq: int) -> None:
    import torch

    torch.manual_seed(0)
    if kind == "trl":
        out = run_trl(bf16, steps, batch, seq)
    else:
        out = run_distill(bf16, steps, batch, seq, chunked=kind != "distill_plain")
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(out))


def spawn(kind: str, bf16: bool, args) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "1" if bf16 else "0",
           "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode != 0 or not line:
        return {"error": (out.stderr or out.stdout).strip().splitlines()[-1:]}
    return json.loads(line[-1][7:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument("--rounds", type=int, default=2, help="turns of the distill bf16 / TRL bf16 pair")
    ap.add_argument("--child", nargs=2)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1] == "1", args.steps, args.batch, args.seq)
        return
    if not (RUN / "student_init").is_dir():
        sys.exit("runs/default/student_init missing: run `make demo` first")
    import torch

    peak = peak_bf16_flops()
    res: dict = {}
    rounds: dict[str, list] = {}
    # distill's default (chunked loss) in fp32, its plain (B, T, V) loss in bf16, TRL in fp32, once;
    # then the headline pair, distill bf16 and TRL bf16, in alternating turns for --rounds rounds,
    # each keeping its best round (tokens/s) and its largest peak RSS: a slow moment of this shared
    # machine then cannot decide the ratio.
    once = [("distill", False), ("distill_plain", True)] + ([] if args.no_trl else [("trl", False)])
    pair = [("distill", True)] + ([] if args.no_trl else [("trl", True)])
    for kind, bf16 in once + pair * args.rounds:
        key = f"{kind}_{'bf16' if bf16 else 'fp32'}"
        out = spawn(kind, bf16, args)
        rounds.setdefault(key, []).append(out)
        print(key, {k: v for k, v in out.items() if not k.startswith("per_step")}, flush=True)
    for key, outs in rounds.items():
        good = [o for o in outs if "tokens_per_s" in o]
        if not good:
            res[key] = outs[-1]
            continue
        res[key] = dict(max(good, key=lambda o: o["tokens_per_s"]))
        res[key]["peak_rss_bytes"] = max(o["peak_rss_bytes"] for o in good)
        if len(outs) > 1:
            res[key]["rounds_tokens_per_s"] = [o.get("tokens_per_s") for o in outs]
    peak = max(peak, peak_bf16_flops())
    best = "distill_bf16"  # the default settings are what is compared
    d = res[best]
    flops_per_token = 2 * d["n_teacher"] + 6 * d["n_student"]
    result = {
        "mfu_bf16": flops_per_token * d["tokens_per_s"] / peak,
        "distill_setting_compared": best,
        "mfu_fp32_vs_bf16_peak": flops_per_token * res["distill_fp32"].get("tokens_per_s", 0) / peak,
        "bf16_matmul_peak_flops": peak,
        "distill_bf16_vs_fp32_tokens_per_s_ratio": d["tokens_per_s"]
        / res["distill_fp32"].get("tokens_per_s", 1),
    }
    trl = res.get("trl_bf16", {})
    if "tokens_per_s" in trl:
        result["vs_trl_tokens_per_s_ratio"] = d["tokens_per_s"] / trl["tokens_per_s"]
        result["vs_trl_peak_rss_ratio"] = d["peak_rss_bytes"] / trl["peak_rss_bytes"]
    result.update({
        "raw": res, "batch": args.batch, "seq": args.seq, "steps": args.steps, "rounds": args.rounds,
        "command": "python bench/train_step.py " + " ".join(sys.argv[1:]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores, torch {torch.__version__}",
    })  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "raw"}, indent=1))


if __name__ == "__main__":
    main()
