"""The one training loop: student on prompt + teacher answer, alpha * KD + (1 - alpha) * CE.

Read it top to bottom in ``train``: each step draws ``grad_accum`` micro-batches whose
positions are fixed by the step number (so a resumed run sees the same data),
counts the target tokens of the whole step first (the loss is normalised by that
global count, which keeps gradient accumulation exact), then accumulates, clips,
steps, and now and then logs and checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from distill.config import TrainConfig
from distill.data import Batch, collate
from distill.losses import LOSSES, token_cross_entropy
from distill.progress import console, progress_bar
from distill.teacher import TeacherSignal

Example = tuple[list[int], list[bool]]


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a checkpoint that does not fit)."""


@dataclass
class StepLoss:
    """The loss of one micro-batch and its parts, already normalised by the step's tokens."""

    loss: torch.Tensor
    kd: float
    ce: float


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``cfg.lr``, then cosine decay to 10% of it at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def micro_batches(examples: list[Example], step: int, cfg: TrainConfig, pad_id: int) -> list[Batch]:
    """The ``grad_accum`` micro-batches of optimizer step ``step``.

    Sample ``i`` of the stream is ``perm(epoch)[i % n]`` with a per-epoch seeded
    permutation, so the batches depend only on (seed, step): resume is exact.
    """
    n = len(examples)
    per_step = cfg.batch_size * cfg.grad_accum
    out = []
    for m in range(cfg.grad_accum):
        rows = []
        for j in range(cfg.batch_size):
            i = step * per_step + m * cfg.batch_size + j
            epoch, k = divmod(i, n)
            perm = list(range(n))
            random.Random(cfg.seed * 7919 + epoch).shuffle(perm)
            rows.append(examples[perm[k]])
        out.append(collate(rows, pad_id))
    return out


def distill_loss(
    student: PreTrainedModel,
    teacher: TeacherSignal,
    batch: Batch,
    cfg: TrainConfig,
    num_tokens: int,
    vocab_size: int | None = None,
) -> StepLoss:
    """alpha * KD(teacher || student) + (1 - alpha) * CE(teacher tokens) on answer positions."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
    with autocast:
        s_logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    mask = batch.answer_mask[:, 1:]  # position t predicts token t + 1
    s = s_logits[:, :-1]  # (B, T-1, V)
    parts = {}
    if cfg.alpha > 0:
        t = teacher.signal(batch)  # (B, T-1, V') logits or top-k
        parts["kd"] = LOSSES[cfg.loss](
            s, t, mask, temperature=cfg.distill_temperature, num_tokens=num_tokens,
            vocab_size=vocab_size,
        )  # fmt: skip
    if cfg.alpha < 1:
        parts["ce"] = token_cross_entropy(s, batch.input_ids[:, 1:], mask, num_tokens=num_tokens)
    loss = cfg.alpha * parts.get("kd", 0.0) + (1 - cfg.alpha) * parts.get("ce", 0.0)
    kd, ce = (float(parts[k].detach()) if k in parts else 0.0 for k in ("kd", "ce"))
    return StepLoss(loss, kd, ce)


# --- checkpoints -----------------------------------------------------------------------------


def save_checkpoint(
    ckpt_dir: Path, step: int, student: PreTrainedModel, opt: torch.optim.Optimizer, keep: int
) -> Path:
    """Write ``ckpt_dir/step-XXXXXX`` atomically; keep only the last ``keep`` checkpoints."""
    final = ckpt_dir / f"step-{step:06d}"
    tmp = ckpt_dir / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous() for k, v in student.state_dict().items()}
    # Tied weights share storage; safetensors wants one copy of each tensor.
    seen: dict[int, str] = {}
    for k in list(state):
        ptr = state[k].data_ptr()
        if ptr in seen:
            state[k] = state[k].clone()
        seen[ptr] = k
    save_file(state, tmp / "model.safetensors")
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
    for f in tmp.iterdir():
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(ckpt_dir.glob("step-*"))[:-keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = sorted(p for p in ckpt_dir.glob("step-*") if (p / "trainer_state.json").is_file())
    return found[-1] if found else None


def load_checkpoint(path: Path, student: PreTrainedModel, opt: torch.optim.Optimizer) -> int:
    """Restore weights, optimizer and RNG from ``path``; returns the step to continue from."""
    state = load_file(path / "model.safetensors")
    missing, unexpected = student.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise TrainingError(f"{path}: checkpoint does not fit the student ({missing or unexpected})")
    opt.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True)["torch"])
    return json.loads((path / "trainer_state.json").read_text())["step"]


# --- the loop --------------------------------------------------------------------------------


def train(
    student: PreTrainedModel,
    teacher: TeacherSignal,
    examples: list[Example],
    cfg: TrainConfig,
    out_dir: Path,
    *,
    pad_id: int,
    vocab_size: int | None = None,
    resume: bool = True,
) -> dict:
    """Train ``student`` in place; checkpoints and ``metrics.jsonl`` go under ``out_dir``.

    Returns a summary: steps, tokens, wall seconds, first and last loss.
    """
    if not examples:
        raise TrainingError("no training examples: did the teacher answer any training prompt?")
    if cfg.loss not in LOSSES:
        raise TrainingError(f"train.loss={cfg.loss!r} is not one of {sorted(LOSSES)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out_dir / "checkpoints"
    torch.manual_seed(cfg.seed)
    student.train()
    decay = [p for n, p in student.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in student.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )  # fmt: skip
    step = 0
    last = latest_checkpoint(ckpt_dir) if resume else None
    if last is not None:
        step = load_checkpoint(last, student, opt)
        console.print(f"resuming from {last} (step {step})")
    metrics_path = out_dir / "metrics.jsonl"
    if step == 0 and metrics_path.exists():
        metrics_path.unlink()
    history: list[dict] = []
    t_start, tokens = time.perf_counter(), 0
    with progress_bar("step") as bar:
        task = bar.add_task("train", total=cfg.max_steps, completed=step, info="")
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            batches = micro_batches(examples, step, cfg, pad_id)
            n_tok = sum(b.num_target_tokens for b in batches)
            kd = ce = total = 0.0
            for batch in batches:
                part = distill_loss(student, teacher, batch, cfg, n_tok, vocab_size)
                if not torch.isfinite(part.loss):
                    kept = latest_checkpoint(ckpt_dir)
                    raise TrainingError(
                        f"non-finite loss at step {step + 1} (kd={part.kd}, ce={part.ce}); "
                        f"last good checkpoint: {kept or 'none'}. Lower train.lr or check the data."
                    )
                part.loss.backward()
                kd, ce, total = kd + part.kd, ce + part.ce, total + float(part.loss.detach())
            grad_norm = float(
                torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip or float("inf"))
            )
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            tokens += sum(int(b.attention_mask.sum()) for b in batches)
            rec = {"step": step, "loss": total, "kd": kd, "ce": ce, "lr": lr,
                   "grad_norm": grad_norm, "target_tokens": n_tok,
                   "tokens_per_s": sum(int(b.attention_mask.sum()) for b in batches) / dt}  # fmt: skip
            history.append(rec)
            with metrics_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.update(task, advance=1, info=f"loss {total:.3f} kd {kd:.3f} ce {ce:.3f}")
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                save_checkpoint(ckpt_dir, step, student, opt, cfg.keep_checkpoints)
    student.eval()
    return {
        "steps": step,
        "tokens": tokens,
        "seconds": time.perf_counter() - t_start,
        "first_loss": history[0]["loss"] if history else None,
        "last_loss": history[-1]["loss"] if history else None,
    }
