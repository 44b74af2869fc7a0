"""How much quality does training compute buy? The default recipe at several time budgets.

    python bench/curve.py --reuse 6m=runs/default --budgets 6m,20m,60m [--large 60m] [--append]

Needs the default run (``make demo``): its teacher answers and its untrained student. Each point
trains the shipped recipe (src/distill/recipes/default.yaml) from that same untrained student on
the same teacher answers, for a training wall-clock of ``--budgets`` each (``train.max_steps`` is
lifted so the budget alone sets the step count, and checkpoints are written every 200 steps
instead of 40), each in its own process, one at a time.
``--reuse 6m=RUN`` scores a run already trained with the recipe at that budget (the `make demo`
run itself) instead of training it again. ``--large 60m`` adds a point trained on the larger
embedded prompt set (src/distill/prompts/large.jsonl; the teacher answers it once, into
``runs/bench-curve-large-source/``).

``--series NAME`` names the points of the recipe as shipped now (``6m-frozen``, ...), kept beside
points recorded with an earlier default; SERIES says which recipe each series was trained with, and
the plot draws one line per series.

Every point is scored on the test splits, which nothing was chosen on:

- in-domain: ``bench/data/quality_test_prompts.jsonl`` (32);
- other domains: ``bench/data/ood_test_prompts.jsonl`` (48 open prompts) and
  ``bench/data/ood_test_labels.jsonl`` (40 labelling items);

KL(teacher || student) and top-1 agreement teacher-forced on the teacher's greedy answers, and the
labelling accuracy kept (student over teacher), each with a 95% bootstrap interval; each point's
``train_seconds`` (loading the models and the final save included) and ``train_elapsed_s``, the
training time its budget counted at the last step. Figures go to
bench/results/curve.json (``ood_test_kl_at_<budget>`` and the points), the plot to
docs/curve.png. The CPU model is recorded: a minute of training buys more on a faster machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from candidates import FIRST_ROWS  # noqa: E402  (bench/, the script's own folder)

RESULTS = ROOT / "bench" / "results" / "curve.json"
PLOT = ROOT / "docs" / "curve.png"
DATA = ROOT / "bench" / "data"
IN_DOMAIN = DATA / "quality_test_prompts.jsonl"
OTHER = DATA / "ood_test_prompts.jsonl"
LABELS = DATA / "ood_test_labels.jsonl"
LARGE_SOURCE = "bench-curve-large-source"
MAX_STEPS = 100_000  # the budget sets the count
CHECKPOINT_EVERY = 200  # the default's 40 would spend a minute of an hour writing checkpoints


# Each series of points is the default of its day: its legend label, the overrides that turn the
# shipped recipe into it (so a series trains, and a reused run is checked, as it was first run), and
# its marker and line in the plot. "" is the first series (6m, 20m, 60m, 60m-large); later ones are
# named by --series. A larger-set point trains on large.jsonl whatever data settings its series has.
SET_638 = f"data.max_prompts={FIRST_ROWS}"  # the embedded set before its widening


class Series(NamedTuple):
    label: str
    overrides: list[str]
    marker: str
    line: str


SERIES = {
    "": Series(
        "embeddings trained, KD + CE", ["train.freeze_embeddings=false", "train.alpha=0.5", SET_638], "o", "-"
    ),
    "frozen": Series("embeddings frozen, KD + CE", ["train.alpha=0.5", SET_638], "D", "--"),
    "kd": Series("embeddings frozen, KD alone, 638 prompts", [SET_638], "^", "-."),
    "wide": Series("embeddings frozen, KD alone, 932 prompts (default now)", [], "v", ":"),
}


def series_label(name: str) -> str:
    """The legend's suffix naming what a series was trained with."""
    return f", {SERIES[name].label}"


def series_overrides(name: str) -> list[str]:
    if name not in SERIES:
        raise SystemExit(
            f"--series {name}: not in SERIES (bench/curve.py); add its label, overrides and style"
        )
    return SERIES[name].overrides


def point_name(budget: str, large: bool, series: str = "") -> str:
    return "-".join(x for x in (budget, "large" if large else "", series) if x)


def not_measured(points: dict) -> list[str]:
    """The points of each series the curve is meant to have (6, 20 and 60 minutes, and 60 minutes
    on the larger prompt set) that are not recorded yet."""
    series = sorted({p.get("series", "") for p in points.values()})
    meant = [(b, False) for b in ("6m", "20m", "60m")] + [("60m", True)]
    return [n for s in series for b, large in meant if (n := point_name(b, large, s)) not in points]


