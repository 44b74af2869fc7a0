"""Black-box teacher: answers, and top log-probs where the server gives them, from any
OpenAI-compatible endpoint (OpenAI, vLLM's and llama.cpp's servers, Ollama).

Requests run concurrently under a bound, a client-side rate limit (requests and tokens
per minute), and retries with exponential backoff and jitter on 429 / 5xx / timeouts /
connection resets / malformed bodies, honouring ``Retry-After``. A client error that
cannot succeed (400, 401, 404, ...) is not retried. Every outcome is appended to a log
(one JSON line, flushed and fsynced) the moment it arrives, so a killed run loses only
the requests in flight and a rerun asks only for the (prompt, sample) pairs that have
no answer yet. The API key is read from the environment variable the config names and
is never written anywhere.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import openai
import torch

from distill.core.answers import answer_key, read_log, write_records
from distill.core.config import ApiConfig, RunConfig
from distill.core.data import (
    Prompt,
)
from distill.core.progress import progress_bar
from distill.teacher.api_client import (
    ApiError,
    ApiTeacher,
    RateLimiter,
    api_key,
    backoff_s,
    classify,
    parse_response,
    scrub,
)


def successes(log: list[dict]) -> dict[str, dict]:
    """The first successful record of every (prompt, sample) in a log, by answer key."""
    out: dict[str, dict] = {}
    for rec in log:
        if "error" not in rec:
            out.setdefault(answer_key(rec["id"], rec.get("sample", 0)), rec)
    return out


def estimate_tokens(prompt: Prompt) -> int:
    """Rough prompt size before the server counts it: ~4 characters a token, plus framing."""
    return sum(len(m["content"]) for m in prompt.messages) // 4 + 8 * len(prompt.messages)


@dataclass
class RunStats:
    """What one generation run did; ``as_dict`` is stored as generate_summary.json."""

    requested: int = 0
    done: int = 0
    failed: Counter = field(default_factory=Counter)
    retried: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "requested": self.requested,
            "done": self.done,
            "failed": sum(self.failed.values()),
            "failed_by_cause": dict(self.failed),
            "retries": sum(self.retried.values()),
            "retried_by_cause": dict(self.retried),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": self.cost_usd,
            "seconds": self.seconds,
            "answers_per_s": self.done / self.seconds if self.seconds else 0.0,
            "completion_tokens_per_s": self.completion_tokens / self.seconds if self.seconds else 0.0,
        }


def price_of(cfg: ApiConfig, prompt_tokens: int, completion_tokens: int) -> float:
    p = cfg.prices.get(cfg.model)
    if p is None:
        return 0.0
    return (prompt_tokens * p.prompt + completion_tokens * p.completion) / 1e6


def log_totals(log: list[dict], prompts: list[Prompt], cfg: ApiConfig) -> dict:
    """What the whole log holds for ``prompts``: answers, what is still missing, the causes of the
    missing ones' last failures, tokens used and their cost."""
    done = successes(log)
    expected = {answer_key(p.id, j) for p in prompts for j in range(cfg.n)}
    last_failure = {}
    for rec in log:
        key = answer_key(rec["id"], rec.get("sample", 0))
        if "error" in rec and key not in done and key in expected:
            last_failure[key] = rec["error"]["cause"]
    prompt_tokens = sum(r["usage"]["prompt_tokens"] or 0 for r in done.values())
    completion_tokens = sum(r["usage"]["completion_tokens"] or 0 for r in done.values())
    return {
        "answers": len(done),
        "missing": len(expected - done.keys()),
        "failed_by_cause": dict(sorted(Counter(last_failure.values()).items())),
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "cost_usd": price_of(cfg, prompt_tokens, completion_tokens),
    }


