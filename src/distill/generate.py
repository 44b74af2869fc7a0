"""Teacher answers for every prompt: batched, left-padded, resumable, append-only JSONL."""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from distill.config import GenerateConfig
from distill.data import Prompt, prompt_token_ids
from distill.progress import progress_bar


@dataclass
class Generation:
    """One generated answer: token ids (eos included when emitted) and why it ended."""

    token_ids: list[int]
    finish_reason: str  # "stop" (an end-of-sequence token) or "length" (max_new_tokens)


def eos_ids(model: PreTrainedModel, tok: Tokenizer) -> list[int]:
    """Every token id that ends an answer (generation config and tokenizer)."""
    ids = model.generation_config.eos_token_id
    out = set([ids] if isinstance(ids, int) else (ids or []))
    if tok.eos_token_id is not None:
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
    min_new_tokens: int = 0,
) -> list[Generation]:
    """Generate for a batch of tokenised prompts; each answer is cut after its first eos."""
    stop = eos_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stop[0]
    ids, attn = left_pad(prompts_ids, pad)
    kwargs = dict(do_sample=do_sample, temperature=generation_temperature, top_p=top_p)
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


def read_answers(path: Path) -> dict[str, dict]:
    """Finished answers by prompt id. A torn last line (a killed write) is cut off the file."""
    if not path.is_file():
        return {}
    raw = path.read_bytes()
    good_end = raw.rfind(b"\n") + 1
    if good_end < len(raw):
        with path.open("r+b") as f:
            f.truncate(good_end)
    answers = {}
    for i, line in enumerate(raw[:good_end].decode().splitlines(), 1):
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i}: corrupt answer record ({exc.msg})") from None
            answers[rec["id"]] = rec
    return answers


def _append(path: Path, records: list[dict]) -> None:
    with path.open("a") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def generate_answers(
    model: PreTrainedModel,
    tok: Tokenizer,
    prompts: list[Prompt],
    out_path: Path,
    cfg: GenerateConfig,
    *,
    system_prompt: str | None = None,
    max_prompt_tokens: int = 256,
) -> dict[str, dict]:
    """Answer every prompt not yet in ``out_path``; returns all answers by prompt id.

    Each batch is appended and fsynced as soon as it is done, so a killed run loses
    at most the batch in flight and a rerun asks only for what is missing. Sampling
    is seeded per batch from ``cfg.seed`` and the batch's first id, so a resumed
    run draws the same answers as an uninterrupted one with the same batching.
    """
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = read_answers(out_path)
    todo = [p for p in prompts if p.id not in done]
    encoded = {
        p.id: prompt_token_ids(tok, p, system_prompt=system_prompt, max_tokens=max_prompt_tokens)
        for p in todo
    }
    # Similar lengths in a batch waste less on padding; sorting keeps batching deterministic.
    todo.sort(key=lambda p: (len(encoded[p.id]), p.id))
    with progress_bar("prompt") as bar:
        task = bar.add_task("generate", total=len(prompts), completed=len(done), info="")
        ntok = 0
        for start in range(0, len(todo), cfg.batch_size):
            chunk = todo[start : start + cfg.batch_size]
            torch.manual_seed(cfg.seed * 1_000_003 + zlib.crc32(chunk[0].id.encode()))
            gens = generate_batch(
                model, tok, [encoded[p.id] for p in chunk],
                max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample,
                generation_temperature=cfg.generation_temperature, top_p=cfg.top_p,
            )  # fmt: skip
            records = [
                {
                    "id": p.id,
                    "text": tok.decode(g.token_ids, skip_special_tokens=True),
                    "token_ids": g.token_ids,
                    "finish_reason": g.finish_reason,
                    "prompt_tokens": len(encoded[p.id]),
                }
                for p, g in zip(chunk, gens, strict=True)
            ]
            _append(out_path, records)
            done.update({r["id"]: r for r in records})
            ntok += sum(len(g.token_ids) for g in gens)
            bar.update(task, advance=len(chunk), info=f"{ntok} answer tokens")
    return done
