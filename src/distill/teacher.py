"""The teacher signal the training loop consumes, whatever produces it."""

from __future__ import annotations

from typing import Protocol

import torch
from transformers import PreTrainedModel

from distill.data import Batch


class TeacherSignal(Protocol):
    """Something that gives teacher logits for a training batch."""

    def logits(self, batch: Batch) -> torch.Tensor:
        """Teacher next-token logits ``(B, T, V)`` for ``batch.input_ids`` ``(B, T)``."""
        ...


class LiveTeacher:
    """A teacher model run alongside the student: inference only, no gradients."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model.eval().requires_grad_(False)

    @torch.no_grad()  # not inference_mode: its tensors cannot enter the loss's autograd graph
    def logits(self, batch: Batch) -> torch.Tensor:
        return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
