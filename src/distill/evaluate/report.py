"""The run's report: what the student kept, what it saves, how it was trained and from what.

Two files in ``runs/<name>/report/``, made from the run folder alone (no model is loaded):

    report.html   one self-contained page (plots embedded as PNG data, no script, no network)
    report.md     the same figures as Markdown, with the plots beside it as files:
    quality.png   quality with 95% intervals: untrained vs distilled student
    cost.png      generation tokens/s (batch 1, batched) and peak memory
    training.png  loss and its parts (KD, CE), learning rate, throughput per step

Written by ``distill evaluate`` (and so ``distill run``), and again by ``distill report RUN_DIR``.
Quality figures come with percentile-bootstrap intervals over the held-out prompts (distill.stats).
"""

from __future__ import annotations

import base64
import copy
import html
import json
import math
import platform
import random
from datetime import UTC, datetime
from pathlib import Path

import yaml

from distill.core.fsio import json_lines, write_text
from distill.core.terms import read_terms
from distill.evaluate.intervals import HIGHER_IS_BETTER

MODELS = ("teacher", "untrained_student", "student")


LABELS = {"teacher": "teacher", "untrained_student": "untrained student", "student": "student"}


QUALITY = {  # metric -> what it is, for the tables
    "kl": "KL(teacher ‖ model), nats/token",
    "top1_agreement": "top-1 agreement with the teacher",
    "perplexity": "perplexity of the teacher's answers",
    "bits_per_byte": "bits per byte of the teacher's answers",
    "teacher_logprob": "teacher's log-prob of the model's answers, nats/token",
    "exact_match": "exact match to the teacher's answer",
    "rouge_l": "ROUGE-L to the teacher's answer",
    "reference_accuracy": "accuracy against reference answers",
}


PAIRED_IDS = ("kl", "top1_agreement")  # compare the two models' token ids position by position


NOT_APPLICABLE = "n/a"


class ReportError(ValueError):
    """The run folder cannot make a report (no evaluation yet)."""


def environment() -> dict:
    """Package versions and hardware, recorded with the evaluation."""
    import os

    import torch
    import transformers

    from distill import __version__
    from distill.core.hardware import cpu_model

    return {"distill": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "platform": platform.platform(),
            "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}  # fmt: skip


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in json_lines(path.read_text()) if x.strip()]


def fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.{digits}f}".rstrip("0").rstrip(".")


def fmt_ci(ci: dict | None, pct: bool = False) -> str:
    """``value [low, high]``, and how many resamples were left out of the interval if any were."""
    if not ci:
        return "–"
    if pct:
        shown = f"{100 * ci['value']:.1f}% [{100 * ci['low']:.1f}, {100 * ci['high']:.1f}]"
    else:
        shown = f"{fmt(ci['value'])} [{fmt(ci['low'])}, {fmt(ci['high'])}]"
    return shown + (f" ({ci['dropped']:,} resamples not finite)" if ci.get("dropped") else "")


def own_tokenizer(results: dict) -> bool:
    """Whether the student has another tokenizer than the teacher's: as the evaluation recorded it,
    or, in an eval.json without the record, a teacher with a KL figure and a student without one."""
    s, t = results.get("student") or {}, results.get("teacher") or {}
    if "own_tokenizer" in s:
        return bool(s["own_tokenizer"])
    return t.get("kl") is not None and "kl" in s and s["kl"] is None


def applicable_intervals(results: dict) -> dict:
    """The evaluation's intervals less those of figures it found do not exist (None in the model's
    entry: KL and top-1 agreement of a student with its own tokenizer, or without a local teacher;
    an older eval.json holds intervals of 0 there), the kept shares and differences made of them,
    and kept perplexity of a student with its own tokenizer (per token of two tokenizers: bits per
    byte stands in)."""

    def missing(model: str, name: str) -> bool:
        figures = results.get(model) or {}
        return name in figures and figures[name] is None

    own = own_tokenizer(results)
    iv = copy.deepcopy(results.get("intervals") or {})
    for model, figures in (iv.get("models") or {}).items():
        for name in [n for n in figures if missing(model, n)]:
            del figures[name]
    kept = iv.get("kept") or {}
    unit = ("perplexity",) if own else ()  # per token, and the two count other tokens
    for name in [n for n in kept if missing("student", n) or missing("teacher", n) or n in unit]:
        del kept[name]
    vs = iv.get("vs_untrained") or {}
    for name in [n for n in vs if missing("student", n) or missing("untrained_student", n)]:
        del vs[name]
    return iv


