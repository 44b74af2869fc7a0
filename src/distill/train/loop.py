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
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import PreTrainedModel

from distill.core import fsio, interrupt
from distill.core.config import TrainConfig
from distill.core.data import Batch, collate, pack, prompt_part
from distill.core.errors import TrainingError
from distill.core.progress import console, progress_bar
from distill.teacher.signal import TeacherSignal
from distill.train import onpolicy
from distill.train.checkpoint import (
    _is_fsdp2,
    _keep_metrics_upto,
    full_states,
    gathered_rng_states,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from distill.train.step import check_chunked_head, distill_loss

Example = tuple[list[int], list[bool]]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``cfg.lr``, then ``cfg.lr_schedule``: cosine decay to 10% of it at
    ``max_steps``; ``wsd``: held, then a linear decay to 10% over the last ``WSD_DECAY`` of the
    steps; ``constant``: held."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "wsd":
        decay = max(1.0, WSD_DECAY * (cfg.max_steps - cfg.warmup_steps))
        progress = min(1.0, max(0.0, (step - (cfg.max_steps - decay)) / decay))
        return cfg.lr * (1 - 0.9 * progress)
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


WSD_DECAY = 0.2  # the share of the steps after warm-up that wsd spends decaying


GROUP_SPAN = 32  # optimizer steps whose samples are sorted by length together (group_by_length)


def _stream_sample(examples: list[Example], i: int, seed: int, perms: dict[int, list[int]]) -> int:
    """Index of sample ``i`` of the training stream: a seeded permutation per epoch."""
    n = len(examples)
    epoch, k = divmod(i, n)
    if epoch not in perms:
        perms[epoch] = list(range(n))
        random.Random(seed * 7919 + epoch).shuffle(perms[epoch])
    return perms[epoch][k]


def micro_batches(
    examples: list[Example], step: int, cfg: TrainConfig, pad_id: int, rank: int = 0, world: int = 1
) -> list[Batch]:
    """This process's ``grad_accum`` micro-batches of optimizer step ``step``.

    A step takes ``batch_size * world * grad_accum`` samples of the stream and cuts them into
    ``grad_accum`` global micro-batches of ``batch_size * world``; process ``rank`` takes rows
    ``[rank * batch_size, (rank + 1) * batch_size)`` of each. Sample ``i`` of the stream is
    ``perm(epoch)[i % n]`` with a per-epoch seeded permutation, so the batches depend only on
    (seed, step, global batch): resume is exact, and one process with ``batch_size * world``,
    or with ``grad_accum`` times the batch, sees the same samples in each step.

    ``cfg.group_by_length``: the samples of every ``GROUP_SPAN`` steps are sorted by length and
    dealt out to those steps again in a seeded order, and a step's samples stay sorted, so a
    micro-batch holds samples of similar length (less padding) while the order of lengths over
    steps stays random. ``cfg.packing``: a micro-batch's samples are packed into as few rows of
    ``max_seq_len`` as fit, with attention kept inside each sample.
    """
    global_bs = cfg.batch_size * world
    chosen = _step_samples(examples, step, cfg, world, {}, {})
    out = []
    for m in range(cfg.grad_accum):
        group = chosen[m * global_bs : (m + 1) * global_bs]
        rows = [examples[s] for s in group[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]]
        out.append(pack(rows, pad_id, cfg.max_seq_len) if cfg.packing else collate(rows, pad_id))
    return out


def _step_samples(
    examples: list[Example], step: int, cfg: TrainConfig, world: int, perms: dict, pools: dict
) -> list[int]:
    """Indices of the samples of optimizer step ``step`` over every process, in order (see
    ``micro_batches``); ``perms`` and ``pools`` cache the epochs' permutations and the spans' pools."""
    per_step = cfg.batch_size * world * cfg.grad_accum
    if not cfg.group_by_length:
        return [_stream_sample(examples, step * per_step + j, cfg.seed, perms) for j in range(per_step)]
    span, slot = divmod(step, GROUP_SPAN)
    if span not in pools:
        first = span * GROUP_SPAN * per_step
        pool = [_stream_sample(examples, first + j, cfg.seed, perms) for j in range(GROUP_SPAN * per_step)]
        pool.sort(key=lambda s: len(examples[s][0]))  # stable: ties keep the stream's order
        order = list(range(GROUP_SPAN))
        random.Random(cfg.seed * 104729 + span).shuffle(order)
        pools[span] = (pool, order)
    pool, order = pools[span]
    return pool[order[slot] * per_step : (order[slot] + 1) * per_step]


class StepSizes:
    """Positions each optimizer step computes on a process, padding included (or, packed, the rows
    of ``max_seq_len`` it fills): what a step's time follows. Known before the step runs, since the
    batches depend only on (seed, step, global batch)."""

    def __init__(self, examples: list[Example], cfg: TrainConfig, world: int = 1):
        self.examples, self.cfg, self.world = examples, cfg, world
        self.perms: dict = {}
        self.pools: dict = {}
        self.sizes: list[int] = []

    def __call__(self, step: int) -> int:
        cfg, bs = self.cfg, self.cfg.batch_size
        while len(self.sizes) <= step:
            chosen = _step_samples(self.examples, len(self.sizes), cfg, self.world, self.perms, self.pools)
            total = 0
            for start in range(0, len(chosen), bs):  # one process's micro-batch each
                lens = [len(self.examples[s][0]) for s in chosen[start : start + bs]]
                if cfg.packing:
                    total += math.ceil(sum(lens) / cfg.max_seq_len) * cfg.max_seq_len
                else:
                    total += len(lens) * max(lens)
            self.sizes.append(math.ceil(total / self.world))
        return self.sizes[step]


PLAN_WARMUP = 1  # steps not timed: the first compiles the fused loss and warms the allocator


PLAN_MEASURE = (2, 10)  # the fewest and the most steps timed to plan the rest


REPLAN_WINDOW = 20  # the latest steps a refit of the plan reads: recent enough to follow a machine that slows


def replan_every(plan: TimePlan) -> int:
    """Steps between refits of the time plan: a tenth of its steps, at least ``PLAN_MEASURE[1]``."""
    return max(PLAN_MEASURE[1], plan.max_steps // 10)


def plan_measure(cfg: TrainConfig) -> int:
    """Steps timed before the plan: the rest of the LR warmup (so no step so far depended on the
    plan), at least 2 and at most 10. Two steps proved too few: their time varies by a third from
    step to step on a shared CPU, and a plan from a fast pair overran its budget by half."""
    low, high = PLAN_MEASURE
    return min(high, max(low, cfg.warmup_steps - PLAN_WARMUP))


@dataclass
class TimePlan:
    """The step count ``train.time_budget`` allows: fitted on the timed steps of the warm-up, then
    fitted again as the run goes (``refit``). It is saved with each checkpoint, so a resumed run
    goes on with the plan of the checkpoint it resumes from.

    On-policy steps cost more as λ rises: each micro-batch with at least one row chosen makes the
    student sample, in one batched ``generate`` call whose time hardly depends on how many rows it
    has (decoding is latency-bound at these batch sizes). The plan counts each step as its base time
    plus, per micro-batch, the chance that some row is chosen, ``1 - (1 - λ(step))^rows``, times the
    time of a call, measured in the timed steps or, while λ is still 0 there, by a probe."""

    max_steps: int
    step_seconds: float  # base: a step without sampling
    budget_seconds: float
    spent_seconds: float  # wall time before the plan: warm-up and the measured steps
    capped: bool  # max_steps was the smaller bound
    sample_seconds_per_call: float = 0.0
    calls_per_step: int = 0  # micro-batches per step (on this process)
    rows_per_call: int = 0  # rows of a micro-batch
    planned_seconds: float | None = None
    measured_steps: int = 0  # steps timed for the plan
    first_max_steps: int | None = None  # the step count first planned, before any refit
    refits: int = 0  # times the plan was fitted again on later steps

    @classmethod
    def fit(
        cls, cfg: TrainConfig, done: int, measured: list[float], spent: float,
        sampled_in_steps: float = 0.0, per_call: float = 0.0, calls_per_step: int = 0, rows_per_call: int = 0,
        sizes: StepSizes | None = None,
    ) -> TimePlan:  # fmt: skip
        """``measured``: seconds of each timed step (the ``len(measured)`` steps before ``done``),
        of which ``sampled_in_steps`` in all went to on-policy sampling; ``per_call``: seconds of
        one sampling call. With ``sizes``, a step's base time is taken in proportion to the
        positions it computes (a step of long samples costs more than one of short ones);
        without, every step costs the measured mean."""
        base = max(1e-6, (sum(measured) - sampled_in_steps) / len(measured))
        timed = 1 if sizes is None else sum(sizes(s) for s in range(done - len(measured), done))

        def per_step(s: int) -> float:
            return base if sizes is None else base * len(measured) * sizes(s) / timed

        left = max(0.0, cfg.time_budget_s - spent)
        prefix = [0.0]  # prefix[k]: base seconds of steps done..done+k-1

        def base_cost(n: int) -> float:
            while len(prefix) <= n - done:
                prefix.append(prefix[-1] + per_step(done + len(prefix) - 1))
            return prefix[n - done]

        def cost(n: int) -> float:  # seconds of steps done..n-1 when the run has n steps
            c = cfg.model_copy(update={"max_steps": n})
            calls = [
                calls_per_step * (1 - (1 - onpolicy.fraction_at(s, c)) ** rows_per_call)
                for s in range(done, n)
            ] if per_call else []  # fmt: skip
            return base_cost(n) + per_call * sum(calls)

        lo, hi = done, max(done, cfg.max_steps)  # the most steps whose cost fits: cost grows with n
        if per_call == 0:  # no sampling: walk up, so a lifted max_steps costs no more than the budget
            n = done
            while n < hi and base_cost(n + 1) <= left:
                n += 1
            lo = hi = n
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if cost(mid) <= left else (lo, mid - 1)
        fits_cap = lo >= cfg.max_steps  # the most that fit is all max_steps allows
        return cls(lo, base, cfg.time_budget_s, spent, fits_cap, per_call, calls_per_step, rows_per_call,
                   spent + cost(lo), len(measured))  # fmt: skip

    def refit(
        self, cfg: TrainConfig, done: int, measured: list[float], spent: float, sampled_in_steps: float,
        sampled_calls: int, sizes: StepSizes | None = None,
    ) -> TimePlan:  # fmt: skip
        """The plan fitted again at step ``done`` on the latest steps' times (``measured``) and the
        wall time spent so far (``cfg.max_steps``: the upper bound, as for the first plan). The
        first plan times a few steps near the start; on a shared machine later steps ran slower or
        faster, and a plan kept from the start overran a 6-minute budget by a quarter and left a
        tenth of an hour unused. Refitted, the run ends with its budget. A sampling call is charged
        at least what the first plan charged (the probe's full-length answers): the calls seen so
        far can be the short answers of a barely trained student."""
        seen = sampled_in_steps / sampled_calls if sampled_calls else 0.0
        per_call = max(seen, self.sample_seconds_per_call)
        new = TimePlan.fit(cfg, done, measured, spent, sampled_in_steps, per_call, self.calls_per_step,
                           self.rows_per_call, sizes)  # fmt: skip
        first = self.first_max_steps or self.max_steps
        return replace(new, measured_steps=self.measured_steps, first_max_steps=first, refits=self.refits + 1)

    def describe(self, budget: str) -> str:
        eta = (
            self.planned_seconds
            or self.spent_seconds + (self.max_steps - PLAN_WARMUP - PLAN_MEASURE[0]) * self.step_seconds
        )
        bound = " (train.max_steps, the upper bound)" if self.capped else ""
        sampling = (f" + {self.sample_seconds_per_call:.2f} s per micro-batch the student samples for"
                    if self.sample_seconds_per_call else "")  # fmt: skip
        return (f"time budget {budget}: {self.step_seconds:.2f} s/step after warm-up{sampling} -> "
                f"{self.max_steps} steps{bound}, about {eta / 60:.1f} min in all")  # fmt: skip

    def save(self, path: Path) -> None:
        fsio.write_text(path, json.dumps(self.__dict__, indent=1))

    @classmethod
    def load(cls, path: Path) -> TimePlan | None:
        return cls(**json.loads(path.read_text())) if path.is_file() else None


def _sampling_probe(model, examples: list[Example], step: int, cfg: TrainConfig, pad_id: int) -> float:
    """Seconds of one sampling call, timed on one micro-batch's prompts (for the time plan while λ
    is still 0; the samples are thrown away, the RNG left as it was). Every answer runs to
    ``onpolicy_max_new_tokens``: a barely trained student often ends its answers within a few tokens,
    and a call timed on those under-counts the later ones (a plan built on it overran its budget by
    70%); the longest call makes the plan an upper bound instead."""
    rows = [prompt_part(ids, m) for ids, m in examples[: cfg.batch_size]]
    t0 = time.perf_counter()
    onpolicy.sample_answers(model, rows, cfg, pad_id, seed=step, full_length=True)
    return time.perf_counter() - t0


def _from_rank0(value: float, acc: Accelerator, world: int) -> float:
    """Rank 0's value on every process (a precision choice, a step count: they must all stop at
    the same step)."""
    if world == 1:
        return value
    agreed = torch.tensor([float(value)], dtype=torch.float64, device=acc.device)
    torch.distributed.broadcast(agreed, src=0)
    return float(agreed)


def freeze_embeddings(model: torch.nn.Module) -> int:
    """Stop the token embeddings and the LM head (the same matrix when tied) from training; returns
    how many weights that holds still. The chunked loss then skips the head's weight gradient."""
    frozen: dict[int, torch.nn.Parameter] = {}
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        for p in module.parameters() if module is not None else ():
            frozen[id(p)] = p
    for p in frozen.values():
        p.requires_grad_(False)
    return sum(p.numel() for p in frozen.values())


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
    accelerator: Accelerator | None = None,
    onpolicy_teacher: TeacherSignal | None = None,
) -> dict:
    """Train ``student`` in place; checkpoints and ``metrics.jsonl`` go under ``out_dir``.

    Runs as one process, or as several under ``accelerate launch`` / ``torchrun`` (DDP):
    every process takes its share of each step's micro-batches, the loss is divided by
    the step's *global* count of target tokens and multiplied by the number of processes
    (DDP averages gradients), so N processes equal one with the same global batch. A student
    already sharded with FSDP2's ``fully_shard`` is trained as it is (its gradients are
    reduce-scattered and averaged the same way), and its checkpoints hold the full weights.

    ``onpolicy_teacher``: grades the rows the student sampled itself, where ``teacher`` cannot (a
    cache holds the teacher's answers only); default ``teacher``.

    Returns a summary: steps, tokens, wall seconds, first and last loss.
    """
    if not examples:
        raise TrainingError("no training examples: did the teacher answer any training prompt?")
    acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    world, rank, main = acc.num_processes, acc.process_index, acc.is_main_process
    if cfg.dtype == "auto":  # called directly, not through the pipeline (which resolves it first)
        from distill.core.hardware import choose_precision

        text = student.config.get_text_config()
        hidden = text.hidden_size
        chosen = choose_precision("auto", acc.device, hidden, getattr(text, "intermediate_size", 4 * hidden))
        cfg = cfg.model_copy(update={"dtype": chosen.dtype})
        if main:
            console.print(f"precision: {chosen.reason}")
    if world > 1:  # each process measured for itself: rank 0's choice holds for all
        bf16 = bool(_from_rank0(float(cfg.bf16), acc, world))
        cfg = cfg.model_copy(update={"dtype": "bfloat16" if bf16 else "float32"})
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out_dir / "checkpoints"
    torch.manual_seed(cfg.seed)
    student.train()
    if cfg.freeze_embeddings:
        frozen = freeze_embeddings(student)
        if main:
            console.print(f"embeddings frozen: {frozen / 1e6:.1f}M weights keep their values")
    trainable = [p for p in student.parameters() if p.requires_grad]  # LoRA: the adapters only
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0}]
    try:  # one fused kernel per step: on a CPU, 3.5x faster than the per-tensor ops
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=True)
    except (RuntimeError, ValueError):  # a device or dtype the fused kernel does not take
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    metrics_path, plan_path = out_dir / "metrics.jsonl", out_dir / "train_plan.json"
    if not resume and main:  # a fresh start: nothing of an earlier run may be rotated in or resumed
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        metrics_path.unlink(missing_ok=True)
        plan_path.unlink(missing_ok=True)
    acc.wait_for_everyone()
    step = 0
    last = latest_checkpoint(ckpt_dir)
    if last is not None:
        step = load_checkpoint(last, student, opt, rank=rank)
        if main:
            console.print(f"resuming from {last} (step {step})")
    elapsed0 = 0.0  # training seconds before this process: the kept steps' (the budget counts them)
    if main:  # steps logged after the checkpoint were undone by the kill: they are run again
        elapsed0 = _keep_metrics_upto(metrics_path, step)
    elapsed0 = _from_rank0(elapsed0, acc, world)
    plan = TimePlan.load(plan_path) if cfg.time_budget_s else None
    bound = cfg  # train.max_steps as given: the upper bound every fit of the plan keeps
    fitted_at = step  # the step the plan was last fitted at (a resumed run refits from here)
    if plan is not None:
        cfg = cfg.model_copy(update={"max_steps": plan.max_steps})
    if _is_fsdp2(student) and cfg.chunked_loss:
        raise TrainingError(
            "train.chunked_loss reads the LM head's weight outside its forward, where FSDP2 keeps it "
            "sharded: set train.chunked_loss=false for an FSDP-sharded student"
        )
    if _is_fsdp2(student):  # sharded by the caller (fully_shard): accelerate must not wrap it in DDP
        model, opt = student, acc.prepare(opt)
    else:
        model, opt = acc.prepare(student, opt)
    if acc.log_with:
        acc.init_trackers("tensorboard")
    if cfg.chunked_loss:
        check_chunked_head(model, micro_batches(examples, step, cfg, pad_id, rank, world)[0].to(acc.device))
    # on the student's own answers: the chosen divergence alone, no CE (its tokens are not targets)
    on_cfg = cfg.model_copy(update={"alpha": 1.0, "loss": cfg.onpolicy_loss})
    history: list[dict] = []
    t_start, tokens = time.perf_counter(), 0
    step_times: list[float] = []
    measure = plan_measure(cfg)
    sampling: list[float] = []  # seconds each step spent in on-policy sampling
    probed = 0.0  # seconds the time plan's sampling probe took
    sampled_calls: list[int] = []
    sizes: StepSizes | None = None  # the positions of each step, built once a plan needs them
    with progress_bar("step", disable=not main) as bar:
        task = bar.add_task("train", total=cfg.max_steps, completed=step, info="")
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            batches = [
                (b.to(acc.device), False) for b in micro_batches(examples, step, cfg, pad_id, rank, world)
            ]
            if cfg.onpolicy_fraction > 0:  # some answers resampled by the student itself (GKD)
                t_sample = time.perf_counter()
                retok = getattr(teacher, "retokenize", None)  # another tokenizer: the samples re-read
                batches = [
                    part
                    for m, (b, _) in enumerate(batches)
                    for part in onpolicy.mix(
                        b, model, cfg, pad_id, step=step, micro=m, rank=rank, retokenize=retok
                    )
                ]
                sampling.append(time.perf_counter() - t_sample)
            n_prompt = sum(int(b.prompt_targets().sum()) for b, _ in batches) if cfg.prompt_weight else 0
            counts = torch.tensor([sum(b.num_target_tokens for b, _ in batches), n_prompt])
            if world > 1:
                counts = acc.reduce(counts.to(acc.device), "sum").cpu()
            n_tok, n_prompt = (int(c) for c in counts)
            parts = torch.zeros(5, dtype=torch.float64)  # loss, kd, ce, hidden, prompt kd of this process
            on_rows = 0
            for i, (batch, on) in enumerate(batches):
                # Gradients are all-reduced once, on the step's last micro-batch.
                sync = acc.no_sync(model) if i < len(batches) - 1 else nullcontext()
                on_rows += len(batch.samples()) if on else 0
                with sync:
                    grader = (onpolicy_teacher or teacher) if on else teacher  # a cache knows no samples
                    part = distill_loss(
                        model, grader, batch, on_cfg if on else cfg, n_tok, vocab_size, n_prompt
                    )
                    acc.backward(part.loss * world)  # DDP averages over processes; we want the sum
                parts += torch.tensor(
                    [float(part.loss.detach()), part.kd, part.ce, part.hidden, part.prompt],
                    dtype=torch.float64,
                )
            if world > 1:
                parts = acc.reduce(parts.to(acc.device), "sum").cpu()
            norm = acc.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            grad_norm = float(
                norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            )  # FSDP2: a DTensor
            # Both figures are global (summed over processes; the norm of all-reduced gradients), so
            # every process stops here together, and a bad step never reaches the weights.
            if not (math.isfinite(parts[0]) and math.isfinite(grad_norm)):
                kept = latest_checkpoint(ckpt_dir)
                raise TrainingError(
                    f"non-finite {'loss' if not math.isfinite(parts[0]) else 'gradient norm'} at step "
                    f"{step + 1} (loss={float(parts[0])}, grad norm={grad_norm}); the step was not applied; "
                    f"last good checkpoint: {kept or 'none'}. Lower train.lr or check the data."
                )
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            step_tokens = sum(int(b.attention_mask.sum()) for b, _ in batches) * world
            tokens += step_tokens
            total, kd, ce, hidden, prompt_kd = parts.tolist()
            rec = {"step": step, "loss": total, "kd": kd, "ce": ce, "hidden": hidden, "prompt_kd": prompt_kd,
                   "lr": lr, "grad_norm": grad_norm, "target_tokens": n_tok, "onpolicy_rows": on_rows,
                   "tokens_per_s": step_tokens / dt,
                   "elapsed_s": elapsed0 + time.perf_counter() - t_start}  # fmt: skip
            history.append(rec)
            if main:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
            if acc.log_with:
                acc.log({f"train/{k}": v for k, v in rec.items() if k != "step"}, step=step)
            rate = tokens / (time.perf_counter() - t_start)  # every process's tokens, since this run began
            # a term the loss never computes is not shown: KD at alpha 0 with no sampled rows, CE at alpha 1
            kd_on = cfg.alpha > 0 or cfg.onpolicy_fraction > 0
            terms = " ".join(t for t, on in ((f"kd {kd:.3f}", kd_on), (f"ce {ce:.3f}", cfg.alpha < 1)) if on)
            bar.update(task, advance=1, info=f"loss {total:.3f} {terms} · {rate:,.0f} tok/s")
            step_times.append(dt)
            sampled_calls.append(sum(1 for _, on in batches if on))  # one generate call each
            if cfg.time_budget_s and plan is None and len(step_times) == PLAN_WARMUP + measure:
                in_steps, per_call = 0.0, 0.0
                if cfg.onpolicy_fraction > 0:
                    in_steps = sum(sampling[PLAN_WARMUP:])
                    n_calls = sum(sampled_calls[PLAN_WARMUP:])
                    per_call = (
                        in_steps / n_calls if n_calls else _sampling_probe(model, examples, step, cfg, pad_id)
                    )
                    probed = 0.0 if n_calls else per_call  # the probe's one call: not a step's overhead
                sizes = StepSizes(examples, cfg, world)
                spent = elapsed0 + time.perf_counter() - t_start
                timed, accum, rows = step_times[PLAN_WARMUP:], cfg.grad_accum, cfg.batch_size
                plan = TimePlan.fit(cfg, step, timed, spent, in_steps, per_call, accum, rows, sizes)
                plan.max_steps = plan.first_max_steps = int(_from_rank0(plan.max_steps, acc, world))
                cfg, fitted_at = cfg.model_copy(update={"max_steps": plan.max_steps}), step
                if main:
                    plan.save(plan_path)
                    console.print(plan.describe(cfg.time_budget))
                bar.update(task, total=cfg.max_steps)
            elif plan is not None and step < cfg.max_steps and step - fitted_at >= replan_every(plan):
                # what the steps do not time (checkpoint saves, metrics, refits), spread over them
                wall = time.perf_counter() - t_start
                overhead = max(0.0, wall - sum(step_times) - probed) / len(step_times)
                window = [t + overhead for t in step_times[PLAN_WARMUP:][-REPLAN_WINDOW:]]  # the 1st compiled
                calls = sampled_calls[PLAN_WARMUP:][-REPLAN_WINDOW:]
                in_window = sum(sampling[PLAN_WARMUP:][-REPLAN_WINDOW:])
                sizes = StepSizes(examples, cfg, world) if sizes is None else sizes
                new = plan.refit(bound, step, window, elapsed0 + wall, in_window, sum(calls), sizes)
                new.max_steps = int(_from_rank0(new.max_steps, acc, world))
                if main and abs(new.max_steps - plan.max_steps) >= max(2, plan.max_steps // 20):  # 5%: told
                    told = (f"time plan: the last {len(window)} steps took {new.step_seconds:.2f} s each, "
                            f"{plan.step_seconds:.2f} s planned -> {new.max_steps} steps instead of "
                            f"{plan.max_steps}, to end within {cfg.time_budget}")  # fmt: skip
                    console.print(told)
                plan, fitted_at = new, step
                cfg = cfg.model_copy(update={"max_steps": plan.max_steps})
                bar.update(task, total=cfg.max_steps)
            stopping = interrupt.requested() is not None
            if world > 1:  # every process stops at the same step, whichever got the signal
                flag = acc.reduce(torch.tensor([float(stopping)], device=acc.device), "sum")
                stopping = bool(flag.item() > 0)
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps or stopping:
                state, opt_state = full_states(acc, model, opt)  # collective under FSDP / DeepSpeed
                rng = gathered_rng_states(world)  # collective: every process's own, to rank 0
                if main:
                    save_checkpoint(ckpt_dir, step, state, opt_state, cfg.keep_checkpoints, rng)
                    if plan is not None:  # the plan this checkpoint's steps ran under
                        plan.save(plan_path)
                acc.wait_for_everyone()
            if stopping and step < cfg.max_steps:
                kept = ckpt_dir / f"step-{step:06d}"
                interrupt.stop(f"stopped at step {step} of {cfg.max_steps}, checkpoint {kept} written; run "
                               "the same command again to resume from it")  # fmt: skip
    if accelerator is None:  # this call made it: end it (a caller that passed one ends its own)
        acc.end_training()  # its process group destroyed before exit, so no process aborts at teardown
    student.eval()
    return {
        "steps": step,
        "time_plan": None if plan is None else plan.__dict__,
        "tokens": tokens,
        "seconds": time.perf_counter() - t_start,
        "first_loss": history[0]["loss"] if history else None,
        "last_loss": history[-1]["loss"] if history else None,
    }
