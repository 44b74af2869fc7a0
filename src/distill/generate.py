"""Teacher answers for every prompt: batched, left-padded, resumable, append-only JSONL."""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from distill import interrupt
from distill.config import GenerateConfig
from distill.data import Prompt, prompt_token_ids
from distill.fsio import json_lines
from distill.progress import progress_bar


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


def read_log(path: Path) -> list[dict]:
    """Records of an append-only JSONL log; a torn last line (a killed write) is cut off the file."""
    if not path.is_file():
        return []
    raw = path.read_bytes()
    good_end = raw.rfind(b"\n") + 1
    if good_end < len(raw):
        with path.open("r+b") as f:
            f.truncate(good_end)
    out = []
    for i, line in enumerate(json_lines(raw[:good_end].decode()), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{path}:{i}: corrupt record ({exc.msg}); delete that line to go on"
                ) from None
    return out


def answer_key(prompt_id: str, sample: int = 0) -> str:
    """Key of one answer: the prompt id, with ``#j`` for sample j > 0. ``%`` and ``#`` inside the
    id are escaped (``%25``, ``%23``), so no two (id, sample) pairs share a key: id ``a#1`` sample 0
    is ``a%231``, id ``a`` sample 1 is ``a#1``."""
    escaped = prompt_id.replace("%", "%25").replace("#", "%23")
    return escaped if sample == 0 else f"{escaped}#{sample}"


def read_answers(path: Path) -> dict[str, dict]:
    """Finished answers by ``answer_key`` (of the prompt id and the sample, 0 for a local teacher).
    A torn last line (a killed write) is cut off the file."""
    return {answer_key(rec["id"], rec.get("sample", 0)): rec for rec in read_log(path)}


def write_records(f, records: list[dict]) -> None:
    """Append JSON lines to an open file and make them durable (flush + fsync) before returning."""
    try:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    except OSError as exc:  # name the file: a write error on an open file does not
        exc.filename = exc.filename or getattr(f, "name", None)
        raise


def _append(path: Path, records: list[dict]) -> None:
    with path.open("a") as f:
        write_records(f, records)


class LlamaCppEngine:
    """A GGUF teacher run by llama.cpp (``llama-cpp-python``): one stream, prompt by prompt.

    It takes the prompt token ids of our tokenizer (converted from the same GGUF, so the
    ids agree) and returns token ids, so its answers have the same form as transformers'.
    """

    def __init__(self, gguf: Path, stop_ids: list[int], *, n_ctx: int = 2048, threads: int | None = None):
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise ImportError(
                "teacher.engine=llama_cpp needs llama-cpp-python; `make install` builds it (README: "
                "'llama.cpp on this CPU' for the build flags)"
            ) from exc
        self.stop = set(stop_ids)
        self.llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads or torch.get_num_threads(),
                         verbose=False)  # fmt: skip

    def __call__(
        self, prompts_ids: list[list[int]], *, max_new_tokens: int, do_sample: bool = False,
        generation_temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
    ) -> list[Generation]:  # fmt: skip
        out = []
        for j, ids in enumerate(prompts_ids):
            self.llm.set_seed(seed + j)
            toks: list[int] = []
            finish = "length"
            sampler = (
                dict(temp=generation_temperature, top_p=top_p, top_k=0, min_p=0.0)
                if do_sample else dict(temp=0.0, top_k=1, top_p=1.0, min_p=0.0)
            )  # fmt: skip
            for t in self.llm.generate(ids, repeat_penalty=1.0, reset=True, **sampler):
                toks.append(int(t))
                if t in self.stop:
                    finish = "stop"
                    break
                if len(toks) >= max_new_tokens:
                    break
            out.append(Generation(toks, finish))
        return out


def generate_answers(
    model: PreTrainedModel | None,
    tok: Tokenizer,
    prompts: list[Prompt],
    out_path: Path,
    cfg: GenerateConfig,
    *,
    system_prompt: str | None = None,
    max_prompt_tokens: int = 256,
    engine: LlamaCppEngine | None = None,
) -> dict[str, dict]:
    """Answer every prompt not yet in ``out_path``; returns all answers by prompt id.

    ``engine``: llama.cpp instead of ``model`` (transformers), which may then be None.
    Each batch is appended and fsynced as soon as it is done, so a killed run loses
    at most the batch in flight and a rerun asks only for what is missing. Sampling
    is seeded per batch from ``cfg.seed`` and the batch's first id, so a resumed
    run draws the same answers as an uninterrupted one with the same batching.
    """
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = read_answers(out_path)
    todo = [p for p in prompts if answer_key(p.id) not in done]
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
            seed = cfg.seed * 1_000_003 + zlib.crc32(chunk[0].id.encode())
            torch.manual_seed(seed)
            kwargs = dict(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample,
                          generation_temperature=cfg.generation_temperature, top_p=cfg.top_p)  # fmt: skip
            rows = [encoded[p.id] for p in chunk]
            if engine is not None:
                gens = engine(rows, seed=seed % 2**31, **kwargs)
            else:  # top_k 0: the whole distribution, as llama.cpp samples, not the model's default cut
                gens = generate_batch(model, tok, rows, top_k=0, **kwargs)
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
            done.update({answer_key(r["id"]): r for r in records})
            if interrupt.requested() is not None and len(done) < len(prompts):
                interrupt.stop(f"stopped after {len(done)} of {len(prompts)} answers, all written to "
                               f"{out_path}; run the same command again to generate the rest")  # fmt: skip
            ntok += sum(len(g.token_ids) for g in gens)
            bar.update(task, advance=len(chunk), info=f"{ntok} answer tokens")
    return done
