"""The client side of an API teacher: requests, retries with backoff, rate limits, parsing, secrets
kept out of every message."""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import time
from collections.abc import Awaitable, Callable

import openai

from distill.core.config import ApiConfig
from distill.core.data import Prompt


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
