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

from distill.core.data import collate

Example = tuple[list[int], list[bool]]


def _decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    layers = getattr(model.base_model, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no decoder layers at model.layers; cannot score blocks")
    return layers


def _calibration_pass(model, examples: list[Example], pad_id: int, batch_size: int,
                      current_mask: list[torch.Tensor], handles: list) -> int:  # fmt: skip
    """Run ``model`` over ``examples`` in padded batches, each batch's real-token mask put in
    ``current_mask`` for the hooks to read; the hooks are removed after. Returns the real tokens."""
    count = 0
    try:
        for start in range(0, len(examples), batch_size):
            b = collate(examples[start : start + batch_size], pad_id).to(model.device)
            current_mask[:] = [b.attention_mask.bool()]
            model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
            count += int(b.attention_mask.sum())
    finally:
        for h in handles:
            h.remove()
    return count


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
    current_mask: list[torch.Tensor] = []

    def hook(i: int):
        def record(_module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]  # (B, T, H)
            y = output[0] if isinstance(output, tuple) else output  # (B, T, H)
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)  # (B, T)
            sums[i] += float((1 - cos)[current_mask[0]].sum())

        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    count = _calibration_pass(model, examples, pad_id, batch_size, current_mask, handles)
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
    num_heads: int | None = None  # None: all
    intermediate_size: int | None = None
    hidden_size: int | None = None
    params: int | None = None
    untrained_kl: float | None = None
    untrained_top1: float | None = None
    speedup: float | None = None  # batch-1 generation tokens/s over the teacher's


@dataclass
class WidthImportance:
    """Minitron's activation importance of every attention head and MLP channel, per layer.

    ``heads[i]``: (num_heads,) mean over tokens of the L2 norm of head ``h``'s attention output
    (its slice of ``o_proj``'s input). ``channels[i]``: (intermediate_size,) mean over tokens of
    ``|act(gate(x)) * up(x)|``, the input of ``down_proj``. ``hidden``: Minitron's embedding-channel
    importance.
    """

    heads: list[torch.Tensor]
    channels: list[torch.Tensor]
    # (hidden_size,): mean over tokens of |x_c| at the output of every RMSNorm that reads the
    # residual stream (each layer's two and the final one), summed over those norms
    hidden: torch.Tensor | None = None


@torch.no_grad()
def width_importance(
    model: PreTrainedModel, examples: list[Example], pad_id: int, batch_size: int = 8
) -> WidthImportance:
    """Activation importance of each head and MLP channel over the real tokens of ``examples``."""
    layers = _decoder_layers(model)
    n_heads = model.config.num_attention_heads
    heads = [torch.zeros(n_heads, dtype=torch.float64) for _ in layers]
    channels = [torch.zeros(model.config.intermediate_size, dtype=torch.float64) for _ in layers]
    current_mask: list[torch.Tensor] = []

    def on_heads(i: int):
        def record(_module, args):
            x = args[0].float()[current_mask[0]]  # (N, heads * head_dim)
            heads[i] += x.view(x.shape[0], n_heads, -1).norm(dim=-1).sum(0).double()

        return record

    def on_channels(i: int):
        def record(_module, args):
            channels[i] += args[0].float()[current_mask[0]].abs().sum(0).double()  # (intermediate,)

        return record

    hidden = torch.zeros(model.config.hidden_size, dtype=torch.float64)

    def on_norm(_module, _args, out):
        hidden.add_(out.float()[current_mask[0]].abs().sum(0).double())

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(on_heads(i)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(on_channels(i)))
        for name in ("input_layernorm", "post_attention_layernorm"):
            if hasattr(layer, name):
                handles.append(getattr(layer, name).register_forward_hook(on_norm))
    final_norm = getattr(model.base_model, "norm", None)
    if final_norm is not None:
        handles.append(final_norm.register_forward_hook(on_norm))
    count = _calibration_pass(model, examples, pad_id, batch_size, current_mask, handles)
    n = max(count, 1)
    return WidthImportance([h / n for h in heads], [c / n for c in channels], hidden / n)


def top_heads(scores: torch.Tensor, num_kv_heads: int, keep: int) -> list[int]:
    """The ``keep`` most important query heads, as many from each key/value group (GQA: query head
    ``h`` reads group ``h // (num_heads / num_kv_heads)``, and a pruned model must keep that map)."""
    n = scores.numel()
    if keep % num_kv_heads or not num_kv_heads <= keep <= n:
        raise ValueError(f"cannot keep {keep} of {n} attention heads: it must be a multiple of the "
                         f"{num_kv_heads} key/value heads, at most {n}")  # fmt: skip
    per_group, size = keep // num_kv_heads, n // num_kv_heads
    kept = []
    for g in range(num_kv_heads):
        group = scores[g * size : (g + 1) * size]
        kept += [g * size + int(j) for j in torch.argsort(-group, stable=True)[:per_group]]
    return sorted(kept)


def top_channels(scores: torch.Tensor, keep: int) -> list[int]:
    """The ``keep`` most important MLP channels, in order."""
    if not 1 <= keep <= scores.numel():
        raise ValueError(f"cannot keep {keep} of {scores.numel()} MLP channels")
    return sorted(int(j) for j in torch.argsort(-scores, stable=True)[:keep])
