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
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import PreTrainedModel

from distill import fsio, interrupt, onpolicy
from distill.config import TrainConfig
from distill.crosstok import CrossSignal
from distill.data import Batch, collate, pack, prompt_part
from distill.losses import (
    LOSSES,
    LogitTransform,
    TopKTeacher,
    chunked_divergence,
    hidden_alignment,
    kd_ce_block,
    token_cross_entropy,
    topk_bucket_ce_block,
    topk_sample_ce_block,
)
from distill.models import forward_with_layer_outputs
from distill.progress import console, progress_bar
from distill.teacher import HeadRows, TeacherSignal

Example = tuple[list[int], list[bool]]


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a checkpoint that does not fit)."""


@dataclass
class StepLoss:
    """The loss of one micro-batch and its parts, already normalised by the step's tokens."""

    loss: torch.Tensor
    kd: float
    ce: float
    hidden: float = 0.0
    prompt: float = 0.0  # the KD term on prompt tokens, unweighted


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``cfg.lr``, then cosine decay to 10% of it at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


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
    per_step = global_bs * cfg.grad_accum
    perms: dict[int, list[int]] = {}
    if cfg.group_by_length:
        span, slot = divmod(step, GROUP_SPAN)
        first = span * GROUP_SPAN * per_step
        pool = [_stream_sample(examples, first + j, cfg.seed, perms) for j in range(GROUP_SPAN * per_step)]
        pool.sort(key=lambda s: len(examples[s][0]))  # stable: ties keep the stream's order
        order = list(range(GROUP_SPAN))
        random.Random(cfg.seed * 104729 + span).shuffle(order)
        chosen = pool[order[slot] * per_step : (order[slot] + 1) * per_step]
    else:
        chosen = [_stream_sample(examples, step * per_step + j, cfg.seed, perms) for j in range(per_step)]
    out = []
    for m in range(cfg.grad_accum):
        group = chosen[m * global_bs : (m + 1) * global_bs]
        rows = [examples[s] for s in group[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]]
        out.append(pack(rows, pad_id, cfg.max_seq_len) if cfg.packing else collate(rows, pad_id))
    return out


@dataclass
class Targets:
    """What the student is scored against at each shifted position: the teacher signal
    (``(B, T-1, V')`` logits or top-k, None when alpha = 0) and the teacher's tokens ``(B, T-1)``."""

    signal: torch.Tensor | TopKTeacher | HeadRows | None
    labels: torch.Tensor

    def flat(self) -> Targets:
        s = self.signal
        s = (
            s
            if s is None
            else s.flat()
            if isinstance(s, TopKTeacher | HeadRows)
            else s.reshape(-1, s.shape[-1])
        )
        return Targets(s, self.labels.reshape(-1))

    def take(self, rows: torch.Tensor) -> Targets:
        s = self.signal
        return Targets(s if s is None else s.take(rows) if isinstance(s, TopKTeacher | HeadRows) else s[rows],
                       self.labels[rows])  # fmt: skip

    def made(self) -> Targets:
        """With dense logits still to be made from the teacher's hidden states (``HeadRows``), made."""
        return Targets(self.signal.logits(), self.labels) if isinstance(self.signal, HeadRows) else self


def loss_options(cfg: TrainConfig) -> dict[str, float]:
    """The chosen divergence's own coefficient, from the config: JSD's beta, the skew KLs' alpha."""
    if cfg.loss == "jsd":
        return {"beta": cfg.jsd_beta}
    if cfg.loss.startswith("skew_"):
        return {"alpha": cfg.skew}
    return {}


