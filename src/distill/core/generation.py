"""Generating with a Hugging Face model: batched, left-padded, stopped at any of its EOS tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer


@dataclass
class Generation:
    """One generated answer: token ids (eos included when emitted) and why it ended."""

    token_ids: list[int]
    finish_reason: str  # "stop" (an end-of-sequence token) or "length" (max_new_tokens)


def eos_ids(model: PreTrainedModel | GenerationConfig, tok: Tokenizer) -> list[int]:
    """Every token id that ends an answer (a model's or a folder's generation config, and the tokenizer)."""
    gen = model if isinstance(model, GenerationConfig) else model.generation_config
    ids = gen.eos_token_id
    out = set([ids] if isinstance(ids, int) else (ids or []))
    if tok is not None and tok.eos_token_id is not None:
        out.add(tok.eos_token_id)
    return sorted(out)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T)`` input ids and attention mask, padded on the left for generation."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        attn[i, width - len(r) :] = 1
    return ids, attn


@torch.inference_mode()
def generate_batch(
    model: PreTrainedModel,
    tok: Tokenizer,
    prompts_ids: list[list[int]],
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    generation_temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    min_new_tokens: int = 0,
    pad_id: int | None = None,
) -> list[Generation]:
    """Generate for a batch of tokenised prompts; each answer is cut after its first eos.

    ``tok`` may be None when ``pad_id`` is given (the end-of-sequence ids then come from the
    model's generation config alone); ``top_k`` None keeps the generation config's default, 0
    samples from the whole distribution."""
    stop = eos_ids(model, tok)
    pad = pad_id if pad_id is not None else tok.pad_token_id if tok.pad_token_id is not None else stop[0]
    ids, attn = left_pad(prompts_ids, pad)
    kwargs = dict(do_sample=do_sample, temperature=generation_temperature, top_p=top_p)
    if top_k is not None:
        kwargs["top_k"] = top_k
    if not do_sample:
        kwargs = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    out = model.generate(
        input_ids=ids.to(model.device),
        attention_mask=attn.to(model.device),
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens or None,
        eos_token_id=stop,
        pad_token_id=pad,
        **kwargs,
    )
    gens = []
    for row in out[:, ids.shape[1] :].tolist():
        cut = next((i for i, t in enumerate(row) if t in stop), None)
        if cut is None:
            gens.append(Generation(row, "length"))
        else:
            gens.append(Generation(row[: cut + 1], "stop"))
    return gens