async def _answer_one(
    teacher: ApiTeacher,
    limiter: RateLimiter,
    prompt: Prompt,
    sample: int,
    stats: RunStats,
    rng: random.Random,
) -> dict:
    cfg = teacher.cfg
    base = {"id": prompt.id, "sample": sample}
    for attempt in range(cfg.max_retries + 1):
        estimate = estimate_tokens(prompt) + cfg.max_tokens
        await limiter.acquire(estimate)
        t0 = time.perf_counter()
        try:
            out = await teacher.request(prompt, sample)
        except Exception as exc:  # noqa: BLE001 - classify re-raises what is not an API failure
            cause, retryable, after = classify(exc)
            limiter.settle(estimate, 0)
            message = teacher.scrub(f"{type(exc).__name__}: {exc}")[:500]
            if not retryable or attempt == cfg.max_retries:
                return {**base, "error": {"cause": cause, "message": message}, "attempts": attempt + 1}
            stats.retried[cause] += 1
            await asyncio.sleep(backoff_s(attempt, cfg, after, rng))
            continue
        used = (out["usage"]["prompt_tokens"] or 0) + (out["usage"]["completion_tokens"] or 0)
        limiter.settle(estimate, used or estimate)
        return {**base, **out, "attempts": attempt + 1, "seconds": time.perf_counter() - t0}
    raise AssertionError("unreachable")


async def generate_api_answers_async(
    teacher: ApiTeacher,
    prompts: list[Prompt],
    log_path: Path,
    *,
    limiter: RateLimiter | None = None,
    show_progress: bool = True,
    seed: int = 0,
) -> RunStats:
    """Ask for every (prompt, sample) not yet answered in ``log_path``; append each outcome there."""
    cfg = teacher.cfg
    log_path.parent.mkdir(parents=True, exist_ok=True)
    done = successes(read_log(log_path))
    todo = [(p, j) for p in prompts for j in range(cfg.n) if answer_key(p.id, j) not in done]
    stats = RunStats(requested=len(todo))
    limiter = limiter or RateLimiter(cfg.requests_per_min, cfg.tokens_per_min)
    queue: asyncio.Queue = asyncio.Queue()
    for item in todo:
        queue.put_nowait(item)
    rng = random.Random(seed)
    t0 = time.perf_counter()
    total = len(prompts) * cfg.n
    with progress_bar("answer", disable=not show_progress) as bar, log_path.open("a") as log:
        task = bar.add_task("teacher answers (api)", total=total, completed=total - len(todo), info="")

        async def worker() -> None:
            while True:
                try:
                    prompt, sample = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                rec = await _answer_one(teacher, limiter, prompt, sample, stats, rng)
                write_records(log, [rec])  # on disk before anything else happens
                if "error" in rec:
                    stats.failed[rec["error"]["cause"]] += 1
                else:
                    stats.done += 1
                    u = rec["usage"]
                    stats.prompt_tokens += u["prompt_tokens"] or 0
                    stats.completion_tokens += u["completion_tokens"] or 0
                    stats.cost_usd += price_of(cfg, u["prompt_tokens"] or 0, u["completion_tokens"] or 0)
                bar.update(
                    task,
                    advance=1,
                    info=f"{sum(stats.failed.values())} failed · {sum(stats.retried.values())} retries · "
                    f"{stats.completion_tokens:,} tok · ${stats.cost_usd:.4f}",
                )

        try:
            await asyncio.gather(*(worker() for _ in range(min(cfg.concurrency, max(len(todo), 1)))))
        finally:
            stats.seconds = time.perf_counter() - t0
    return stats


def generate_api_answers(
    cfg: ApiConfig,
    prompts: list[Prompt],
    log_path: Path,
    *,
    render: Callable[[Prompt], str] | None = None,
    show_progress: bool = True,
) -> RunStats:
    """Blocking wrapper: run the API teacher over ``prompts`` and close the client."""

    async def main() -> RunStats:
        teacher = ApiTeacher(cfg, render)
        try:
            return await generate_api_answers_async(teacher, prompts, log_path, show_progress=show_progress)
        finally:
            await teacher.close()

    return asyncio.run(main())


class TokenMap:
    """Token strings (or bytes) as servers return them, back to this tokenizer's ids.

    Built from each id's decoded text; a text that several ids decode to (e.g. partial
    UTF-8 bytes) is ambiguous and maps only through the ``bytes`` a server may send.
    """

    def __init__(self, tok) -> None:
        by_text: dict[str, int] = {}
        ambiguous: set[str] = set()
        for i in range(len(tok)):
            text = tok.decode([i])
            if text in by_text:
                ambiguous.add(text)
            else:
                by_text[text] = i
        for text in ambiguous:
            del by_text[text]
        self.by_text = by_text
        self.tok = tok

    def id_of(self, token: str | None, raw: list[int] | None = None) -> int | None:
        if token is not None and token.startswith("token_id:") and token[9:].isdigit():
            i = int(token[9:])  # vLLM's return_tokens_as_token_ids: the id itself, never ambiguous
            return i if i < len(self.tok) else None
        if raw is not None:
            try:
                text = bytes(raw).decode("utf-8")
            except UnicodeDecodeError:
                return None
            return self.by_text.get(text)
        return None if token is None else self.by_text.get(token)