def kd_ce_loss(cfg: TrainConfig, vocab_size: int | None, parts: dict[str, float]):
    """``loss(logits, targets, mask, *, num_tokens)`` = alpha * KD + (1 - alpha) * CE.

    One function for the plain path (all logits at once) and the chunked path (a block of
    positions at a time); the parts' values are added to ``parts`` for logging.
    """

    def loss(logits: torch.Tensor, targets: Targets, mask, *, num_tokens) -> torch.Tensor:
        targets = targets.made()
        total = logits.new_zeros((), dtype=torch.float32)
        if cfg.alpha > 0 and isinstance(targets.signal, CrossSignal):  # a teacher with another tokenizer
            kd = targets.signal.loss(logits, num_tokens=num_tokens)
            parts["kd"] += float(kd.detach())
            total = total + cfg.alpha * kd
        elif cfg.alpha > 0:
            kd = LOSSES[cfg.loss](
                logits, targets.signal, mask, temperature=cfg.distill_temperature,
                num_tokens=num_tokens, vocab_size=vocab_size, **loss_options(cfg),
            )  # fmt: skip
            parts["kd"] += float(kd.detach())
            total = total + cfg.alpha * kd
        if cfg.alpha < 1:
            ce = token_cross_entropy(logits, targets.labels, mask, num_tokens=num_tokens)
            parts["ce"] += float(ce.detach())
            total = total + (1 - cfg.alpha) * ce
        return total

    def value_and_grad(logits: torch.Tensor, targets: Targets, num_tokens):
        """Forward KL + CE in closed form, fused (chunked path; a dense teacher, or a top-k one with
        a tail bucket or tail samples); None: not this case, the block goes through autograd."""
        if not (cfg.fused_loss and cfg.loss == "forward_kl" and 0 < cfg.alpha):
            return None
        targets = targets.made()
        sig, width = targets.signal, logits.shape[-1]
        if vocab_size is not None and vocab_size != width:
            return None  # padded vocabularies: the general path drops the extra columns
        if isinstance(sig, TopKTeacher):
            if sig.tail == "renormalize" or cfg.distill_temperature != 1.0:
                return None
            block = topk_sample_ce_block if sig.tail == "sample" else topk_bucket_ce_block
            kd, ce, grad = block(logits, sig, targets.labels, alpha=cfg.alpha, num_tokens=float(num_tokens))
        elif isinstance(sig, torch.Tensor) and sig.shape[-1] == width:
            kd, ce, grad = kd_ce_block(
                logits, sig, targets.labels, alpha=cfg.alpha, temperature=cfg.distill_temperature,
                num_tokens=float(num_tokens),
            )  # fmt: skip
        else:
            return None
        parts["kd"] += float(kd)
        if cfg.alpha < 1:
            parts["ce"] += float(ce)
        return cfg.alpha * kd + (1 - cfg.alpha) * ce, grad

    loss.value_and_grad = value_and_grad
    return loss


HIDDEN_PROJECTION = "distill_hidden_projection"  # the student's attribute while it trains


def attach_hidden_projection(student: torch.nn.Module, teacher_width: int, seed: int = 0) -> bool:
    """Give ``student`` a learned ``Linear(H_s -> H_t)`` for hidden-state alignment when its width
    differs from the teacher's (True when attached). As a submodule it trains, is checkpointed and
    resumed with the student; ``detach_hidden_projection`` takes it off before the student is saved,
    so the exported model is a stock one."""
    width = student.config.hidden_size
    if width == teacher_width:
        return False
    gen = torch.Generator().manual_seed(seed)
    proj = torch.nn.Linear(width, teacher_width, bias=False)
    with torch.no_grad():  # a random orthogonal map: keeps the states' norms at the start
        q, _ = torch.linalg.qr(
            torch.randn(max(width, teacher_width), min(width, teacher_width), generator=gen)
        )
        proj.weight.copy_(q if teacher_width >= width else q.T)
    setattr(student, HIDDEN_PROJECTION, proj)
    return True


def detach_hidden_projection(student: torch.nn.Module) -> None:
    if hasattr(student, HIDDEN_PROJECTION):
        delattr(student, HIDDEN_PROJECTION)


