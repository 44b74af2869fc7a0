"""Confidence intervals over prompts: each held-out prompt is one draw, so a figure's interval is
the percentile bootstrap over prompts (resampled with replacement, the same draw for every model, so
differences and ratios between models are paired).

A metric is a function of per-prompt columns, e.g. KL = sum of per-prompt KL sums / sum of their
token counts (a ratio of sums, as the point figure is computed), accuracy = mean of 0/1 columns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

Columns = Mapping[str, np.ndarray]  # name -> one value per prompt


Statistic = Callable[[Columns], float]


@dataclass(frozen=True)
class Interval:
    value: float  # on all prompts
    low: float
    high: float
    n: int  # prompts
    dropped: int = 0  # resamples on which the statistic was not finite, left out of low and high

    @property
    def width(self) -> float:
        return self.high - self.low

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high

    def as_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n, "dropped": self.dropped}


def resample_indices(n: int, draws: int, seed: int) -> np.ndarray:
    """``draws`` bootstrap resamples of ``range(n)``: an int array (draws, n)."""
    return np.random.default_rng(seed).integers(0, n, size=(draws, n))


def bootstrap(
    stat: Statistic, columns: Columns, *, draws: int = 2000, seed: int = 0, level: float = 0.95
) -> Interval:
    """The statistic on all prompts, and its percentile bootstrap interval over prompts.

    A resample on which the statistic is not finite (say, one without a prompt that has a
    reference, or with a denominator of 0) has no value to rank: it is left out of the percentiles
    and counted in ``Interval.dropped``, so the interval is over the resamples where the figure
    exists. With every resample left out, or fewer than 2 prompts, the interval is (-inf, inf).
    """
    cols = {k: np.asarray(v, dtype=np.float64) for k, v in columns.items()}
    lengths = {len(v) for v in cols.values()}
    if len(lengths) != 1:
        raise ValueError(f"columns of different lengths: { {k: len(v) for k, v in cols.items()} }")
    n = lengths.pop()
    value = float(stat(cols))
    if n < 2:
        return Interval(value, -math.inf, math.inf, n)
    idx = resample_indices(n, draws, seed)
    samples = np.array([stat({k: v[row] for k, v in cols.items()}) for row in idx], dtype=np.float64)
    finite = samples[np.isfinite(samples)]
    dropped = int(samples.size - finite.size)
    if finite.size == 0:
        return Interval(value, -math.inf, math.inf, n, dropped)
    alpha = (1 - level) / 2
    low, high = np.quantile(finite, [alpha, 1 - alpha])
    return Interval(value, float(low), float(high), n, dropped)


def mean(name: str) -> Statistic:
    return lambda c: float(np.mean(c[name])) if len(c[name]) else math.nan


def ratio_of_sums(num: str, den: str) -> Statistic:
    def stat(c: Columns) -> float:
        d = float(np.sum(c[den]))
        return float(np.sum(c[num])) / d if d else math.nan

    return stat


# The quality metrics of ``evaluate_model``'s per-prompt rows, as statistics of columns named
# ``<model>:<field>``, so that one resampling of the prompts serves every model (paired).
HIGHER_IS_BETTER = {"kl": False, "top1_agreement": True, "perplexity": False, "bits_per_byte": False,
                    "teacher_logprob": True,
                    "exact_match": True, "rouge_l": True, "reference_accuracy": True}  # fmt: skip


FIELDS = (
    "kl",
    "agree",
    "ce",
    "tokens",
    "bytes",
    "exact_match",
    "rouge_l",
    "correct",
    "judge_logprob",
    "judge_tokens",
)


def metric(name: str, model: str) -> Statistic:
    """The statistic of ``name`` for ``model`` over the columns (as ``evaluate_model`` computes it)."""
    p = f"{model}:"
    if name == "kl":
        return ratio_of_sums(p + "kl", p + "tokens")
    if name == "top1_agreement":
        return ratio_of_sums(p + "agree", p + "tokens")
    if name == "perplexity":
        ce = ratio_of_sums(p + "ce", p + "tokens")
        return lambda c: math.exp(ce(c))
    if name == "bits_per_byte":  # nats per byte / ln 2
        nats = ratio_of_sums(p + "ce", p + "bytes")
        return lambda c: nats(c) / math.log(2)
    if name == "teacher_logprob":
        return ratio_of_sums(p + "judge_logprob", p + "judge_tokens")
    if name == "reference_accuracy":  # prompts without a reference are NaN and left out
        return lambda c: (
            float(np.nanmean(c[p + "correct"])) if np.isfinite(c[p + "correct"]).any() else math.nan
        )
    return mean(p + name)


def kept(name: str, student: str = "student", teacher: str = "teacher") -> Statistic:
    """How much of the teacher's quality the student keeps on metric ``name``, 1 at the teacher:
    agreement with the teacher's answers (top-1, exact match, ROUGE-L) is 1 for the teacher, so kept
    is the student's value; accuracy kept is the ratio of accuracies; perplexity and bits per byte
    kept are the teacher's over the student's; the teacher's judgement (mean log-prob per token)
    kept is exp(student - teacher), the ratio of per-token likelihoods; KL kept is exp(-KL), the
    geometric-mean probability ratio of the teacher's distribution under the student's (1 when
    they are the same). Perplexity kept means something only when both models are scored in the
    same tokens (one tokenizer); bits per byte kept, whatever the tokenizers."""
    s, t = metric(name, student), metric(name, teacher)
    if name in ("top1_agreement", "exact_match", "rouge_l"):
        return s
    if name == "kl":
        return lambda c: math.exp(-s(c))
    if name == "teacher_logprob":
        return lambda c: math.exp(s(c) - t(c))
    if name in ("perplexity", "bits_per_byte"):
        return lambda c: t(c) / s(c)
    return lambda c: s(c) / t(c) if t(c) else math.nan


def difference(name: str, a: str, b: str) -> Statistic:
    sa, sb = metric(name, a), metric(name, b)
    return lambda c: sa(c) - sb(c)


# Fields whose None means "no tokens judged" on that prompt: 0 adds nothing to a ratio of sums.
# Any other None is a figure that does not exist (``correct`` without a reference; ``kl`` and
# ``agree`` for a model with another tokenizer than the teacher's, or without a local teacher;
# ``ce`` and ``tokens`` for a teacher known only by its answers): NaN, so no metric is made of it.
ZERO_WHEN_MISSING = ("judge_logprob", "judge_tokens")


def prompt_columns(per_prompt: Mapping[str, list[dict]]) -> dict[str, np.ndarray]:
    """``{model: rows}`` -> columns ``<model>:<field>`` over the prompts every model answered, in
    one order; a missing figure is NaN, or 0 for the judge's sums (``ZERO_WHEN_MISSING``)."""
    ids = None
    for rows in per_prompt.values():
        got = [r["id"] for r in rows]
        seen = set(got)
        ids = got if ids is None else [i for i in ids if i in seen]
    cols: dict[str, np.ndarray] = {}
    for model, rows in per_prompt.items():
        by_id = {r["id"]: r for r in rows}
        for f in FIELDS:
            missing = 0.0 if f in ZERO_WHEN_MISSING else math.nan
            vals = [by_id[i].get(f) for i in ids or []]
            cols[f"{model}:{f}"] = np.array([missing if v is None else v for v in vals], dtype=np.float64)
    return cols


