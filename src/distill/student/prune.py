"""Cutting a teacher down to a student: layers kept, attention heads and MLP channels pruned, and the
teacher layer each student layer is aligned with."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from distill.core.errors import StageError


def evenly_spaced_layers(num_total: int, num_keep: int) -> list[int]:
    """Indices of ``num_keep`` of ``num_total`` layers, first and last always included."""
    if not 1 <= num_keep <= num_total:
        raise ValueError(f"cannot keep {num_keep} of {num_total} layers")
    if num_keep == 1:
        return [num_total - 1]
    step = (num_total - 1) / (num_keep - 1)
    return [round(i * step) for i in range(num_keep)]


def shrink_layers(teacher: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """A student that keeps ``layers`` of the teacher's decoder stack.

    Embeddings, final norm and LM head are copied; decoder layer ``layers[j]``
    becomes layer ``j`` (DistilBERT / Minitron style initialisation). Works for
    any decoder whose layers live at ``model.layers.<i>`` in the state dict.
    """
    n_total = teacher.config.num_hidden_layers
    if sorted(set(layers)) != list(layers) or not layers or layers[-1] >= n_total or layers[0] < 0:
        raise ValueError(f"layers must be increasing indices in [0, {n_total}), got {layers}")
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [teacher.config.layer_types[i] for i in layers]
    student = AutoModelForCausalLM.from_config(config, dtype=teacher.dtype)
    remap = {src: dst for dst, src in enumerate(layers)}
    state = {}
    for key, value in teacher.state_dict().items():
        parts = key.split(".")
        if "layers" in parts:
            i = parts.index("layers")
            src = int(parts[i + 1])
            if src not in remap:
                continue
            parts[i + 1] = str(remap[src])
        state[".".join(parts)] = value.clone()
    student.load_state_dict(state, strict=True)
    student.generation_config = teacher.generation_config
    return student.eval()


HIDDEN_PRUNABLE = ("llama", "qwen2", "mistral")  # plain pre-norm decoders, no width-dependent scale


def prune_width(
    model: PreTrainedModel,
    heads: list[list[int]] | None = None,
    channels: list[list[int]] | None = None,
    hidden: list[int] | None = None,
) -> PreTrainedModel:
    """A copy of ``model`` that keeps, in decoder layer ``i``, the query heads ``heads[i]`` and the
    MLP channels ``channels[i]`` (None: all of them). Minitron-style width pruning.

    Every layer keeps as many heads and channels as the others, so the result has a standard
    config (``num_attention_heads``, ``intermediate_size``; ``head_dim`` written out) that stock
    transformers loads. Key/value heads all stay; the kept query heads must be as many from each
    key/value group. Its output equals ``model``'s with the dropped heads' attention outputs and the
    dropped channels' activations set to zero.

    ``hidden``: the residual-stream (embedding) channels kept, in every tensor that reads or writes
    the stream (Llama-type models). RMSNorm then averages over the kept channels only, so the
    output equals the original's with the dropped channels zero everywhere and every norm weight
    scaled by sqrt(kept / hidden_size).
    """
    cfg = model.config
    n_layers, n_heads, n_kv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    for name, keep, n_total in (("heads", heads, n_heads), ("channels", channels, cfg.intermediate_size)):
        if keep is None:
            continue
        if len(keep) != n_layers or len({len(k) for k in keep}) != 1:
            raise ValueError(f"{name}: one list per layer ({n_layers}), all of one length")
        for k in keep:
            if sorted(set(k)) != list(k) or not k or k[0] < 0 or k[-1] >= n_total:
                raise ValueError(f"{name} must be increasing indices in [0, {n_total}), got {k}")
    if heads is not None:
        new_heads = len(heads[0])
        if new_heads % n_kv:
            raise ValueError(f"{new_heads} heads cannot share {n_kv} key/value heads evenly")
        for k in heads:  # kept head j reads group j // (new_heads / n_kv): it must be its old group
            old = [h // (n_heads // n_kv) for h in k]
            if old != [j // (new_heads // n_kv) for j in range(new_heads)]:
                raise ValueError(
                    f"heads {k}: keep as many query heads from each of the {n_kv} key/value groups"
                )
    if hidden is not None:
        if cfg.model_type not in HIDDEN_PRUNABLE:
            raise ValueError(
                f"hidden-size pruning is written for {', '.join(HIDDEN_PRUNABLE)}, not {cfg.model_type}"
            )
        if (
            sorted(set(hidden)) != list(hidden)
            or not hidden
            or hidden[0] < 0
            or hidden[-1] >= cfg.hidden_size
        ):
            raise ValueError(f"hidden must be increasing indices in [0, {cfg.hidden_size}), got {hidden}")
        n_q = len(heads[0]) if heads is not None else n_heads
        if len(hidden) % n_q:
            raise ValueError(
                f"{len(hidden)} residual channels: transformers wants a multiple of the {n_q} heads"
            )
    config = cfg.__class__.from_dict(cfg.to_dict())
    config.head_dim = head_dim
    if hidden is not None:
        config.hidden_size = len(hidden)
    if heads is not None:
        config.num_attention_heads = len(heads[0])
    if channels is not None:
        config.intermediate_size = len(channels[0])
    pruned = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    state = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if "layers" in parts and parts[-1] in ("weight", "bias"):
            i = int(parts[parts.index("layers") + 1])
            proj = parts[-2]
            if parts[-1] == "bias" and proj in ("o_proj", "down_proj"):
                pass  # (hidden,): the output side keeps its size
            elif heads is not None and proj in ("q_proj", "o_proj"):
                rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads[i]])
                value = value[rows] if proj == "q_proj" else value[:, rows]  # o_proj: (hidden, heads * d)
            elif channels is not None and proj in ("gate_proj", "up_proj", "down_proj"):
                rows = torch.tensor(channels[i])
                value = value[rows] if proj != "down_proj" else value[:, rows]  # down_proj: (hidden, inter)
        if hidden is not None:
            value = _keep_hidden(key, value, torch.tensor(hidden))
        state[key] = value.clone()
    pruned.load_state_dict(state, strict=True)
    pruned.generation_config = model.generation_config
    return pruned.eval()


def _keep_hidden(key: str, value: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``value`` with only the ``keep`` residual channels, along the side that touches the stream."""
    parts = key.split(".")
    module, kind = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", parts[-1])
    if module in ("embed_tokens", "lm_head"):  # (vocab, hidden)
        return value[:, keep]
    if module in ("input_layernorm", "post_attention_layernorm", "norm"):  # (hidden,)
        return value[keep]
    if module in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):  # read the stream
        return value[:, keep] if kind == "weight" else value
    if module in ("o_proj", "down_proj"):  # write to it
        return value[keep]
    raise ValueError(f"hidden-size pruning: no rule for {key}")


def layer_map(init: Path, student, teacher_layers: int) -> list[int]:
    """The teacher layer each student layer is aligned with: the layers a shrunk student kept
    (``student_init/layer_map.json``), or for a given student model, spread evenly as in TinyBERT
    (student layer j of S with teacher layer (j + 1) * T / S - 1 of T: the last with the last)."""
    path = init / "layer_map.json"
    n = student.config.num_hidden_layers
    if not path.is_file():
        if n > teacher_layers:
            raise StageError(f"train.hidden_weight: the student has {n} layers, the teacher "
                             f"{teacher_layers}: a deeper student has no layer map")  # fmt: skip
        return [round((j + 1) * teacher_layers / n) - 1 for j in range(n)]
    layers = json.loads(path.read_text())["teacher_layers"]
    if len(layers) != n:
        raise StageError(f"{path}: {len(layers)} layers for a student of {n}")
    return layers
