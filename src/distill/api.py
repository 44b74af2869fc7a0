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
import email.utils
import os
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import openai

from distill.config import ApiConfig
from distill.data import Prompt
from distill.generate import answer_key, read_log, write_records
from distill.progress import progress_bar


class ApiError(RuntimeError):
    """The API teacher cannot start (no key in the environment, ...)."""


class MalformedResponse(ValueError):
    """A 200 answer whose body is not a completion."""


def api_key(cfg: ApiConfig) -> str:
    """The key from the environment variable ``cfg.api_key_env`` names ("none" for keyless servers)."""
    if cfg.api_key_env is None:
        return "none"  # the client wants a string; keyless servers ignore it
    key = os.environ.get(cfg.api_key_env, "")
    if not key:
        raise ApiError(
            f"teacher.api.api_key_env is {cfg.api_key_env!r}, but that environment variable is not set; "
            f"export {cfg.api_key_env}=<your key> (or set teacher.api.api_key_env=null for a server "
            "without keys)"
        )
    return key


def scrub(text: str, secret: str | None) -> str:
    """``text`` with any occurrence of the secret replaced (error messages can echo a key)."""
    if secret and secret != "none" and len(secret) >= 4:
        text = text.replace(secret, "***")
    return text


# ---------------------------------------------------------------------------------------------
# rate limit