class ApiGrader:
    """The API teacher's judgement of given tokens: on-policy rows, whose answers the student wrote.

    Each sample's token ids go to a completions endpoint as the prompt, with ``echo`` and
    ``logprobs=k``: the server returns, for every given token, the teacher's top-k log-probs at that
    position (vLLM's OpenAI server and OpenAI's legacy completions do; chat endpoints cannot). The
    server must tokenise as the student does; a token that comes back different is refused.
    """

    def __init__(self, cfg: ApiConfig, tok, client=None) -> None:
        if cfg.endpoint != "completions" or not cfg.top_logprobs:
            raise ApiError("grading given tokens needs teacher.api.endpoint=completions and top_logprobs > 0")
        self.cfg, self.tmap = cfg, TokenMap(tok)
        self._key = api_key(cfg)
        self.client = client or openai.OpenAI(
            base_url=cfg.base_url, api_key=self._key, max_retries=cfg.max_retries, timeout=cfg.timeout_s
        )
        self.requests = 0

    def score(self, ids: list[int]) -> tuple[list[list[int]], list[list[float]]]:
        """For each position t in 1..n-1: the teacher's top-k ids and log-probs for the token at t
        given ``ids[:t]``, the given token's own log-prob added when it is outside the top-k."""
        try:
            kw = {"echo": True, "max_tokens": 1, "logprobs": self.cfg.top_logprobs, "temperature": 0.0,
                  # vLLM names tokens by id then ("token_id:N"): pieces that decode alike stay apart
                  "extra_body": {"return_tokens_as_token_ids": True}}  # fmt: skip
            resp = self.client.completions.create(model=self.cfg.model, prompt=ids, **kw)
        except openai.OpenAIError as exc:
            raise ApiError(
                f"{self.cfg.base_url}: grading the student's tokens failed: {scrub(str(exc), self._key)}"
            ) from None
        self.requests += 1
        lps = parse_response(resp, "completions")["logprobs"]
        if lps is None or len(lps) < len(ids):
            raise ApiError(f"{self.cfg.base_url} does not echo the log-probs of given tokens (completions "
                           "with echo and logprobs, as vLLM serves); on-policy rows need them")  # fmt: skip
        top_ids, top_lps = [], []
        for t in range(1, len(ids)):
            pos = lps[t]
            if self.tmap.id_of(pos["token"], pos["bytes"]) != ids[t]:
                raise ApiError(
                    f"{self.cfg.base_url} split the given tokens differently (position {t}: "
                    f"{pos['token']!r}); the teacher must share the student's tokenizer"
                )
            row_ids, row_lps = [], []
            for token, raw, lp in pos["top"][: self.cfg.top_logprobs]:
                j = self.tmap.id_of(token, raw)
                if j is not None and j not in row_ids:  # an unmappable alternative is left out
                    row_ids.append(j)
                    row_lps.append(lp)
            if ids[t] not in row_ids and pos["logprob"] is not None:
                row_ids.append(ids[t])
                row_lps.append(pos["logprob"])
            top_ids.append(row_ids)
            top_lps.append(row_lps)
        return top_ids, top_lps

    def signal(self, batch, *, lazy: bool = False):
        """A top-k teacher ``(B, T-1, k + 1)`` for the batch's shifted positions (bucket tail)."""

        from distill.losses.divergences import TopKTeacher

        b, t = batch.input_ids.shape
        k = self.cfg.top_logprobs + 1
        ids = torch.zeros((b, t - 1, k), dtype=torch.long)
        lps = torch.full((b, t - 1, k), float("-inf"))
        for row, start, n in batch.samples():
            top_ids, top_lps = self.score(batch.input_ids[row, start : start + n].tolist())
            for j, (r_ids, r_lps) in enumerate(zip(top_ids, top_lps, strict=True)):
                ids[row, start + j, : len(r_ids)] = torch.tensor(r_ids)
                lps[row, start + j, : len(r_lps)] = torch.tensor(r_lps)
        dev = batch.input_ids.device
        return TopKTeacher(ids.to(dev), lps.to(dev), "bucket")