def cost_per_million(tokens_per_s: float | None, price_per_hour: float | None) -> float | None:
    """USD per million generated tokens on hardware that costs ``price_per_hour`` USD an hour."""
    if not tokens_per_s or not price_per_hour:
        return None
    return price_per_hour / 3600 / tokens_per_s * 1e6


def cost_rows(results: dict, price_per_hour: float | None) -> list[tuple[str, dict[str, str]]]:
    """(figure, {model: shown value}) rows of the cost table."""
    present = [m for m in MODELS if m in results]

    def row(label: str, value) -> tuple[str, dict[str, str]]:
        return label, {m: value(results[m]) for m in present}

    mib = lambda v: "–" if v is None else f"{v / 2**20:,.1f} MiB"  # noqa: E731
    rows = [
        row("parameters", lambda r: "–" if r.get("params") is None else f"{r['params'] / 1e6:,.1f} M"),
        row("bytes on disk", lambda r: mib(r.get("bytes"))),
        row("peak memory answering one prompt (process)",
            lambda r: "–" if r.get("peak_rss_mib") is None else f"{r['peak_rss_mib']:,.0f} MiB"),
        row("  of which the model (above the runtime)",
            lambda r: "–" if r.get("model_peak_mib") is None else f"{r['model_peak_mib']:,.0f} MiB"),
        row("tokens/s, batch 1", lambda r: fmt(r.get("tokens_per_s_batch1"))),
        row("tokens/s, batched", lambda r: fmt(r.get("tokens_per_s_batched"))),
        row("mean answer length, tokens", lambda r: fmt(r.get("mean_answer_tokens"))),
        row("latency per answer at batch 1, s", lambda r: fmt(r.get("seconds_per_answer"))),
    ]  # fmt: skip
    if price_per_hour:
        for key, label in (("tokens_per_s_batched", "batched"), ("tokens_per_s_batch1", "batch 1")):
            rows.append(row(f"USD per million tokens, {label} (at ${price_per_hour:g}/h)",
                            lambda r, k=key: fmt(cost_per_million(r.get(k), price_per_hour))))  # fmt: skip
    return rows


def headline(results: dict) -> list[tuple[str, str, str]]:
    """(label, value, note) of the figures at the top of the page."""
    s = results.get("summary") or {}
    kept = applicable_intervals(results).get("kept") or {}
    out = []
    # across tokenizers there is no KL or top-1 agreement: bits per byte stands in
    names = ("top1_agreement", "kl") if "top1_agreement" in kept else ("bits_per_byte",)
    for name in (*names, "reference_accuracy"):
        if name in kept:
            out.append((f"kept: {QUALITY[name].split(',')[0]}", f"{100 * kept[name]['value']:.1f}%",
                        f"95% CI {100 * kept[name]['low']:.1f}–{100 * kept[name]['high']:.1f}%"))  # fmt: skip
    if s.get("speedup_batch1"):
        out.append(
            ("speed-up, batch 1", f"{s['speedup_batch1']:.2f}×", f"batched {fmt(s.get('speedup_batched'))}×")
        )
    if s.get("size_ratio"):
        out.append(("size", f"{100 * s['size_ratio']:.0f}%", "of the teacher's parameters"))
    t, st = results.get("teacher") or {}, results.get("student") or {}
    if t.get("peak_rss_mib") and st.get("peak_rss_mib"):
        out.append(("peak memory", f"{st['peak_rss_mib']:,.0f} MiB", f"teacher {t['peak_rss_mib']:,.0f} MiB"))
    return out


def samples(answers: list[dict], per_prompt: dict, prompts: dict, k_random: int = 3, seed: int = 0) -> list:
    """The student's best and worst answers by ROUGE-L to the teacher's, and a few at random:
    ``(kind, id, prompt text, {model: answer}, rouge_l)``."""
    texts: dict[str, dict[str, str]] = {}
    for a in answers:
        texts.setdefault(a["id"], {})[a["model"]] = a["text"]
    scores = {r["id"]: r["rouge_l"] for r in per_prompt.get("student", []) if r["id"] in texts}
    if not scores:
        return []
    order = sorted(scores, key=lambda i: (scores[i], i))
    picked = [("best", order[-1]), ("worst", order[0])]
    rest = [i for i in order if i not in (order[0], order[-1])]
    picked += [("random", i) for i in random.Random(seed).sample(rest, min(k_random, len(rest)))]

    def prompt_text(i: str) -> str:
        msgs = (prompts.get(i) or {}).get("messages") or []
        return msgs[-1]["content"] if msgs else i

    return [(kind, i, prompt_text(i), texts[i], scores[i]) for kind, i in picked]


