"""One training step's loss: the student's forward pass on a micro-batch, the teacher signal, and
alpha * KD + (1 - alpha) * CE with the optional hidden-state and prompt terms."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from distill.core.config import TrainConfig
from distill.core.data import Batch
from distill.core.errors import TrainingError
from distill.core.models import forward_with_layer_outputs
from distill.losses.divergences import LOSSES, TopKTeacher, hidden_alignment, token_cross_entropy
from distill.losses.fused import (
    LogitTransform,
    chunked_divergence,
    kd_ce_block,
    topk_bucket_ce_block,
    topk_sample_ce_block,
)
from distill.teacher.crosstok import CrossSignal
from distill.teacher.signal import HeadRows, TeacherSignal


@dataclass
class StepLoss:
    """The loss of one micro-batch and its parts, already normalised by the step's tokens."""

    loss: torch.Tensor
    kd: float
    ce: float
    hidden: float = 0.0
    prompt: float = 0.0  # the KD term on prompt tokens, unweighted


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