class RateLimiter:
    """Token buckets for requests per minute and tokens per minute.

    Each bucket holds about one second of its rate, so bursts stay small. A request
    reserves its estimated tokens before it is sent and ``settle`` corrects the bucket
    with the tokens the server reports; levels may go negative, which makes later
    requests wait, so the average rate holds even when estimates are short.
    ``clock`` and ``sleep`` are injectable for tests.
    """

    def __init__(
        self,
        requests_per_min: float | None,
        tokens_per_min: float | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.clock, self.sleep = clock, sleep
        now = clock()
        # name -> [rate per second, capacity, level, last refill time]
        self.buckets: dict[str, list[float]] = {}
        for name, per_min in (("requests", requests_per_min), ("tokens", tokens_per_min)):
            if per_min:
                rate = per_min / 60.0
                cap = max(1.0, rate)
                self.buckets[name] = [rate, cap, cap, now]

    def _refill(self) -> None:
        now = self.clock()
        for b in self.buckets.values():
            b[2] = min(b[1], b[2] + (now - b[3]) * b[0])
            b[3] = now

    def try_reserve(self, tokens: float) -> float:
        """Reserve one request of ``tokens``; returns 0 when reserved, else seconds to wait."""
        self._refill()
        cost = {"requests": 1.0, "tokens": float(tokens)}
        wait = 0.0
        for name, (rate, cap, level, _) in self.buckets.items():
            need = min(cost[name], cap)  # a request bigger than the bucket goes when it is full
            if level < need:
                wait = max(wait, (need - level) / rate)
        if wait > 0:
            return wait
        for name, b in self.buckets.items():
            b[2] -= cost[name]
        return 0.0

    async def acquire(self, tokens: float) -> None:
        while (wait := self.try_reserve(tokens)) > 0:
            await self.sleep(wait)

    def settle(self, estimated: float, actual: float) -> None:
        """Charge (or refund) the difference between the tokens reserved and those used."""
        if "tokens" in self.buckets:
            self.buckets["tokens"][2] -= actual - estimated


# ---------------------------------------------------------------------------------------------
# errors and backoff


def retry_after_s(headers) -> float | None:
    """Seconds the server asks us to wait: ``retry-after-ms``, or ``Retry-After`` (seconds or date)."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def classify(exc: BaseException) -> tuple[str, bool, float | None]:
    """``(cause, retryable, retry_after_s)`` of a failed request; re-raises what is not an API failure."""
    if isinstance(exc, openai.APITimeoutError):
        return "timeout", True, None
    if isinstance(exc, openai.APIConnectionError):
        return "connection", True, None
    if isinstance(exc, openai.APIStatusError):
        code = exc.status_code
        retryable = code in (408, 409, 429) or code >= 500
        return f"http_{code}", retryable, retry_after_s(exc.response.headers) if retryable else None
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout", True, None
    if isinstance(exc, (MalformedResponse, openai.APIResponseValidationError, ValueError)):
        return "malformed", True, None
    raise exc


def backoff_s(attempt: int, cfg: ApiConfig, retry_after: float | None, rng: random.Random) -> float:
    """Delay before retry ``attempt`` (0-based): the server's Retry-After when it sent one,
    plus up to a quarter of it and up to a second, else ``backoff_s * 2**attempt`` capped at
    ``max_backoff_s``, scaled by a jitter in [0.5, 1)."""
    if retry_after is not None:
        # Never sooner than asked, but spread out: workers told the same Retry-After must not all
        # come back in the same instant and be throttled together again.
        return min(retry_after, 600.0) * (1 + rng.random() / 4) + rng.random() * min(1.0, cfg.backoff_s)
    return min(cfg.max_backoff_s, cfg.backoff_s * 2**attempt) * (0.5 + rng.random() / 2)


# ---------------------------------------------------------------------------------------------
# one request


def _get(obj, name, default=None):
    return obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)


def _parse_logprobs(lp, endpoint: str) -> list[dict] | None:
    """Per generated token: ``{"token", "bytes", "logprob", "top": [[token, bytes, logprob], ...]}``."""
    if lp is None:
        return None
    if endpoint == "chat":
        content = _get(lp, "content")
        if content is None:
            return None
        return [
            {
                "token": _get(t, "token"),
                "bytes": _get(t, "bytes"),
                "logprob": float(_get(t, "logprob")),
                "top": [
                    [_get(a, "token"), _get(a, "bytes"), float(_get(a, "logprob"))]
                    for a in (_get(t, "top_logprobs") or [])
                ],
            }
            for t in content
        ]
    tokens, lps, tops = _get(lp, "tokens"), _get(lp, "token_logprobs"), _get(lp, "top_logprobs")
    if tokens is None or lps is None:
        return None
    tops = tops or [None] * len(tokens)
    return [
        {
            "token": t,
            "bytes": None,
            "logprob": float(v) if v is not None else None,
            "top": [[a, None, float(b)] for a, b in (top or {}).items()],
        }
        for t, v, top in zip(tokens, lps, tops, strict=True)
    ]


def parse_response(resp, endpoint: str) -> dict:
    """The fields of an answer record from a chat or completions response (raises MalformedResponse)."""
    if hasattr(resp, "model_dump"):
        resp = resp.model_dump()
    if not isinstance(resp, dict):
        raise MalformedResponse(f"expected a JSON object, got {type(resp).__name__}")
    choices = resp.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise MalformedResponse("response has no choices")
    ch = choices[0]
    if endpoint == "chat":
        msg = ch.get("message")
        text = msg.get("content") if isinstance(msg, dict) else None
    else:
        text = ch.get("text")
    if not isinstance(text, str):
        raise MalformedResponse("response choice has no text")
    try:
        logprobs = _parse_logprobs(ch.get("logprobs"), endpoint)
    except (TypeError, ValueError, AttributeError) as exc:
        raise MalformedResponse(f"unreadable logprobs: {exc}") from None
    usage = resp.get("usage") or {}
    return {
        "text": text,
        "finish_reason": ch.get("finish_reason") or "unknown",
        "usage": {
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
        },
        "model": resp.get("model"),
        "logprobs": logprobs,
    }


class ApiTeacher:
    """Sends one prompt (one sample) to the endpoint and returns the parsed answer fields.

    ``render`` turns a prompt into the text sent to a completions endpoint (our chat
    template); chat endpoints get the messages and apply the server's template.
    """

    def __init__(self, cfg: ApiConfig, render: Callable[[Prompt], str] | None = None, client=None) -> None:
        self.cfg = cfg
        self.render = render
        self._key = api_key(cfg)
        self.client = client or openai.AsyncOpenAI(
            base_url=cfg.base_url, api_key=self._key, max_retries=0, timeout=cfg.timeout_s
        )
        if cfg.endpoint == "completions" and render is None:
            raise ApiError("the completions endpoint needs a prompt renderer (a tokenizer's chat template)")

    def scrub(self, text: str) -> str:
        return scrub(text, self._key)

    def request_kwargs(self, prompt: Prompt, sample: int) -> dict:
        c = self.cfg
        kw: dict = {"model": c.model, "temperature": c.temperature, "max_tokens": c.max_tokens}
        if c.stop:
            kw["stop"] = c.stop
        if c.seed is not None:
            kw["seed"] = c.seed + sample
        if c.endpoint == "chat":
            kw["messages"] = prompt.messages
            if c.top_logprobs:
                kw.update(logprobs=True, top_logprobs=c.top_logprobs)
        else:
            kw["prompt"] = self.render(prompt)
            if c.top_logprobs:
                kw["logprobs"] = c.top_logprobs
        return kw

    async def request(self, prompt: Prompt, sample: int) -> dict:
        kw = self.request_kwargs(prompt, sample)
        create = (
            self.client.chat.completions.create
            if self.cfg.endpoint == "chat"
            else self.client.completions.create
        )
        # the client's own timeout covers each phase; this bounds the whole request
        resp = await asyncio.wait_for(create(**kw), timeout=self.cfg.timeout_s * 2)
        return parse_response(resp, self.cfg.endpoint)

    async def close(self) -> None:
        await self.client.close()


# ---------------------------------------------------------------------------------------------
# the log and the run


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
        task = bar.add_task("generate (api)", total=total, completed=total - len(todo), info="")

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


# ---------------------------------------------------------------------------------------------
# from API answers to training answers


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
        import torch

        from distill.losses import TopKTeacher

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