def _png(fig) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def plot_quality(intervals: dict) -> bytes | None:
    """Untrained vs distilled student, each metric with its 95% interval as an error bar."""
    import matplotlib.pyplot as plt

    models = [m for m in ("untrained_student", "student") if m in intervals.get("models", {})]
    groups = [("kl", "KL (lower is better)"), ("top1_agreement", "top-1 agreement"), ("rouge_l", "ROUGE-L"),
              ("exact_match", "exact match"), ("reference_accuracy", "accuracy")]  # fmt: skip
    groups = [(k, t) for k, t in groups if all(k in intervals["models"][m] for m in models)]
    if not models or not groups:
        return None
    fig, axes = plt.subplots(1, len(groups), figsize=(2.6 * len(groups), 3.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], groups, strict=True):
        for i, m in enumerate(models):
            ci = intervals["models"][m][key]
            err = [[ci["value"] - ci["low"]], [ci["high"] - ci["value"]]]
            ax.bar(i, ci["value"], yerr=err, capsize=4, color=("#bbbbbb", "#3b75af")[i % 2], label=LABELS[m])
            ax.annotate(fmt(ci["value"]), (i, ci["high"]), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(models)), [LABELS[m].replace(" student", "") for m in models], fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"held-out quality, 95% intervals over {intervals.get('prompts')} prompts", fontsize=9)
    return _png(fig)


