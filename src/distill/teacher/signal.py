"""The teacher signal the training loop consumes, whatever produces it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from distill.core.data import Batch
from distill.core.models import forward_with_layer_outputs
from distill.losses.divergences import TopKTeacher


@dataclass(frozen=True)
class HeadRows:
    """Dense teacher logits kept as the teacher's final hidden states ``(..., H)`` and its LM head:
    a chunked loss makes the logits of one block of rows at a time, so the teacher's ``(B, T, V)``
    logits never exist (201 MB in bf16 for 8 x 256 tokens at V = 49,152; 1 GB at V = 262,144)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None

    def flat(self) -> HeadRows:
        return HeadRows(self.hidden.reshape(-1, self.hidden.shape[-1]), self.weight, self.bias)

    def take(self, rows: torch.Tensor) -> HeadRows:
        return HeadRows(self.hidden[rows], self.weight, self.bias)

    def logits(self) -> torch.Tensor:
        """The rows' logits, in the teacher's own dtype (never under the student's autocast)."""
        with torch.autocast(self.hidden.device.type, enabled=False):
            return F.linear(self.hidden, self.weight, self.bias)


class TeacherSignal(Protocol):
    """Something that gives the teacher's next-token distribution for a training batch."""

    def signal(self, batch: Batch, *, lazy: bool = False) -> torch.Tensor | TopKTeacher | HeadRows:
        """For ``batch.input_ids`` ``(B, T)``: the teacher at the shifted positions 0..T-2, as dense
        logits ``(B, T-1, V)``, a top-k ``TopKTeacher`` ``(B, T-1, k)``, or with ``lazy`` (a chunked
        loss asks for it) dense logits still to be made from ``HeadRows``."""
        ...


class LiveTeacher:
    """A teacher model run alongside the student: inference only, no gradients.

    The teacher may sit on another device than the student (``teacher.device``, e.g. a second GPU,
    or spread by ``device_map``): each batch goes to the teacher's device and its signal comes back
    to the batch's; the LM head is copied over once.
    """

    def __init__(self, model: PreTrainedModel, align_layers: list[int] | None = None) -> None:
        """``align_layers``: the teacher layers whose outputs ``signal_and_hidden`` also returns
        (for a hidden-state alignment loss; student layer j is paired with ``align_layers[j]``)."""
        self.model = model.eval().requires_grad_(False)
        self.align_layers = align_layers
        self._head_ok: bool | None = None  # logits == LM head(last hidden state)? checked once
        self._head: dict[torch.device, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _head_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        if device not in self._head:
            head = self.model.get_output_embeddings()
            bias = None if head.bias is None else head.bias.to(device)
            self._head[device] = (head.weight.to(device), bias)
        return self._head[device]

    @torch.no_grad()
    def signal_and_hidden(self, batch: Batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Dense logits ``(B, T-1, V)`` and the outputs ``(B, T-1, H)`` of ``align_layers``, before
        the final norm (``forward_with_layer_outputs``), from one forward pass, on the batch's device."""
        if self.align_layers is None:
            raise ValueError("LiveTeacher(align_layers=...) names no layers to align with")
        home = batch.input_ids.device
        out, layers = forward_with_layer_outputs(self.model, **batch.to(self.model.device).model_inputs())
        hidden = [layers[i][:, :-1].to(home) for i in self.align_layers]
        return out.logits[:, :-1].to(home), hidden

    @torch.no_grad()  # not inference_mode: its tensors cannot enter the loss's autograd graph
    def signal(self, batch: Batch, *, lazy: bool = False) -> torch.Tensor | HeadRows:
        home = batch.input_ids.device
        inputs = batch.to(self.model.device).model_inputs()
        head = self.model.get_output_embeddings()
        if not lazy or not isinstance(head, torch.nn.Linear) or self._head_ok is False:
            return self.model(**inputs).logits[:, :-1].to(home)  # (B, T-1, V)
        if self._head_ok is None:
            # Some models transform the head's output (soft-capping, a logit scale): check once that
            # this one does not, by comparing with its own logits, and else keep the plain path.
            out = self.model(**inputs, output_hidden_states=True)
            rows = HeadRows(out.hidden_states[-1][:, :-1].to(home), *self._head_on(home))
            logits = out.logits[:, :-1].to(home)
            self._head_ok = torch.allclose(rows.logits().float(), logits.float(), rtol=1e-2, atol=1e-2)
            return rows if self._head_ok else logits
        hidden = self.model.base_model(**inputs).last_hidden_state  # (B, T, H), normed
        return HeadRows(hidden[:, :-1].to(home), *self._head_on(home))


def sample_key(ids: list[int]) -> str:
    """Content key of one training sequence: a hash of its token ids."""
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()[:24]
