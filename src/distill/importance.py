"""Which of the teacher's layers a shrunk student should keep, by measured importance.

A decoder block that barely turns its input (its output nearly parallel to its input) can go with
the least loss. Block importance (the "block influence" of ShortGPT, Men et al. 2024, and the depth
score of NVIDIA's Minitron) is

    BI_i = mean over tokens of (1 - cos(x_i, y_i))

with ``x_i`` the block's input and ``y_i`` its output, both taken from the residual stream, so
before the final norm, on calibration sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from distill.data import collate

Example = tuple[list[int], list[bool]]


def _decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    layers = getattr(model.base_model, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no decoder layers at model.layers; cannot score blocks")
    return layers


@torch.no_grad()
def block_importance(
    model: PreTrainedModel, examples: list[Example], pad_id: int, batch_size: int = 8
) -> list[float]:
    """``BI_i`` of each decoder layer over the real (non-padding) tokens of ``examples``.

    Args:
        model: the teacher, in eval mode.
        examples: calibration sequences, ``(ids, answer mask)`` pairs as training uses them.
        pad_id: the padding id for batching.

    Returns:
        One float per layer in [0, 2]: 0 for a block whose output is parallel to its input.
    """
    layers = _decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    current_mask: list[torch.Tensor] = []

    def hook(i: int):
        def record(_module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]  # (B, T, H)
            y = output[0] if isinstance(output, tuple) else output  # (B, T, H)
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)  # (B, T)
            sums[i] += float((1 - cos)[current_mask[0]].sum())

        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for start in range(0, len(examples), batch_size):
            b = collate(examples[start : start + batch_size], pad_id).to(model.device)
            current_mask[:] = [b.attention_mask.bool()]
            model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
            count += int(b.attention_mask.sum())
    finally:
        for h in handles:
            h.remove()
    return (sums / max(count, 1)).tolist()


def most_important_layers(importance: list[float], keep: int) -> list[int]:
    """The indices of the ``keep`` most important layers, in model order (ties: the earlier layer)."""
    if not 1 <= keep <= len(importance):
        raise ValueError(f"cannot keep {keep} of {len(importance)} layers")
    ranked = sorted(range(len(importance)), key=lambda i: (-importance[i], i))
    return sorted(ranked[:keep])


@dataclass
class Candidate:
    """A way to build the student, and how far it is from the teacher before any training."""

    name: str
    layers: list[int]
    untrained_kl: float | None = None
    untrained_top1: float | None = None
