"""The teacher signal the training loop consumes, whatever produces it."""

from __future__ import annotations

from typing import Protocol

import torch
from transformers import PreTrainedModel

from distill.data import Batch
from distill.losses import TopKTeacher


class TeacherSignal(Protocol):
    """Something that gives the teacher's next-token distribution for a training batch."""

    def signal(self, batch: Batch) -> torch.Tensor | TopKTeacher:
        """For ``batch.input_ids`` ``(B, T)``: the teacher at the shifted positions 0..T-2,
        as dense logits ``(B, T-1, V)`` or a top-k ``TopKTeacher`` ``(B, T-1, k)``."""
        ...


class LiveTeacher:
    """A teacher model run alongside the student: inference only, no gradients."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model.eval().requires_grad_(False)

    @torch.no_grad()  # not inference_mode: its tensors cannot enter the loss's autograd graph
    def signal(self, batch: Batch) -> torch.Tensor:
        out = self.model(**batch.model_inputs())
        return out.logits[:, :-1]  # (B, T-1, V)