def quality_intervals(
    per_prompt: Mapping[str, list[dict]],
    *,
    draws: int = 2000,
    seed: int = 0,
    metrics: tuple[str, ...] | None = None,
    what: tuple[str, str] = ("held-out prompts", "raise data.heldout_size"),
) -> dict:
    """Every quality metric of every model with its interval, the student's "kept" share of the
    teacher's, and the student's difference from the untrained student (a paired interval; where it
    contains 0 the held-out set cannot tell the two apart): a JSON-ready dict.

    A metric a model lacks (KL and top-1 agreement of a student with its own tokenizer) is left
    out, and so is every kept share made of it. Kept perplexity needs the student's KL too: KL
    exists only where the student reads the teacher's tokens, and perplexities per token of two
    tokenizers are not comparable (kept bits per byte is, whatever the tokenizers)."""
    cols = prompt_columns(per_prompt)
    n = len(next(iter(cols.values()))) if cols else 0
    out: dict = {"prompts": n, "draws": draws, "seed": seed, "level": 0.95, "models": {}, "kept": {},
                 "vs_untrained": {}, "warnings": []}  # fmt: skip
    if n == 0:
        return out

    def exists(name: str, model: str) -> bool:
        v = metric(name, model)(cols)
        return v is not None and math.isfinite(v)

    def available(name: str, model: str) -> bool:
        return (metrics is None or name in metrics) and exists(name, model)

    def interval(stat: Statistic, label: str) -> Interval:
        ci = bootstrap(stat, cols, draws=draws, seed=seed)
        if ci.dropped:
            out["warnings"].append(
                f"{label}: not finite on {ci.dropped} of {draws} resamples of the {n} {what[0]} (e.g. none "
                f"drawn that it can be computed on); its interval is over the other {draws - ci.dropped}"
            )
        return ci

    for model in per_prompt:
        out["models"][model] = {
            name: interval(metric(name, model), f"{name} ({model})").as_dict()
            for name in HIGHER_IS_BETTER if available(name, model)
        }  # fmt: skip
    if "student" in per_prompt and "teacher" in per_prompt:
        same_tokens = exists("kl", "student")
        for name in HIGHER_IS_BETTER:
            if not available(name, "student") or (name == "perplexity" and not same_tokens):
                continue
            if name == "reference_accuracy" and not available(name, "teacher"):
                continue
            if math.isfinite(kept(name)(cols)):
                out["kept"][name] = interval(kept(name), f"{name} kept").as_dict()
    if "student" in per_prompt and "untrained_student" in per_prompt:
        for name, up in HIGHER_IS_BETTER.items():
            if not (available(name, "student") and available(name, "untrained_student")):
                continue
            diff = difference(name, "student", "untrained_student")
            ci = interval(diff, f"{name} (student − untrained student)")
            out["vs_untrained"][name] = ci.as_dict()
            shown = f"{ci.value:+.3g}, 95% interval [{ci.low:+.3g}, {ci.high:+.3g}]"
            if ci.low == ci.high == 0.0:
                continue  # the same on every prompt: no difference to tell from noise
            if ci.contains(0.0):
                out["warnings"].append(
                    f"{name}: the student's difference from the untrained student ({shown}) is within the "
                    f"noise of {n} {what[0]}: the interval is wider than the difference; {what[1]}"
                )
            elif (ci.value > 0) != up:
                out["warnings"].append(
                    f"{name}: the trained student is worse than the untrained one ({shown})"
                )
    return out


def summarised_warnings(warnings: list[str]) -> list[str]:
    """The warnings for the console: each as it is, but those about resamples a figure could not be
    computed on (see ``quality_intervals``) in one line naming their figures; eval.json keeps all."""
    dropped = [w for w in warnings if ": not finite on " in w]
    out = [w for w in warnings if w not in dropped]
    if dropped:
        names = ", ".join(w.split(": not finite on ", 1)[0] for w in dropped)
        out.append(
            f"{len(dropped)} intervals are over fewer resamples than asked: on some resamples the figure "
            f"has nothing to be computed on (e.g. no item with a reference drawn): {names}; "
            "eval.json names the count of each"
        )
    return out