def score_run(run: Path) -> dict:
    """The run's trained student on the three test splits, with intervals."""
    from candidates import student_and_teacher
    from choice import score
    from ood import teacher_answers

    from distill.core.data import prompt_token_ids, read_prompts
    from distill.core.recipe import load_config
    from distill.evaluate.intervals import quality_intervals
    from distill.evaluate.tasks import evaluate_tasks

    cfg = load_config(run / "config.yaml", [f"evaluate.tasks=[{LABELS}]", "evaluate.task_size=null"])
    student, teacher, tok = student_and_teacher(cfg, run)
    models = {"teacher": teacher, "student": student}
    out = {}
    for split, path, cache in (("in_domain", IN_DOMAIN, "runs/bench-curve-test/answers.jsonl"),
                               ("other", OTHER, "runs/bench-ood-test/answers.jsonl")):  # fmt: skip
        prompts = read_prompts(path)
        ids = {p.id: prompt_token_ids(tok, p, system_prompt=cfg.data.system_prompt) for p in prompts}
        answers = teacher_answers(prompts, teacher, tok, ids, ROOT / cache)
        pp = score(cfg, models, tok, path, answers)
        iv = quality_intervals(pp, draws=cfg.evaluate.bootstrap_draws, metrics=("kl", "top1_agreement"))
        out[split] = iv["models"]["student"] | {"prompts": len(prompts)}
    tasks, _ = evaluate_tasks(models, tok, cfg)
    labels = tasks[LABELS.stem]["intervals"]
    out["labels"] = {
        "teacher_accuracy": labels["models"]["teacher"]["reference_accuracy"],
        "student_accuracy": labels["models"]["student"]["reference_accuracy"],
        "accuracy_kept": labels["kept"]["reference_accuracy"],
        "items": tasks[LABELS.stem]["items"],
    }
    return out


def point_overrides(budget: str, large: bool, series: str) -> list[str]:
    """The overrides a point trains with: its series' recipe at ``budget``; a larger-set point takes
    large.jsonl whole, whatever prompts its series names."""
    name = point_name(budget, large, series)
    overrides = [f"name=bench-curve-{name}", f"train.time_budget={budget}", f"train.max_steps={MAX_STEPS}",
                 f"train.checkpoint_every={CHECKPOINT_EVERY}", *series_overrides(series)]  # fmt: skip
    if large:
        overrides = [o for o in overrides if not o.startswith("data.")] + [f"data.path={large_prompts()}"]
    return overrides


def child(budget: str, large: bool, series: str) -> dict:
    from candidates import last_elapsed, train_candidate

    overrides = point_overrides(budget, large, series)
    cfg, summary, train_s = train_candidate(overrides)
    return score_run(cfg.run_dir) | {
        "steps": summary["steps"],
        "train_seconds": train_s,  # loading the models and the final save included
        "train_elapsed_s": last_elapsed(cfg.run_dir / "metrics.jsonl"),  # the budget's own clock
        "overrides": overrides,
    }


def large_prompts() -> Path:
    from importlib import resources

    return Path(str(resources.files("distill") / "prompts" / "large.jsonl"))


def large_source(source: Path) -> Path:
    """The teacher's answers to the larger prompt set (generated once) and the default run's
    untrained student."""
    run = ROOT / "runs" / LARGE_SOURCE
    distill = str(Path(sys.executable).with_name("distill"))
    sets = ["--set", f"name={LARGE_SOURCE}", "--set", f"data.path={large_prompts()}"]
    subprocess.run([distill, "generate", *sets], check=True, cwd=ROOT)
    if not (run / "student_init").is_dir():
        shutil.copytree(source / "student_init", run / "student_init")
    return run


def plot(points: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 7.2), dpi=110)
    series = sorted({p.get("series", "") for p in points.values()})
    for split, label, colour in (("other", "other domains (test)", "tab:red"),
                                 ("in_domain", "in-domain (test)", "tab:blue")):  # fmt: skip
        for i, name in enumerate(series):
            pts = sorted((p for p in points.values() if not p["large"] and p.get("series", "") == name),
                         key=lambda p: p["minutes"])  # fmt: skip
            xs = [p["minutes"] * (1 + 0.035 * i) for p in pts]  # a later series just beside the first
            ys = [p[split]["kl"]["value"] for p in pts]
            err = [
                [y - p[split]["kl"]["low"] for y, p in zip(ys, pts, strict=True)],
                [p[split]["kl"]["high"] - y for y, p in zip(ys, pts, strict=True)],
            ]
            style = SERIES[name]
            ax.errorbar(xs, ys, yerr=err, marker=style.marker, capsize=3, color=colour, ls=style.line,
                        label=label + series_label(name))  # fmt: skip
        for p in (p for p in points.values() if p["large"]):
            k = p[split]["kl"]
            yerr = [[k["value"] - k["low"]], [k["high"] - k["value"]]]
            name = p.get("series", "")
            x = p["minutes"] * (1 + 0.035 * (len(series) + series.index(name)))  # past every series' point
            entry = f"{label}, larger prompt set" + series_label(name)
            ax.errorbar([x], [k["value"]], yerr=yerr, marker=SERIES[name].marker, capsize=3, color=colour,
                        mfc="white", ls="none", label=entry)  # fmt: skip
    ax.axhline(2.0, color="grey", ls=":", lw=1, label="other-domain target (KL 2.0)")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ticks = sorted({p["minutes"] for p in points.values()})
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{m:g}" for m in ticks])
    ax.set_xlabel("training wall-clock, minutes (log scale)")
    ax.set_ylabel("KL(teacher || student), nats/token")
    ax.set_title("Each default recipe: quality against training time (95% intervals)", fontsize=10)
    fig.legend(*ax.get_legend_handles_labels(), fontsize=7, loc="lower center", ncol=1)  # below the axes
    fig.tight_layout(rect=(0, 0.26, 1, 1))
    fig.savefig(PLOT)


