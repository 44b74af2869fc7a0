"""``distill compare RUN_A RUN_B ...``: several runs' students side by side, to pick the point on
the quality-against-speed curve.

Reads each run's eval.json and config.yaml (no model is loaded) and writes into the output folder:

    compare.html   the table and the plot in one self-contained page
    compare.md     the table as Markdown, with compare.png beside it
    compare.json   the rows
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import yaml

from distill.core.fsio import write_text
from distill.evaluate.report import (
    _CSS,
    NOT_APPLICABLE,
    PAIRED_IDS,
    _md_table,
    _png,
    _table,
    applicable_intervals,
    fmt,
    fmt_ci,
    own_tokenizer,
)

COLUMNS = [  # key, header
    ("run", "run"), ("recipe", "student and loss"), ("params_m", "params (M)"),
    ("speedup_batch1", "speed-up, batch 1"), ("speedup_batched", "speed-up, batched"),
    ("kl", "KL ↓"), ("top1_agreement", "top-1 agreement ↑"), ("top1_kept", "top-1 kept"),
    ("rouge_l", "ROUGE-L ↑"), ("reference_accuracy", "accuracy ↑"), ("peak_mib", "peak memory (MiB)"),
    ("heldout", "held-out prompts"),
]  # fmt: skip


class CompareError(ValueError):
    """A run cannot be compared (not evaluated)."""


def _recipe(cfg: dict) -> str:
    s, t = cfg.get("student") or {}, cfg.get("train") or {}
    parts = [f"{s.get('num_layers') or 'all'} layers"]
    if s.get("layer_selection"):
        parts.append(s["layer_selection"])
    if s.get("intermediate_size"):
        parts.append(f"MLP {s['intermediate_size']}")
    if s.get("hidden_size"):
        parts.append(f"hidden {s['hidden_size']}")
    loss = f"{t.get('loss')} α={t.get('alpha')}"
    if t.get("onpolicy_fraction"):
        loss += f", on-policy λ={t['onpolicy_fraction']} ({t.get('onpolicy_schedule', 'constant')})"
    if t.get("hidden_weight"):
        loss += ", hidden"
    return ", ".join(parts) + "; " + loss


def run_row(run: Path) -> dict:
    """One run's figures (the student's), with the intervals where the evaluation made them."""
    run = Path(run)
    path = run / "eval.json"
    if not path.is_file():
        raise CompareError(f"{run}: no eval.json; run `distill evaluate` for it first (or leave it out)")
    res = json.loads(path.read_text())
    cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    s, summary = res.get("student") or {}, res.get("summary") or {}
    intervals = applicable_intervals(res)  # no KL or top-1 for a student with its own tokenizer
    iv, kept = intervals.get("models", {}).get("student", {}), intervals.get("kept", {})
    detail = run / "eval_prompts.json"
    ids = sorted(json.loads(detail.read_text())["prompts"]) if detail.is_file() else None

    def metric(name: str) -> dict | None:
        if name in iv:
            return iv[name]
        return {"value": s[name], "low": None, "high": None} if s.get(name) is not None else None

    return {
        "run": cfg.get("name") or run.name, "path": str(run), "recipe": _recipe(cfg),
        "params_m": s["params"] / 1e6 if s.get("params") else None,
        "speedup_batch1": summary.get("speedup_batch1"), "speedup_batched": summary.get("speedup_batched"),
        "kl": metric("kl"), "top1_agreement": metric("top1_agreement"),
        "top1_kept": kept.get("top1_agreement"),
        "rouge_l": metric("rouge_l"), "reference_accuracy": metric("reference_accuracy"),
        "peak_mib": s.get("peak_rss_mib"), "heldout": summary.get("heldout_prompts"), "heldout_ids": ids,
        "own_tokenizer": own_tokenizer(res),
    }  # fmt: skip


def _cell(row: dict, key: str) -> str:
    v = row.get(key)
    if v is None and row.get("own_tokenizer") and key in (*PAIRED_IDS, "top1_kept"):
        return NOT_APPLICABLE
    if isinstance(v, dict):
        if v.get("low") is None:
            return fmt(v["value"])
        return fmt_ci(v, pct=key == "top1_kept")
    if key.startswith("speedup") and v is not None:
        return f"{v:.2f}×"
    return v if isinstance(v, str) else fmt(v)


def _value(row: dict, key: str) -> float | None:
    v = row.get(key)
    return v.get("value") if isinstance(v, dict) else v


def pareto(rows: list[dict], x: str, y: str, *, higher_y: bool = True) -> list[str]:
    """The runs no other run beats on both speed (``x``, higher is better) and quality (``y``)."""
    pts = [
        (r["run"], _value(r, x), _value(r, y))
        for r in rows
        if _value(r, x) is not None and _value(r, y) is not None
    ]
    sign = 1 if higher_y else -1
    front = []
    for name, px, py in pts:
        beaten = any(qx >= px and sign * qy >= sign * py and (qx, qy) != (px, py) for _, qx, qy in pts)
        if not beaten:
            front.append(name)
    return front


def plot(rows: list[dict], y: str) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if _value(r, "speedup_batch1") is not None and _value(r, y) is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in pts:
        v = r[y] if isinstance(r[y], dict) else {"value": r[y]}
        yerr = None
        if v.get("low") is not None:
            yerr = [[v["value"] - v["low"]], [v["high"] - v["value"]]]
        ax.errorbar([r["speedup_batch1"]], [v["value"]], yerr=yerr, fmt="o", capsize=4)
        ax.annotate(
            r["run"], (r["speedup_batch1"], v["value"]), textcoords="offset points", xytext=(6, 4), fontsize=8
        )
    front = set(pareto(rows, "speedup_batch1", y, higher_y=y != "kl"))
    line = sorted((r["speedup_batch1"], _value(r, y)) for r in pts if r["run"] in front)
    if len(line) > 1:
        ax.plot(*zip(*line, strict=True), "--", color="#999999", lw=1, label="best trade-offs")
        ax.legend(fontsize=8)
    ax.set_xlabel("speed-up over the teacher, batch 1 (×)")
    ax.set_ylabel({"kl": "KL(teacher ‖ student), lower is better"}.get(y, y.replace("_", " ")))
    ax.set_title("quality against speed (95% intervals over held-out prompts)", fontsize=9)
    ax.grid(alpha=0.3)
    return _png(fig)


def compare_runs(runs: list[Path], out: Path, *, y: str = "top1_agreement") -> Path:
    """The table, plot and page for ``runs`` in ``out``; returns compare.html's path."""
    if len(runs) < 2:
        raise CompareError("give at least two run folders to compare")
    rows = [run_row(r) for r in runs]  # every run checked before anything is written
    names = [r["run"] for r in rows]
    if len(set(names)) != len(names):
        for r in rows:
            r["run"] = Path(r["path"]).name if names.count(r["run"]) > 1 else r["run"]
    notes = []
    sets = {tuple(r["heldout_ids"]) for r in rows if r["heldout_ids"] is not None}
    if len(sets) > 1:
        notes.append("the runs were evaluated on different held-out prompts: their figures are not paired, "
                     "and a difference smaller than the intervals is not a difference")  # fmt: skip
    for a in rows:
        for b in rows:
            ia, ib = a.get(y), b.get(y)
            if a is b or not isinstance(ia, dict) or not isinstance(ib, dict) or ia.get("low") is None:
                continue
            if a["run"] < b["run"] and ia["low"] <= ib["high"] and ib["low"] <= ia["high"]:
                notes.append(f"{a['run']} and {b['run']}: the {y} intervals overlap")
    for r in rows:
        if _value(r, y) is None:
            why = (f"its student has its own tokenizer and {y} compares token ids with the teacher's"
                   if r["own_tokenizer"] and y in PAIRED_IDS else f"its evaluation has no {y}")  # fmt: skip
            notes.append(f"{r['run']}: left out of the plot and the ranking on {y}: {why} "
                         "(--metric rouge_l or reference_accuracy compares every run)")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    png = plot(rows, y)
    if png:
        write_text(out / "compare.png", png)
    head = [h for _, h in COLUMNS]
    body = [[_cell(r, k) for k, _ in COLUMNS] for r in rows]
    front = pareto(rows, "speedup_batch1", y, higher_y=y != "kl")
    esc = html.escape
    best = f"Best trade-offs (no other run both faster and better on {y}): {', '.join(front)}"
    page = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>distill compare</title>"
            f"<style>{_CSS}</style></head><body><h1>Runs compared</h1>", _table(head, body),
            f"<p>{esc(best)}</p>"]  # fmt: skip
    page += [f"<div class='warn'>⚠ {esc(n)}</div>" for n in notes]
    if png:
        page.append(
            f"<img alt='quality against speed' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
        )
    page.append("</body></html>")
    md = ["# Runs compared", "", *_md_table(head, body), "",
          best, ""]  # fmt: skip
    md += [f"> **note:** {n}" for n in notes] + ([""] if notes else [])
    md += ["![quality against speed](compare.png)"] if png else []
    write_text(out / "compare.md", "\n".join(md))
    write_text(out / "compare.json", json.dumps({"rows": rows, "pareto": front, "notes": notes}, indent=1))
    write_text(out / "compare.html", "\n".join(page))
    return out / "compare.html"