def distill_loss(
    student: torch.nn.Module,
    teacher: TeacherSignal,
    batch: Batch,
    cfg: TrainConfig,
    num_tokens: int,
    vocab_size: int | None = None,
    num_prompt_tokens: int = 0,
) -> StepLoss:
    """alpha * KD(teacher || student) + (1 - alpha) * CE(teacher tokens) on answer positions,
    + ``prompt_weight`` * KD on prompt positions (normalised by ``num_prompt_tokens``, the step's
    global count of them) + ``hidden_weight`` * hidden-state alignment.

    With ``cfg.chunked_loss`` the student's logits are never built for all positions at once:
    the loss runs on its final hidden states and LM head block by block (``chunked_divergence``).
    """
    device = batch.input_ids.device.type
    autocast = torch.autocast(device, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
    mask = batch.answer_mask[:, 1:]  # position t predicts token t + 1
    teacher_hidden = None
    if cfg.hidden_weight > 0:  # one teacher forward gives the logits and the layers to align with
        if not hasattr(teacher, "signal_and_hidden"):
            raise TrainingError(
                "train.hidden_weight needs a live teacher: a cache or an API holds no hidden states"
            )
        signal, teacher_hidden = teacher.signal_and_hidden(batch)
        signal = signal if cfg.alpha > 0 else None
    else:
        signal = (
            teacher.signal(batch, lazy=cfg.chunked_loss) if cfg.alpha > 0 else None
        )  # chunked: no (B, T, V)
    targets = Targets(signal, batch.input_ids[:, 1:])
    parts = {"kd": 0.0, "ce": 0.0}
    loss_fn = kd_ce_loss(cfg, vocab_size, parts)
    on_prompt = cfg.prompt_weight > 0 and signal is not None and num_prompt_tokens > 0
    if on_prompt:  # the teacher's signal already covers the prompt: KD alone there, no CE
        prompt_parts = {"kd": 0.0, "ce": 0.0}
        prompt_fn = kd_ce_loss(cfg.model_copy(update={"alpha": 1.0}), vocab_size, prompt_parts)
        prompt_mask = batch.prompt_targets()  # (B, T-1)
    aligned = teacher_hidden is not None
    with autocast:
        if cfg.chunked_loss:
            out, layer_outs = _student_forward(
                student, batch, aligned, logits_to_keep=1, output_hidden_states=True
            )
            model = getattr(student, "module", student)
            head = model.get_output_embeddings()
            hidden = out.hidden_states[-1][:, :-1]  # (B, T-1, H), after the final norm
            transform = LogitTransform.of(model.config)  # soft-capping, a logit scale: what the head omits
            if isinstance(signal, CrossSignal):  # another tokenizer: the CE, then the term on its own rows
                ce_fn = kd_ce_loss(cfg.model_copy(update={"alpha": 0.0}), vocab_size, parts)
                loss = (1 - cfg.alpha) * chunked_divergence(
                    ce_fn, hidden, head.weight, Targets(None, targets.labels), mask, lm_head_bias=head.bias,
                    num_tokens=num_tokens, transform=transform,
                ) if cfg.alpha < 1 else hidden.new_zeros((), dtype=torch.float32)  # fmt: skip
                kd = signal.chunked_loss(
                    hidden, head.weight, head.bias, num_tokens=num_tokens, transform=transform
                )
                parts["kd"] += float(kd.detach())
                loss = loss + cfg.alpha * kd
            else:
                loss = chunked_divergence(loss_fn, hidden, head.weight, targets, mask, lm_head_bias=head.bias,
                                          num_tokens=num_tokens, transform=transform)  # fmt: skip
            if on_prompt:
                loss = loss + cfg.prompt_weight * chunked_divergence(
                    prompt_fn, hidden, head.weight, targets, prompt_mask, lm_head_bias=head.bias,
                    num_tokens=num_prompt_tokens, transform=transform,
                )  # fmt: skip
        else:
            out, layer_outs = _student_forward(student, batch, aligned)
            loss = loss_fn(out.logits[:, :-1], targets, mask, num_tokens=num_tokens)  # (B, T-1, V)
            if on_prompt:
                loss = loss + cfg.prompt_weight * prompt_fn(
                    out.logits[:, :-1], targets, prompt_mask, num_tokens=num_prompt_tokens
                )
        hidden = 0.0
        if teacher_hidden is not None:
            mine = [h[:, :-1] for h in layer_outs]  # every student layer's output, before the final norm
            proj = getattr(getattr(student, "module", student), HIDDEN_PROJECTION, None)
            h_loss = hidden_alignment(mine, teacher_hidden, mask, kind=cfg.hidden_loss, num_tokens=num_tokens,
                                      projection=proj)  # fmt: skip
            hidden = float(h_loss.detach())
            loss = loss + cfg.hidden_weight * h_loss
    return StepLoss(loss, parts["kd"], parts["ce"], hidden, prompt_parts["kd"] if on_prompt else 0.0)


def _student_forward(student: torch.nn.Module, batch: Batch, with_layers: bool, **kwargs):
    """The student's output on ``batch`` and, ``with_layers``, each decoder layer's output before the
    final norm, paired like with like with the teacher's (``forward_with_layer_outputs``); else None."""
    if with_layers:
        return forward_with_layer_outputs(student, **batch.model_inputs(), **kwargs)
    return student(**batch.model_inputs(), **kwargs), None


@torch.no_grad()
def check_chunked_head(student: torch.nn.Module, batch: Batch) -> None:
    """Check once that the chunked loss rebuilds the student's own logits from its last hidden
    state, head and declared logit transform; a model that transforms its logits some other way
    would otherwise train against the wrong ones, silently.

    Raises:
        TrainingError: the two differ; the message says to set ``train.chunked_loss=false``.
    """
    model = getattr(student, "module", student)
    head = model.get_output_embeddings()
    rows = batch.input_ids[:1, :64]  # one short row is enough to see a transform
    with torch.autocast(rows.device.type, enabled=False):
        out = model(input_ids=rows, output_hidden_states=True)
        ours, _ = LogitTransform.of(model.config).apply(
            torch.nn.functional.linear(out.hidden_states[-1], head.weight, head.bias)
        )
    if not torch.allclose(ours.float(), out.logits.float(), rtol=1e-3, atol=1e-3):
        diff = float((ours.float() - out.logits.float()).abs().max())
        raise TrainingError(
            f"{type(model).__name__} transforms its logits in a way the chunked loss does not know "
            f"(max difference {diff:.3g}); set train.chunked_loss=false for this model"
        )


# --- checkpoints -----------------------------------------------------------------------------


def _is_fsdp2(model: torch.nn.Module) -> bool:
    """Is ``model`` sharded by FSDP2's ``fully_shard`` (its parameters DTensors)?"""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_states(acc: Accelerator, model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The whole model's weights and the optimizer's state, gathered from every process's shard
    under FSDP2 (a collective: every process calls it); plain state dicts otherwise."""
    if not _is_fsdp2(model):
        return acc.get_state_dict(model), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=full), get_optimizer_state_dict(model, opt, options=full)


def save_checkpoint(
    ckpt_dir: Path,
    step: int,
    model_state: dict,
    opt_state: dict,
    keep: int,
    rng_states: list[dict] | None = None,
) -> Path:
    """Write ``ckpt_dir/step-XXXXXX`` atomically; keep only the last ``keep`` checkpoints.

    ``rng_states``: every process's ``_rng_states`` by rank (``gathered_rng_states``), each written
    as ``rng-{rank}.pt``; None: this one process's.
    """
    final = ckpt_dir / f"step-{step:06d}"
    tmp = ckpt_dir / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model_state.items()}
    # Tied weights share storage; safetensors wants one copy of each tensor.
    seen: dict[int, str] = {}
    for k in list(state):
        ptr = state[k].data_ptr()
        if ptr in seen:
            state[k] = state[k].clone()
        seen[ptr] = k
    try:  # each file fsynced as it is written
        fsio.save_safetensors(state, tmp / "model.safetensors")
        fsio.save_torch(opt_state, tmp / "optimizer.pt")
        for rank, states in enumerate(rng_states or [_rng_states()]):
            fsio.save_torch(states, tmp / f"rng-{rank}.pt")
        fsio.write_bytes(tmp / "trainer_state.json", json.dumps({"step": step}).encode())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written checkpoint does not stay behind
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(ckpt_dir.glob("step-*"))[:-keep]:
        shutil.rmtree(old)
    return final


def _rng_states() -> dict:
    """This process's random state of the CPU and, with CUDA, of every visible GPU (dropout and
    sampling on a GPU draw from those; each process has its own, and under DDP draws from its own
    device's): uint8 tensors, which a machine without a GPU loads as well."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return states


def gathered_rng_states(world: int) -> list[dict] | None:
    """Every process's ``_rng_states`` by rank, on rank 0 (None on the others): each process draws
    its own dropout and samples, so each resumes from its own state. A collective when world > 1."""
    if world == 1:
        return [_rng_states()]
    rank = torch.distributed.get_rank()
    gathered = [None] * world if rank == 0 else None
    torch.distributed.gather_object(_rng_states(), gathered, dst=0)
    return gathered


def _set_rng_states(states: dict) -> None:
    """Set back what ``_rng_states`` kept; the GPUs' states only where there are GPUs (as many as
    there are now)."""
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"][: torch.cuda.device_count()])


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = sorted(p for p in ckpt_dir.glob("step-*") if (p / "trainer_state.json").is_file())
    return found[-1] if found else None


def load_checkpoint(path: Path, student: PreTrainedModel, opt: torch.optim.Optimizer, rank: int = 0) -> int:
    """Restore weights, optimizer and process ``rank``'s RNG from ``path``; returns the step to
    continue from. An FSDP2-sharded student takes its shard of the full checkpoint on every process.

    RNG: ``rng-{rank}.pt``; a checkpoint of fewer processes (or of the older single ``rng.pt``)
    gives rank 0's state to the ranks it lacks.
    """
    state = load_file(path / "model.safetensors")
    opt_state = torch.load(path / "optimizer.pt", weights_only=True)
    if _is_fsdp2(student):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(student, state, options=full)
        set_optimizer_state_dict(student, opt, opt_state, options=full)
    else:
        missing, unexpected = student.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise TrainingError(f"{path}: checkpoint does not fit the student ({missing or unexpected})")
        opt.load_state_dict(opt_state)
    candidates = (path / f"rng-{rank}.pt", path / "rng.pt", path / "rng-0.pt")
    rng = next((p for p in candidates if p.is_file()), candidates[0])
    _set_rng_states(torch.load(rng, weights_only=True))
    return json.loads((path / "trainer_state.json").read_text())["step"]


def _keep_metrics_upto(path: Path, step: int) -> None:
    """Drop the records after ``step`` from ``metrics.jsonl`` (atomic rewrite), so each step is there once."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [ln for ln in lines if ln.strip() and ln.endswith("\n") and json.loads(ln)["step"] <= step]
    if len(kept) != len(lines):
        fsio.write_text(path, "".join(kept))


# --- time budget -----------------------------------------------------------------------------

PLAN_WARMUP = 1  # steps not timed: the first compiles the fused loss and warms the allocator
PLAN_MEASURE = (
    2  # steps timed to plan the rest (inside the LR warmup, so no step so far depended on the plan)
)


@dataclass
class TimePlan:
    """The step count ``train.time_budget`` allows, measured once and kept (a resumed run reuses it,
    so its LR schedule is the one the run started with).

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

    @classmethod
    def fit(
        cls, cfg: TrainConfig, done: int, measured: list[float], spent: float,
        sampled_in_steps: float = 0.0, per_call: float = 0.0, calls_per_step: int = 0, rows_per_call: int = 0,
    ) -> TimePlan:  # fmt: skip
        """``measured``: seconds of each timed step, of which ``sampled_in_steps`` in all went to
        on-policy sampling; ``per_call``: seconds of one sampling call."""
        base = max(1e-6, (sum(measured) - sampled_in_steps) / len(measured))
        left = max(0.0, cfg.time_budget_s - spent)

        def cost(n: int) -> float:  # seconds of steps done..n-1 when the run has n steps
            c = cfg.model_copy(update={"max_steps": n})
            calls = [
                calls_per_step * (1 - (1 - onpolicy.fraction_at(s, c)) ** rows_per_call)
                for s in range(done, n)
            ]
            return (n - done) * base + per_call * sum(calls)

        lo, hi = done, max(done, cfg.max_steps)  # the most steps whose cost fits: cost grows with n
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if cost(mid) <= left else (lo, mid - 1)
        fits_cap = cost(cfg.max_steps) <= left
        return cls(lo, base, cfg.time_budget_s, spent, fits_cap, per_call, calls_per_step, rows_per_call,
                   spent + cost(lo))  # fmt: skip

    def describe(self, budget: str) -> str:
        eta = (
            self.planned_seconds
            or self.spent_seconds + (self.max_steps - PLAN_WARMUP - PLAN_MEASURE) * self.step_seconds
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
    is still 0; the samples are thrown away, the RNG left as it was)."""
    rows = [prompt_part(ids, m) for ids, m in examples[: cfg.batch_size]]
    t0 = time.perf_counter()
    onpolicy.sample_answers(model, rows, cfg, pad_id, seed=step)
    return time.perf_counter() - t0


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
        from distill.hardware import choose_precision

        text = student.config.get_text_config()
        hidden = text.hidden_size
        chosen = choose_precision("auto", acc.device, hidden, getattr(text, "intermediate_size", 4 * hidden))
        cfg = cfg.model_copy(update={"dtype": chosen.dtype})
        if main:
            console.print(f"precision: {chosen.reason}")
    if world > 1:  # each process measured for itself: rank 0's choice holds for all
        bf16 = torch.tensor([float(cfg.bf16)], device=acc.device)
        torch.distributed.broadcast(bf16, src=0)
        cfg = cfg.model_copy(update={"dtype": "bfloat16" if bool(bf16.item()) else "float32"})
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out_dir / "checkpoints"
    torch.manual_seed(cfg.seed)
    student.train()
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
    if main:  # steps logged after the checkpoint were undone by the kill: they are run again
        _keep_metrics_upto(metrics_path, step)
    plan = TimePlan.load(plan_path) if cfg.time_budget_s else None
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
    sampling: list[float] = []  # seconds each step spent in on-policy sampling
    sampled_calls: list[int] = []
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
                   "tokens_per_s": step_tokens / dt}  # fmt: skip
            history.append(rec)
            if main:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
            if acc.log_with:
                acc.log({f"train/{k}": v for k, v in rec.items() if k != "step"}, step=step)
            bar.update(task, advance=1, info=f"loss {total:.3f} kd {kd:.3f} ce {ce:.3f}")
            step_times.append(dt)
            sampled_calls.append(sum(1 for _, on in batches if on))  # one generate call each
            if cfg.time_budget_s and plan is None and len(step_times) == PLAN_WARMUP + PLAN_MEASURE:
                in_steps, per_call = 0.0, 0.0
                if cfg.onpolicy_fraction > 0:
                    in_steps = sum(sampling[PLAN_WARMUP:])
                    n_calls = sum(sampled_calls[PLAN_WARMUP:])
                    per_call = (
                        in_steps / n_calls if n_calls else _sampling_probe(model, examples, step, cfg, pad_id)
                    )
                plan = TimePlan.fit(cfg, step, step_times[PLAN_WARMUP:], time.perf_counter() - t_start,
                                    in_steps, per_call, cfg.grad_accum, cfg.batch_size)  # fmt: skip
                if world > 1:  # every process must stop at the same step: rank 0's plan holds
                    agreed = torch.tensor([plan.max_steps], device=acc.device)
                    torch.distributed.broadcast(agreed, src=0)
                    plan.max_steps = int(agreed)
                cfg = cfg.model_copy(update={"max_steps": plan.max_steps})
                if main:
                    plan.save(plan_path)
                    console.print(plan.describe(cfg.time_budget))
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
                acc.wait_for_everyone()
            if stopping and step < cfg.max_steps:
                kept = ckpt_dir / f"step-{step:06d}"
                interrupt.stop(f"stopped at step {step} of {cfg.max_steps}, checkpoint {kept} written; run "
                               "the same command again to resume from it")  # fmt: skip
    if acc.log_with:
        acc.end_training()
    student.eval()
    return {
        "steps": step,
        "time_plan": None if plan is None else plan.__dict__,
        "tokens": tokens,
        "seconds": time.perf_counter() - t_start,
        "first_loss": history[0]["loss"] if history else None,
        "last_loss": history[-1]["loss"] if history else None,
    }