def plot_cost(results: dict) -> bytes | None:
    import matplotlib.pyplot as plt

    present = [m for m in MODELS if m in results and results[m].get("tokens_per_s_batch1")]
    if not present:
        return None
    memory = [m for m in present if results[m].get("peak_rss_mib")]
    fig, axes = plt.subplots(1, 2 if memory else 1, figsize=(9 if memory else 5, 3.4), squeeze=False)
    ax = axes[0][0]
    width = 0.8 / len(present)
    for i, m in enumerate(present):
        vals = [results[m].get("tokens_per_s_batch1") or 0, results[m].get("tokens_per_s_batched") or 0]
        xs = [g + (i - (len(present) - 1) / 2) * width for g in range(2)]
        bars = ax.bar(xs, vals, width, label=LABELS[m])
        for bar, v in zip(bars, vals, strict=True):
            ax.annotate(fmt(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=7)  # fmt: skip
    ax.set_xticks(range(2), ["batch 1", "batched"])
    ax.set_ylabel("generated tokens/s")
    ax.set_title("generation speed", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    if memory:
        ax = axes[0][1]
        runtime = [results[m]["runtime_rss_mib"] for m in memory]
        model = [results[m]["model_peak_mib"] for m in memory]
        ax.barh(range(len(memory)), runtime, color="#cccccc", label="Python + torch runtime")
        ax.barh(
            range(len(memory)), model, left=runtime, color="#3b75af", label="the model (weights, activations)"
        )
        ax.set_yticks(range(len(memory)), [LABELS[m] for m in memory], fontsize=8)
        ax.set_xlabel("peak resident memory, MiB")
        ax.set_title("memory answering one prompt", fontsize=9)
        ax.legend(fontsize=7)
    return _png(fig)


def plot_training(rows: list[dict]) -> bytes | None:
    import matplotlib.pyplot as plt

    if not rows:
        return None
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for key, label in (("loss", "total"), ("kd", "KD"), ("ce", "CE"), ("hidden", "hidden alignment")):
        if any(r.get(key) for r in rows):
            axes[0].plot(steps, [r.get(key) for r in rows], label=label, lw=1)
    axes[0].set_title("loss, nats per answer token", fontsize=9)
    axes[0].legend(fontsize=7)
    axes[1].plot(steps, [r.get("lr") for r in rows], color="#aa5500", lw=1)
    axes[1].set_title("learning rate", fontsize=9)
    axes[2].plot(steps, [r.get("tokens_per_s") for r in rows], color="#227722", lw=1)
    axes[2].set_title("throughput, training tokens/s", fontsize=9)
    for ax in axes:
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.grid(alpha=0.3)
    return _png(fig)


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222}
h1{font-size:1.6em;margin-bottom:.2em} h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.sub{color:#666} table{border-collapse:collapse;margin:.6em 0} th,td{border:1px solid #ddd;padding:.3em .6em;
text-align:right;vertical-align:top} th:first-child,td:first-child{text-align:left}
thead th{background:#f4f4f4}
.cards{display:flex;flex-wrap:wrap;gap:.8em;margin:1em 0}.card{border:1px solid #ddd;border-radius:6px;
padding:.6em 1em;min-width:10em}.card .v{font-size:1.7em;font-weight:600}.card .l,.card .n{color:#666;
font-size:.85em} .warn{background:#fff6e0;border-left:4px solid #e0a000;padding:.4em .8em;margin:.4em 0}
img{max-width:100%} .ans{display:grid;grid-template-columns:repeat(3,1fr);gap:.6em}
.ans div{border:1px solid #e4e4e4;border-radius:4px;padding:.4em;white-space:pre-wrap;font-size:.9em}
.ans b{display:block;color:#555;font-size:.85em}
pre{background:#f7f7f7;padding:.6em;overflow:auto;font-size:.85em}
"""


def _table(head: list[str], rows: list[list[str]]) -> str:
    esc = html.escape
    out = ["<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    out += ["<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in r) + "</tr>" for r in rows]
    return "".join(out) + "</tbody></table>"


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    return lines + ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]


def quality_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """(head, rows) of the quality table; a figure that does not apply to a student with its own
    tokenizer reads ``n/a``."""
    iv = applicable_intervals(results)
    own = own_tokenizer(results)
    models = [m for m in MODELS if m in (iv.get("models") or {})]
    head = ["metric", *[LABELS[m] for m in models], "student kept (of the teacher)", "student − untrained"]
    rows = []
    for name, label in QUALITY.items():
        if not any(name in iv["models"][m] for m in models):
            continue
        na = own and name in PAIRED_IDS
        na_kept = na or (own and name == "perplexity")
        arrow = "↑" if HIGHER_IS_BETTER[name] else "↓"
        rows.append([f"{label} {arrow}",
                     *[NOT_APPLICABLE if na and m != "teacher" else fmt_ci(iv["models"][m].get(name))
                       for m in models],
                     NOT_APPLICABLE if na_kept else fmt_ci(iv.get("kept", {}).get(name), pct=True),
                     NOT_APPLICABLE if na else fmt_ci((iv.get("vs_untrained") or {}).get(name))])  # fmt: skip
    return head, rows


OWN_TOKENIZER_NOTE = (
    "The student has its own tokenizer: KL and top-1 agreement compare the two models' token ids, so "
    "they do not apply to it (n/a), and its perplexity is per token of its own tokenizer, so it is not "
    "set against the teacher's. Bits per byte, which no tokenizer enters, gives the kept figure."
)


def task_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """One row per task: each model's accuracy, the student's kept share and its difference from
    the untrained student, each with its interval."""
    tasks = results.get("tasks") or {}
    models = [m for m in MODELS if any(m in t["intervals"]["models"] for t in tasks.values())]
    head = [
        "task",
        "items",
        *[LABELS[m] for m in models],
        "student kept (of the teacher)",
        "student − untrained",
    ]
    rows = []
    for name, t in tasks.items():
        iv, key = t["intervals"], "reference_accuracy"
        label = name + (" (tests pass)" if t.get("kind") == "code" else " (exact answer)")
        rows.append([label, str(t["items"]),
                     *[fmt_ci(iv["models"].get(m, {}).get(key)) for m in models],
                     fmt_ci(iv.get("kept", {}).get(key), pct=True),
                     fmt_ci(iv.get("vs_untrained", {}).get(key))])  # fmt: skip
    return head, rows


def _provenance(run: Path, results: dict) -> tuple[list[list[str]], str]:
    cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    env = results.get("environment") or {}
    timings = _read_json(run / "timings.json") or {}
    train = _read_json(run / "train_summary.json") or {}
    gen = _read_json(run / "generate_summary.json") or {}
    student, same = cfg.get("student") or {}, "as the teacher"
    rows = [
        ["teacher", str((cfg.get("teacher") or {}).get("model") or (cfg.get("teacher") or {}).get("api"))],
        ["student", f"{student.get('init')}: {results.get('student', {}).get('num_layers') or '?'} layers "
                    f"({student.get('layer_selection', '')}), MLP {student.get('intermediate_size') or same}"
                    f", hidden {student.get('hidden_size') or same}"],
        ["data", str((cfg.get("data") or {}).get("path") or "the embedded prompt set")],
        ["held-out prompts", str((results.get("summary") or {}).get("heldout_prompts"))],
        ["loss", f"{(cfg.get('train') or {}).get('loss')}, alpha {(cfg.get('train') or {}).get('alpha')}"],
        ["training", f"{train.get('steps', '?')} steps, {fmt(train.get('tokens'))} tokens, "
                     f"{fmt(train.get('seconds'))} s; teacher signal: {train.get('teacher_signal', '?')}"],
    ]  # fmt: skip
    if gen.get("total", {}).get("cost_usd") is not None:
        rows.append(["API cost of the training data", f"${gen['total']['cost_usd']:.4f}"])
    terms = read_terms(run / "config.yaml")  # the terms of use the run recorded when it started
    rows += [[f"terms: {label}", text] for label, text in terms.rows()] if terms else []
    for role, p in (results.get("precision") or {}).items():
        rows.append([f"precision, {role}", p.get("reason", str(p))])
    for k in ("distill", "python", "torch", "transformers", "platform", "cpu", "cpu_count", "gpu"):
        if env.get(k) is not None:
            rows.append([k, str(env[k])])
    if timings:
        rows.append(["wall time", ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
                     + f"; {sum(timings.values()) / 60:.1f} min in all"])  # fmt: skip
    recipe = yaml.safe_dump(cfg, sort_keys=False) if cfg else ""
    return rows, recipe


def write_report(run: Path, results: dict | None = None, *, price_per_hour: float | None = None) -> Path:
    """report.md, report.html and their plots for a run folder with an evaluation; returns the
    path of report.html. ``results`` defaults to the run's eval.json; ``price_per_hour`` to the one
    the evaluation recorded (the cost rows are left out without one)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no screen
    run = Path(run)
    results = results if results is not None else _read_json(run / "eval.json")
    if not results:
        raise ReportError(f"{run} has no eval.json: run `distill evaluate` (or `distill run`) first")
    price = price_per_hour or (results.get("summary") or {}).get("price_per_hour")
    detail = _read_json(run / "eval_prompts.json") or {}
    answers = _read_jsonl(run / "eval_answers.jsonl")
    out = run / "report"
    out.mkdir(parents=True, exist_ok=True)
    plots = {"quality": plot_quality(applicable_intervals(results)), "cost": plot_cost(results),
             "training": plot_training(_read_jsonl(run / "metrics.jsonl"))}  # fmt: skip
    for name, png in plots.items():
        if png is not None:
            write_text(out / f"{name}.png", png)

    def img(name: str, alt: str) -> str:
        png = plots.get(name)
        return (
            f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(png).decode()}">' if png else ""
        )

    esc = html.escape
    iv = results.get("intervals") or {}
    made = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    h = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>distill report: {esc(run.name)}"
         f"</title><style>{_CSS}</style></head><body>",
         f"<h1>Distillation report: {esc(run.name)}</h1>",
         f"<p class='sub'>made {made} from {esc(str(run))}</p>"]  # fmt: skip
    md = [f"# Distillation report: {run.name}", "", f"made {made}", ""]
    cards = headline(results)
    if cards:
        h.append("<div class='cards'>" + "".join(
            f"<div class='card'><div class='l'>{esc(a)}</div><div class='v'>{esc(b)}</div>"
            f"<div class='n'>{esc(c)}</div></div>" for a, b, c in cards) + "</div>")  # fmt: skip
        md += [f"- **{a}: {b}** ({c})" for a, b, c in cards] + [""]
    for w in iv.get("warnings", []):
        h.append(f"<div class='warn'>⚠ {esc(w)}</div>")
        md.append(f"> **warning:** {w}")
    md += [""] if iv.get("warnings") else []

    head, rows = quality_rows(results)
    n, draws = iv.get("prompts"), iv.get("draws")
    how = (f"On {n} held-out prompts the student never trained on, scored against the teacher's answers; "
           f"each figure with its 95% percentile-bootstrap interval ({draws} resamples of the prompts, "
           "paired across models). Kept: the student's share of the teacher's figure "
           "(see docs/report.md).")  # fmt: skip
    h += ["<h2>Quality kept</h2>", f"<p>{esc(how)}</p>", _table(head, rows) if rows else "<p>no figures</p>",
          img("quality", "quality with intervals")]  # fmt: skip
    md += ["## Quality kept", "", how, "", *(_md_table(head, rows) if rows else []), "",
           "![quality](quality.png)" if plots["quality"] else "", ""]  # fmt: skip
    if own_tokenizer(results):
        h.insert(len(h) - 1, f"<p>{esc(OWN_TOKENIZER_NOTE)}</p>")
        md[-2:-2] = [OWN_TOKENIZER_NOTE, ""]

    thead, trows = task_rows(results)
    if trows:
        about = ("Accuracy on tasks with reference answers, beyond the held-out prompts: greedy answers, "
                 "1 per item answered right (the last number equal to the reference's, or the tests passed), "
                 "with 95% bootstrap intervals over the items.")  # fmt: skip
        h += ["<h2>Tasks</h2>", f"<p>{esc(about)}</p>", _table(thead, trows)]
        md += ["## Tasks", "", about, "", *_md_table(thead, trows), ""]
        for w in [
            w for t in (results.get("tasks") or {}).values() for w in t["intervals"].get("warnings", [])
        ]:
            h.append(f"<div class='warn'>⚠ {esc(w)}</div>")
            md.append(f"> **warning:** {w}")

    picked = samples(answers, detail.get("models") or {}, detail.get("prompts") or {})
    if picked:
        h.append("<h2>Sample answers</h2><p>The student's best and worst answers by ROUGE-L to the "
                 "teacher's, and three at random.</p>")  # fmt: skip
        md += ["## Sample answers", ""]
        for kind, pid, prompt, texts, score in picked:
            boxes = "".join(
                f"<div><b>{esc(LABELS[m])}</b>{esc(texts[m])}</div>" for m in MODELS if m in texts
            )
            h.append(f"<h3>{esc(kind)} (ROUGE-L {score:.2f}): {esc(pid)}</h3>"
                     f"<p><b>prompt:</b> {esc(prompt)}</p><div class='ans'>{boxes}</div>")  # fmt: skip
            md += [f"### {kind} (ROUGE-L {score:.2f}): {pid}", "", f"**prompt:** {prompt}", ""]
            md += [f"- **{LABELS[m]}:** {texts[m]!r}" for m in MODELS if m in texts] + [""]

    crow = cost_rows(results, price)
    present = [m for m in MODELS if m in results]
    chead = ["figure", *[LABELS[m] for m in present]]
    cbody = [[label, *[vals[m] for m in present]] for label, vals in crow]
    h += ["<h2>Cost</h2>", _table(chead, cbody), img("cost", "speed and memory")]
    md += ["## Cost", "", *_md_table(chead, cbody), "", "![cost](cost.png)" if plots["cost"] else "", ""]
    if not price:
        note = (
            "Give the hourly price of the serving machine (`distill report RUN --price-per-hour 0.5`) "
            "for the cost per million tokens."
        )
        h.append(f"<p class='sub'>{esc(note)}</p>")
        md += [note, ""]

    if plots["training"]:
        h += ["<h2>Training</h2>", img("training", "training curves")]
        md += ["## Training", "", "![training](training.png)", ""]

    prov, recipe = _provenance(run, results)
    h += ["<h2>Provenance</h2>", _table(["", ""], prov)]
    md += ["## Provenance", "", *_md_table(["", ""], prov), ""]
    if recipe:
        h.append(
            f"<details><summary>the resolved recipe (config.yaml)</summary><pre>{esc(recipe)}</pre></details>"
        )
        md += [
            "<details><summary>the resolved recipe</summary>",
            "",
            "```yaml",
            recipe,
            "```",
            "</details>",
            "",
        ]
    h.append("</body></html>")
    write_text(out / "report.md", "\n".join(md))
    page = out / "report.html"
    write_text(page, "\n".join(h))
    return page
