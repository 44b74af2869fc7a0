"""The run's report: report.md with plots of what a person would rather look at than JSON.

    loss.png      training loss and its parts (KD, CE) per step, from metrics.jsonl
    quality.png   fidelity to the teacher: untrained vs distilled student, from eval.json
    speed.png     generation tokens/s of teacher and students, batch 1 and batched

Written by ``distill evaluate`` (and so by ``distill run``) into ``runs/<name>/report/``.
"""

from __future__ import annotations

import json
from pathlib import Path

from distill.fsio import write_text

MODELS = ("teacher", "untrained_student", "student")


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _plot_loss(rows: list[dict], out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    steps = [r["step"] for r in rows]
    for key, label in (("loss", "total"), ("kd", "KD (weighted in total by alpha)"), ("ce", "CE")):
        if any(r.get(key) for r in rows):
            ax.plot(steps, [r[key] for r in rows], label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per answer token)")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _bars(ax, groups: list[str], series: dict[str, list[float | None]], title: str, ylabel: str) -> None:
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=name)
        for bar, v in zip(bars, values, strict=True):
            if v is not None:
                ax.annotate(f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)  # fmt: skip
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)


def _plot_panels(panels: list[tuple], out: Path) -> None:
    """One bar chart per panel ``(groups, series, title, ylabel)``, side by side."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        _bars(ax, *panel)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_report(run: Path, results: dict) -> Path:
    """Plots and report.md for a run folder with eval results; returns the report's path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no screen
    out = run / "report"
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Distillation report: {run.name}", ""]
    for role, p in (results.get("precision") or {}).items():
        lines.append(f"- precision, {role}: {p['reason']}")
    lines += [""] if results.get("precision") else []
    rows = _metrics(run)
    if rows:
        _plot_loss(rows, out / "loss.png")
        lines += ["## Training", "", "![training loss](loss.png)", "",
                  f"{len(rows)} steps; loss {rows[0]['loss']:.3f} at step 1, {rows[-1]['loss']:.3f} at "
                  f"step {rows[-1]['step']}.", ""]  # fmt: skip
    present = [m for m in MODELS if m in results]
    students = [m for m in ("untrained_student", "student") if m in results]
    student = results.get("student", {})
    if students and student.get("kl") is not None:
        panels = [(["KL(teacher || model)"], {m: [results[m]["kl"]] for m in students},
                   "divergence from the teacher", "nats per token (lower is better)")]  # fmt: skip
        shares = [k for k in ("top1_agreement", "rouge_l") if student.get(k) is not None]
        panels.append((shares, {m: [results[m].get(k) for k in shares] for m in students},
                       "agreement with the teacher", "share (higher is better)"))  # fmt: skip
        _plot_panels(panels, out / "quality.png")
        lines += ["## Quality kept", "", "![quality](quality.png)", "",
                  "On the held-out prompts, scored against the teacher's answers.", ""]  # fmt: skip
    speed_keys = ["tokens_per_s_batch1", "tokens_per_s_batched"]
    if any(results[m].get(k) for m in present for k in speed_keys):
        series = {m: [results[m].get(k) for k in speed_keys] for m in present}
        _plot_panels([(["batch 1", "batched"], series, "generation speed", "tokens/s")], out / "speed.png")
        lines += ["## Speed", "", "![speed](speed.png)", ""]
    summary = results.get("summary", {})
    if summary:
        lines += ["## Summary", "", "| figure | value |", "|---|---:|"]
        for k, v in summary.items():
            lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
        lines.append("")
    path = out / "report.md"
    write_text(path, "\n".join(lines))
    return path