def map_logprobs(
    rec: dict, tmap: TokenMap, k: int
) -> tuple[list[int], list[list[int]], list[list[float]]] | None:
    """The answer's token ids and its top-k ids / log-probs in this tokenizer, or None when
    some token has no unique id or the ids do not decode back to the answer text."""
    lps = rec.get("logprobs")
    if not lps:
        return None
    ids, top_ids, top_lps = [], [], []
    for pos in lps:
        i = tmap.id_of(pos["token"], pos["bytes"])
        if i is None:
            return None
        row_ids, row_lps = [], []
        for token, raw, lp in pos["top"][:k]:
            j = tmap.id_of(token, raw)
            if j is None:
                return None
            if j not in row_ids:
                row_ids.append(j)
                row_lps.append(lp)
        ids.append(i)
        top_ids.append(row_ids)
        top_lps.append(row_lps)
    if tmap.tok.decode(ids) != rec["text"]:
        return None
    return ids, top_ids, top_lps


def training_answers(log: list[dict], tok, eos_id: int, top_k: int = 0) -> tuple[list[dict], dict]:
    """Answer records in the pipeline's format (token ids in ``tok``), from an API log.

    The answer ends with ``eos_id`` when the server stopped it (``finish_reason`` stop).
    With ``top_k``, each answer's top log-probs are mapped to ``tok``'s ids where every
    token maps and decodes back to the text; that answer then carries ``top_ids`` /
    ``top_logprobs`` (the eos row, which servers do not return, is the observed token
    with probability 1). Returns the records and a report of how many mapped.
    """
    tmap = TokenMap(tok) if top_k else None
    out, mapped, unmapped = [], 0, 0
    for key, rec in successes(log).items():
        ans = {
            "id": rec["id"],
            "sample": rec.get("sample", 0),
            "key": key,
            "text": rec["text"],
            "finish_reason": rec["finish_reason"],
        }
        stop = rec["finish_reason"] == "stop"
        got = map_logprobs(rec, tmap, top_k) if tmap is not None else None
        if got is not None:
            ids, top_ids, top_lps = got
            ans["token_ids"] = ids + ([eos_id] if stop else [])
            ans["top_ids"] = top_ids + ([[eos_id]] if stop else [])
            ans["top_logprobs"] = top_lps + ([[0.0]] if stop else [])
            mapped += 1
        else:
            unmapped += tmap is not None
            ans["token_ids"] = tok(rec["text"], add_special_tokens=False)["input_ids"] + (
                [eos_id] if stop else []
            )
        out.append(ans)
    report = {"answers": len(out), "logprobs_mapped": mapped, "logprobs_unmapped": unmapped}
    return out, report


def api_signal(cfg: RunConfig, mapping: dict) -> str:
    """Which signal an API teacher gives training, in words (also written to the run's logs)."""
    if cfg.teacher.api.top_logprobs == 0:
        return "text only (sequence-level KD: cross-entropy on the teacher's answers)"
    if mapping["logprobs_mapped"] == 0:
        return (
            "text only (sequence-level KD): the server's tokens do not map to this tokenizer "
            f"({mapping['logprobs_unmapped']} answers tried)"
        )
    return (
        f"sparse top-{cfg.teacher.api.top_logprobs} log-probs for {mapping['logprobs_mapped']} answers "
        f"(tokens mapped to ids and checked), text for {mapping['logprobs_unmapped']}"
    )


def api_cache_rows(example, rec: dict, k: int, eos_id: int):
    """Cache rows of one API answer: its mapped top-k (padded with -inf), or, for an answer
    whose tokens did not map, the observed tokens as hard labels (the KD term is then CE)."""
    import numpy as np

    n = sum(example[1])
    ids = np.zeros((n, k), dtype=np.int64)
    lps = np.full((n, k), -np.inf, dtype=np.float32)
    answer = example[0][len(example[0]) - n :]
    top_ids, top_lps = rec.get("top_ids"), rec.get("top_logprobs")
    for r in range(n):
        if top_ids is not None:
            row_ids, row_lps = top_ids[r][:k], top_lps[r][:k]
        else:
            row_ids, row_lps = [answer[r]], [0.0]
        ids[r, : len(row_ids)] = row_ids
        lps[r, : len(row_lps)] = row_lps
    mass = np.exp(lps).sum(-1)
    tail = np.log(np.clip(1.0 - mass, 1e-30, None))
    return ids, lps, tail
