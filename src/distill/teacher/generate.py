"""Teacher answers for every prompt: batched, left-padded, resumable, append-only JSONL."""

from __future__ import annotations

import zlib
from itertools import groupby
from pathlib import Path

import torch
from transformers import PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from distill.core import interrupt
from distill.core.answers import answer_key, append_records, read_answers, up_to_sample
from distill.core.config import FilterConfig, GenerateConfig
from distill.core.data import Prompt, prompt_token_ids
from distill.core.generation import Generation, generate_batch
from distill.core.progress import console, progress_bar
from distill.teacher.filters import prompts_to_resample


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
    sampled: set[str] | None = None,
) -> dict[str, dict]:
    """Answer every prompt not yet in ``out_path``; returns all answers by ``answer_key``.

    ``engine``: llama.cpp instead of ``model`` (transformers), which may then be None.
    Answer 0 of each prompt follows ``cfg.do_sample``; the prompts whose ids are in ``sampled``
    (every prompt when None) also get ``cfg.extra_samples`` answers drawn at
    ``cfg.generation_temperature`` and ``cfg.top_p``, recorded with ``"sample": j`` (1, 2, ...).
    Each batch is appended and fsynced as soon as it is done, so a killed run loses
    at most the batch in flight and a rerun asks only for what is missing. Sampling
    is seeded per batch from ``cfg.seed``, the sample index and the batch's first id, so a resumed
    run draws the same answers as an uninterrupted one with the same batching.
    """
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = read_answers(out_path)
    extra = {p.id: cfg.extra_samples if sampled is None or p.id in sampled else 0 for p in prompts}
    wanted = [(p, j) for p in prompts for j in range(1 + extra[p.id])]
    todo = [(p, j) for p, j in wanted if answer_key(p.id, j) not in done]
    encoded = {  # once per prompt, however many of its answers are still to come
        p.id: prompt_token_ids(tok, p, system_prompt=system_prompt, max_tokens=max_prompt_tokens)
        for p in {p.id: p for p, _ in todo}.values()
    }
    # Similar lengths in a batch waste less on padding; sorting keeps batching deterministic. A
    # batch holds one sample index, so it is greedy or sampled throughout.
    todo.sort(key=lambda pj: (pj[1], len(encoded[pj[0].id]), pj[0].id))
    batches: list[list[tuple[Prompt, int]]] = []
    for _, same_j in groupby(todo, key=lambda pj: pj[1]):
        group = list(same_j)
        batches += [group[s : s + cfg.batch_size] for s in range(0, len(group), cfg.batch_size)]
    with progress_bar("answer") as bar:
        task = bar.add_task("teacher answers", total=len(wanted), completed=len(wanted) - len(todo), info="")
        ntok = 0
        for chunk in batches:
            j = chunk[0][1]
            seed = cfg.seed * 1_000_003 + zlib.crc32(chunk[0][0].id.encode()) + 7_919 * j
            torch.manual_seed(seed)
            kwargs = dict(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample or j > 0,
                          generation_temperature=cfg.generation_temperature, top_p=cfg.top_p)  # fmt: skip
            rows = [encoded[p.id] for p, _ in chunk]
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
                | ({"sample": j} if j else {})
                for (p, _), g in zip(chunk, gens, strict=True)
            ]
            append_records(out_path, records)
            done.update({answer_key(r["id"], j): r for r in records})
            stop = interrupt.requested() is not None  # counted only then: the count walks every answer
            left = sum(answer_key(p.id, i) not in done for p, i in wanted) if stop else 0
            if left:
                interrupt.stop(f"stopped after {len(wanted) - left} of {len(wanted)} answers, all written to "
                               f"{out_path}; run the same command again to generate the rest")  # fmt: skip
            ntok += sum(len(g.token_ids) for g in gens)
            bar.update(task, advance=len(chunk), info=f"{ntok} answer tokens")
    return done


def resample_answers(
    model: PreTrainedModel | None,
    tok: Tokenizer,
    prompts: list[Prompt],
    out_path: Path,
    cfg: GenerateConfig,
    keep: FilterConfig,
    **kwargs,
) -> dict[str, dict]:
    """Rejection sampling: ``cfg.resample`` rounds, each drawing one more sampled answer for every
    prompt of ``prompts`` none of whose answers so far passes ``keep`` (the run's filter); a prompt
    stops at its first answer that passes. The answers are numbered on from ``cfg.extra_samples``, so
    a rerun finds them and draws only what is missing. ``kwargs`` as for ``generate_answers``."""
    first = 1 + cfg.extra_samples
    done = read_answers(out_path)
    for r in range(cfg.resample):
        todo = prompts_to_resample(prompts, up_to_sample(done, first - 1 + r), keep, first)
        if not todo:
            break
        console.print(f"resampling, round {r + 1} of {cfg.resample}: {len(todo)} training prompts have no "
                      "answer the filter keeps")  # fmt: skip
        round_cfg = cfg.model_copy(update={"extra_samples": first + r})
        done = generate_answers(model, tok, todo, out_path, round_cfg, sampled={p.id for p in todo}, **kwargs)
    return done