def main() -> None:
    from candidates import last_elapsed, run_child, seed_run

    from distill.core.hardware import cpu_model
    from distill.core.units import duration_seconds

    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="6m,20m,60m")
    ap.add_argument("--large", default=None, help="a budget to train on the larger prompt set too")
    ap.add_argument("--reuse", action="append", default=[], help="BUDGET=RUN: score that run for that budget")
    ap.add_argument("--source", default="runs/default", help="the default run: answers and student_init")
    ap.add_argument("--child", metavar="BUDGET")
    ap.add_argument("--child-large", action="store_true")
    ap.add_argument("--series", default="", help="a name for the points of the recipe as shipped now, "
                    "beside points recorded with an earlier default (see SERIES)")  # fmt: skip
    ap.add_argument("--append", action="store_true", help="keep the points already recorded")
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.child_large, args.series)))
        return
    source = Path(args.source)
    reuse = dict(r.split("=", 1) for r in args.reuse)
    before = json.loads(RESULTS.read_text()) if args.append and RESULTS.is_file() else {}
    points, commands = before.get("points", {}), before.get("commands", [])
    commands.append("python bench/curve.py " + " ".join(sys.argv[1:]))
    todo = [(b, False) for b in args.budgets.split(",") if b] + ([(args.large, True)] if args.large else [])
    for budget, large in todo:
        name = point_name(budget, large, args.series)
        t0 = time.perf_counter()
        if budget in reuse and not large:
            run = Path(reuse[budget])
            from distill.core.recipe import load_config

            cfg = load_config(run / "config.yaml")
            default = load_config(None, series_overrides(args.series))
            same = {"max_steps", "dtype"}  # the run folder records the dtype that auto chose
            if cfg.train.model_dump(exclude=same) != default.train.model_dump(exclude=same):
                raise SystemExit(f"{run} was not trained with the series' train settings")
            if (cfg.data.path, cfg.data.max_prompts) != (default.data.path, default.data.max_prompts):
                raise SystemExit(f"{run} was not trained on the series' prompts (data.path, max_prompts)")
            if duration_seconds(cfg.train.time_budget) != duration_seconds(budget):
                raise SystemExit(f"{run} was trained for {cfg.train.time_budget}, not {budget}")
            summary = json.loads((run / "train_summary.json").read_text())
            res = score_run(run) | {"steps": summary["steps"], "train_seconds": summary["seconds"],
                                    "train_elapsed_s": last_elapsed(run / "metrics.jsonl"),
                                    "reused": str(run)}  # fmt: skip
        else:
            src = large_source(source) if large else source
            run = ROOT / "runs" / f"bench-curve-{name}"
            seed_run(run, src, ("answers.jsonl",) if large else ("answers.jsonl", "split.json"))
            more = (["--child-large"] if large else []) + (["--series", args.series] if args.series else [])
            res = run_child(__file__, ["--child", budget, *more], name)
        points[name] = res | {"budget": budget, "minutes": duration_seconds(budget) / 60, "large": large,
                              "series": args.series,
                              "wall_seconds": time.perf_counter() - t0,
                              "source": str(run if budget in reuse and not large else src)}  # fmt: skip
        out = {f"ood_test_kl_at_{n.replace('-', '_')}": p["other"]["kl"]["value"] for n, p in points.items()}
        out |= {
            f"ood_test_kl_at_{n.replace('-', '_')}_interval": [
                p["other"]["kl"]["low"],
                p["other"]["kl"]["high"],
            ]
            for n, p in points.items()
        }
        splits = {"in_domain": IN_DOMAIN, "other": OTHER, "labels": LABELS}
        out |= {"points": points, "source": before.get("source", str(source)), "cpu": cpu_model(),
                "commands": commands,
                "splits": {k: str(v.relative_to(ROOT)) for k, v in splits.items()},
                "not_measured": not_measured(points), "date": dt.date.today().isoformat()}  # fmt: skip
        RESULTS.write_text(json.dumps(out, indent=1) + "\n")
        plot(points)
        p = points[name]
        print(f"{name}: {p['steps']} steps, other-domain KL {p['other']['kl']['value']:.3f}, in-domain KL "
              f"{p['in_domain']['kl']['value']:.3f}, labels kept {p['labels']['accuracy_kept']['value']:.2f}",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
