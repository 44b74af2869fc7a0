"""Which recipe carries the teacher's quality to other domains? Chosen on validation splits only.

    python bench/choice.py [--candidates narrow,broad,...] [--budget 6m]

Every candidate starts from the same untrained student and learns from the same teacher answers
(greedy, 64 tokens) for the same wall-clock as the shipped recipe: one source run
(``runs/bench-choice-source``: the default recipe's generate and shrink stages on the embedded
prompt set) answers every prompt once, and each candidate copies its answers and ``student_init/``.
The candidates differ in what they train on and how:

- ``narrow``: the embedded set before its broad rows (its first 268 rows, ``data.max_prompts=268``:
  conversation openers, arithmetic, Python reference passages), the recipe as shipped before;
- ``broad``: the whole embedded set (those rows and the instruction formats, more mathematics,
  standard-library documentation: src/distill/prompts/SOURCES.md);
- ``broad_packing``: the same, samples packed into rows of ``train.max_seq_len`` (no padding);
- ``broad_heal``: the same, the first minute of the budget spent healing the pruned student on
  general English text (``heal.data=default``), the rest on the teacher's answers.

A second round starts from the chosen ``broad_packing`` (the default recipe since), runs it again
beside the new candidates (the time plan had changed: the first round's broad runs overran their
budget), and tries the other levers on it:

- ``samples``: one more teacher answer per training prompt, sampled from the teacher's whole
  distribution at temperature 1 (``generate.extra_samples=1``), beside the greedy one; the source
  run generates them once and the time it took is recorded (``extra_samples_generate_seconds``);
- ``lr_2x``: twice the learning rate (2.4e-3);
- ``wsd``: the learning rate held after warm-up and decayed over the last 20% of the steps
  (``train.lr_schedule=wsd``) instead of the cosine decay over all of them.

A third round runs the default once more beside ``onpolicy``: the student's own answers in place
of the teacher's for a share λ of the rows, λ rising linearly from 0 to 0.5 over the run (a warm
start on the teacher's answers, then on-policy rows graded by the teacher: GKD), on the broad set.
``--keep-as broad_packing=broad_packing_second`` keeps the earlier round's default run under
another name, so every run stays reported.

A fourth round (``--keep-as broad_packing=broad_packing_third``) runs the default again beside two
levers aimed at what the other domains need, words the training prompts rarely use:

- ``frozen_embeddings``: the token embeddings and the tied LM head keep the teacher's values
  (``train.freeze_embeddings=true``), so a small prompt set cannot move the vectors of the rest of
  the vocabulary, and each step is cheaper (no weight gradient for the head);
- ``lr_half``: half the learning rate (6e-4), since twice it (``lr_2x``) was worse on the other
  domains.

A fifth round follows from the fourth, on the same machine the same day (its default run is the
one beside it): frozen embeddings halved the step time, so ``frozen_embeddings`` reached the
recipe's ``max_steps`` (120) well inside its budget. ``frozen_uncapped`` lifts that bound
(``train.max_steps=400``) so the budget alone sets the step count.

A sixth round (``--keep-as frozen_uncapped=frozen_uncapped_fifth``) runs the default again beside
rejection sampling for the answers the other domains' labelling needs, the format the teacher's
greedy answers to the embedded set's labelling asks rarely keep (a sentence naming every label, or
none):

- ``labels_resampled``: a training prompt that names its labels (``choices``: the embedded set's
  classify asks and yes-or-no asks) keeps a teacher answer only if it names exactly one of them
  (``filter.verify_choices=true``); where the greedy answer does not, the teacher samples up to four
  more, one at a time, and the student trains on the first that does (``generate.resample=4``);
- ``verified_resampled``: the same, and a question with a reference answer (the mathematics rows)
  keeps an answer only if its last number is that answer (``filter.verify=number``), resampled so too.

The source run draws those samples once and the time it took is recorded
(``resample_generate_seconds``).

A seventh round (``--keep-as frozen_uncapped=frozen_uncapped_sixth``) runs the default again beside
a wider prompt set at the same budget: the larger budgets gain most from more prompts
(bench/curve.py), and the default's six minutes already show the student every training prompt
about twice.

- ``wider``: the embedded set and every third further row of ``large.jsonl`` (its rows after the
  embedded set's, which come kind by kind, so each kind keeps its share): 1,226 prompts in place of
  638. The teacher answers the added ones in ``runs/bench-choice-wider-source/`` (the embedded set's
  answers copied from the source run) and the time it took is recorded (``wider_generate_seconds``):
  about the time a ``make demo`` on that set would add.

An eighth round (``--keep-as frozen_uncapped=frozen_uncapped_seventh``) runs the default again beside
two levers that cost no teacher time:

- ``kd_only``: the divergence from the teacher's whole distribution alone (``train.alpha=1.0``), without
  the cross-entropy on the teacher's greedy tokens, which pulls the student towards the teacher's first
  choice where the teacher itself hesitates (and KL is scored on the whole distribution);
- ``lr_half_frozen``: half the learning rate (6e-4) on the recipe with frozen embeddings; ``lr_half``
  gained on the other domains before the embeddings were frozen.

A ninth round (``--keep-as kd_only=kd_only_eighth``) runs the default (KD alone) again beside the
wider prompt sets with KD alone: ``wider`` had the lowest other-domain KL of the seventh round, but its
teacher answers took ``make demo`` over 20 minutes.

- ``kd_wider``: the seventh round's ``wider`` set (1,226 prompts) with KD alone;
- ``kd_half_wider``: the embedded set and every sixth further row of ``large.jsonl`` (932 prompts):
  half the rows ``wider`` adds, each of them one of its rows, so its answers are already in
  ``runs/bench-choice-wider-source/`` and about half the teacher time is added to ``make demo``.

The overrides are on the shipped recipe of each round. Until the eighth round that recipe had
``train.alpha: 0.5`` (half KD, half cross-entropy); ``frozen_uncapped`` (the default of the fifth to
the eighth round), ``wider`` and ``lr_half_frozen`` pin it, and any other earlier candidate run
again now trains with KD alone unless ``train.alpha=0.5`` is added. Since the ninth round the
embedded set holds 932 prompts; a candidate that names no prompts of its own trains on its first 638
rows (``data.max_prompts=638``), the set of every round before, so each round reruns on its own set.

Each is scored on three validation splits, which choose and nothing else (the test splits of
bench/ood.py and bench/quality.py report):

- in-domain: ``bench/data/quality_validation_prompts.jsonl`` (32 prompts of the sources of the
  embedded set's first rows, kept out of the embedded set; teacher answers cached under
  ``runs/bench-choice-validation/``);
- other domains, open prompts: ``bench/data/ood_prompts.jsonl`` (40; teacher answers cached under
  ``runs/bench-ood/``);
- other domains, labelling: ``bench/data/ood_labels.jsonl`` (40 items with reference labels).

KL(teacher || student) and top-1 agreement teacher-forced on the teacher's answers, ROUGE-L of the
student's greedy answer against the teacher's, labelling accuracy and its kept share (student over
teacher), each with a 95% bootstrap interval over prompts or items. The rule, fixed before the
runs: the candidate with the lowest other-domain validation KL is chosen. Every candidate is
reported. Figures go to bench/results/choice.json.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from candidates import FIRST_ROWS  # noqa: E402  (bench/, the script's own folder)

RESULTS = ROOT / "bench" / "results" / "choice.json"
DATA = ROOT / "bench" / "data"
IN_DOMAIN = DATA / "quality_validation_prompts.jsonl"
OTHER = DATA / "ood_prompts.jsonl"
LABELS = DATA / "ood_labels.jsonl"
SOURCE = "bench-choice-source"
WIDER = ROOT / "runs" / "bench-choice-wider-source"
WIDER_EVERY = 3  # of large.jsonl's rows after those, every third
WIDER_DATA = f"data.path={WIDER / 'prompts.jsonl'}"
HALF_EVERY = 6  # every sixth: half of those rows, each one of them
HALF_DATA = f"data.path={WIDER / 'prompts_half.jsonl'}"
RULE = "lowest other-domain validation KL (bench/data/ood_prompts.jsonl)"
HEAL_MINUTES = 1.0
# Overrides on the shipped recipe; {rest} is the budget less the healing minute.
CANDIDATES: dict[str, list[str]] = {
    "narrow": ["data.max_prompts=268"],
    "broad": [],
    "broad_packing": ["train.packing=true"],
    "broad_heal": ["heal.data=default", f"heal.time_budget={HEAL_MINUTES:g}m", "train.time_budget={rest}"],
    "samples": ["generate.extra_samples=1"],
    "lr_2x": ["train.lr=2.4e-3"],
    "wsd": ["train.lr_schedule=wsd"],
    "onpolicy": ["train.onpolicy_fraction=0.5", "train.onpolicy_schedule=linear"],
    "frozen_embeddings": ["train.freeze_embeddings=true"],
    "lr_half": ["train.lr=6e-4"],
    "frozen_uncapped": ["train.freeze_embeddings=true", "train.max_steps=400", "train.alpha=0.5"],
    "labels_resampled": ["filter.verify_choices=true", "generate.resample=4"],
    "verified_resampled": ["filter.verify_choices=true", "filter.verify=number", "generate.resample=4"],
    "wider": [WIDER_DATA, "train.alpha=0.5"],
    "kd_only": ["train.alpha=1.0"],
    "lr_half_frozen": ["train.lr=6e-4", "train.alpha=0.5"],
    "kd_wider": [WIDER_DATA],
    "kd_half_wider": [HALF_DATA],
}
EXTRA_SAMPLES = 1  # the most any candidate asks for: the source run generates that many
METRICS = ("kl", "top1_agreement", "rouge_l")


def minutes(budget: str) -> float:
    from distill.core.units import duration_seconds

    return duration_seconds(budget) / 60


def overrides(name: str, budget: str) -> list[str]:
    rest = f"{minutes(budget) - HEAL_MINUTES:g}m"
    out = [f"name=bench-choice-{name}", f"train.time_budget={budget}"]
    if not any(o.startswith("data.") for o in CANDIDATES[name]):  # the set every round before the ninth
        out.append(f"data.max_prompts={FIRST_ROWS}")  # trained on: the embedded set's first 638 rows
    return out + [o.format(rest=rest) for o in CANDIDATES[name]]


def score(cfg, models: dict, tok, prompts_file: Path, answers: dict) -> dict[str, list[dict]]:
    """Per-prompt figures of every model but the teacher on ``prompts_file``, teacher-forced on
    ``answers`` (the teacher's), the teacher's own row included as the reference."""
    from distill.core.data import prompt_token_ids, read_prompts
    from distill.evaluate.metrics import evaluate_model

    prompts = read_prompts(prompts_file)
    ids = {p.id: prompt_token_ids(tok, p, max_tokens=cfg.data.max_prompt_tokens) for p in prompts}
    out = {}
    for name, model in models.items():
        res, _ = evaluate_model(name, model, models["teacher"], tok, prompts, ids, answers, cfg.evaluate,
                                weights_dir=None, max_seq_len=cfg.train.max_seq_len,
                                reference_answers=name == "teacher")  # fmt: skip
        out[name] = res["per_prompt"]
    return out


def child(name: str, budget: str) -> dict:
    from candidates import student_and_teacher, train_candidate
    from ood import teacher_answers

    from distill.core.data import prompt_token_ids, read_prompts
    from distill.core.recipe import load_config
    from distill.evaluate.intervals import quality_intervals
    from distill.evaluate.tasks import evaluate_tasks

    cfg, summary, train_s = train_candidate(overrides(name, budget))
    run = cfg.run_dir
    student, teacher, tok = student_and_teacher(cfg, run)
    models = {"teacher": teacher, "student": student}
    other = read_prompts(OTHER)
    other_ids = {p.id: prompt_token_ids(tok, p) for p in other}
    other_answers = teacher_answers(other, teacher, tok, other_ids, ROOT / "runs/bench-ood/answers.jsonl")
    val = read_prompts(IN_DOMAIN)
    val_ids = {p.id: prompt_token_ids(tok, p) for p in val}
    val_cache = ROOT / "runs/bench-choice-validation/answers.jsonl"
    val_answers = teacher_answers(val, teacher, tok, val_ids, val_cache)
    splits = {
        "in_domain": score(cfg, models, tok, IN_DOMAIN, val_answers),
        "other": score(cfg, models, tok, OTHER, other_answers),
    }
    draws = cfg.evaluate.bootstrap_draws
    out: dict = {
        split: quality_intervals(pp, draws=draws, metrics=METRICS) | {"per_prompt": pp["student"]}
        for split, pp in splits.items()
    }
    task_cfg = load_config(run / "config.yaml", [f"evaluate.tasks=[{LABELS}]", "evaluate.task_size=null"])
    tasks, answers = evaluate_tasks(models, tok, task_cfg)
    out["labels"] = tasks[LABELS.stem] | {"answers": answers}
    out.update(steps=summary["steps"], train_seconds=train_s, time_plan=summary.get("time_plan"),
               training_prompts=len(json.loads((run / "split.json").read_text())["train"]),
               overrides=overrides(name, budget),
               filter_report=json.loads((run / "filter_report.json").read_text()))  # fmt: skip
    return out


def figures(res: dict) -> dict:
    """The candidate's validation figures with intervals: {split_metric: {value, low, high}}."""
    out = {}
    for split in ("in_domain", "other"):
        for m in METRICS:
            out[f"{split}_{m}"] = res[split]["models"]["student"][m]
    labels = res["labels"]["intervals"]
    out["labels_student_accuracy"] = labels["models"]["student"]["reference_accuracy"]
    out["labels_teacher_accuracy"] = labels["models"]["teacher"]["reference_accuracy"]
    out["labels_accuracy_kept"] = labels["kept"]["reference_accuracy"]
    return out


def generate_more(sets: list[str], run: Path = ROOT / "runs" / SOURCE) -> float | None:
    """``distill generate`` in ``run`` (the source run unless named) with the overrides ``sets`` (it
    resumes: only what is missing is drawn); the seconds it took, the teacher's loading included, or
    None when it drew nothing (the time on record stands)."""
    distill = str(Path(sys.executable).with_name("distill"))
    lines = (run / "answers.jsonl").read_text().count("\n")
    t0 = time.perf_counter()
    more = [x for o in sets for x in ("--set", o)]
    subprocess.run([distill, "generate", "--set", f"name={run.name}", *more], check=True, cwd=ROOT)
    seconds = time.perf_counter() - t0
    return seconds if (run / "answers.jsonl").read_text().count("\n") > lines else None


def source_run(samples: bool) -> tuple[Path, float | None]:
    """The default recipe's generate and shrink stages, run once: the candidates' shared start.
    With ``samples``, the extra teacher samples too (a candidate asking for none trains on the
    first answers only); returns the run and the seconds those samples took, when made now."""
    run = ROOT / "runs" / SOURCE
    distill = str(Path(sys.executable).with_name("distill"))
    if not (run / "student_init" / "model.safetensors").is_file():
        for stage in ("generate", "shrink"):
            subprocess.run([distill, stage, "--set", f"name={SOURCE}"], check=True, cwd=ROOT)
    return run, generate_more([f"generate.extra_samples={EXTRA_SAMPLES}"]) if samples else None


def resample_source(names: list[str]) -> dict[str, float]:
    """Rejection sampling in the source run for the candidates of ``names`` that ask for it, each with
    its own filter; the seconds each took (the teacher's loading included), when it drew anything."""
    seconds = {}
    for name in names:
        sets = [o for o in CANDIDATES[name] if o.startswith(("generate.", "filter."))]
        if any(o.startswith("generate.resample=") for o in sets) and (s := generate_more(sets)) is not None:
            seconds[name] = s
    return seconds


def wider_source(source: Path) -> float | None:
    """The ``wider`` candidate's prompts (the embedded set, then every WIDER_EVERY-th further row of
    large.jsonl) answered in WIDER: the embedded set's answers and the untrained student copied from
    ``source``, the rest drawn by the teacher; the seconds that took, or None when nothing was drawn."""
    from importlib import resources

    prompts = resources.files("distill") / "prompts"
    large = (prompts / "large.jsonl").read_text().splitlines(keepends=True)
    embedded = large[:FIRST_ROWS]  # the embedded set of the first eight rounds
    if (prompts / "default.jsonl").read_text().splitlines(keepends=True)[:FIRST_ROWS] != embedded:
        raise SystemExit(f"large.jsonl does not start with default.jsonl's first {FIRST_ROWS} rows")
    WIDER.mkdir(parents=True, exist_ok=True)
    (WIDER / "prompts.jsonl").write_text("".join(embedded + large[len(embedded) :: WIDER_EVERY]))
    (WIDER / "prompts_half.jsonl").write_text("".join(embedded + large[len(embedded) :: HALF_EVERY]))

    def stale(path: Path) -> bool:  # missing, or older than the source run's (made again since)
        return not path.exists() or path.stat().st_mtime < (source / path.name).stat().st_mtime

    if stale(WIDER / "answers.jsonl"):
        (WIDER / "answers.jsonl").write_text((source / "answers.jsonl").read_text())
    if stale(WIDER / "student_init"):  # the same untrained student as every candidate's
        shutil.rmtree(WIDER / "student_init", ignore_errors=True)
        shutil.copytree(source / "student_init", WIDER / "student_init")
    return generate_more([WIDER_DATA], WIDER)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--budget", default="6m", help="training wall-clock per candidate (the default recipe's)")
    ap.add_argument("--child", metavar="NAME")
    ap.add_argument("--append", action="store_true", help="keep the candidates already recorded")
    ap.add_argument("--keep-as", action="append", default=[], metavar="OLD=NEW",
                    help="with --append: rename a recorded candidate before it runs again")  # fmt: skip
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.budget)))
        return
    from candidates import run_child, seed_run

    from distill.core.hardware import cpu_model

    raw, commands, extra_s, adoption, resample_s, wider_s = {}, [], None, {}, {}, None
    if args.append and RESULTS.is_file():
        before = json.loads(RESULTS.read_text())
        raw, commands = before["raw"], before["commands"]
        for old, new in (k.split("=", 1) for k in args.keep_as):
            if old not in raw or new in raw:
                raise SystemExit(f"--keep-as {old}={new}: {old} is not recorded or {new} already is")
            raw[new] = raw.pop(old)
        extra_s = before.get("extra_samples_generate_seconds")
        resample_s = before.get("resample_generate_seconds", {})
        wider_s = before.get("wider_generate_seconds")
        # what was made the default, when a limit outside the rule ruled the chosen one out
        keys = ("adopted", "adoption", "demo_wall_min_with_samples")
        adoption = {k: before[k] for k in keys if k in before}
    commands.append("python bench/choice.py " + " ".join(sys.argv[1:]))
    names = args.candidates.split(",")
    source, seconds = source_run(any("extra_samples" in o for n in names for o in CANDIDATES[n]))
    extra_s = seconds if seconds is not None else extra_s
    resample_s |= resample_source(names)
    wide = {n for n in names if any(o.startswith(f"data.path={WIDER}") for o in CANDIDATES[n])}
    if wide:
        wider_s = wider_source(source) or wider_s
    for name in names:
        run = ROOT / "runs" / f"bench-choice-{name}"
        seed_run(run, WIDER if name in wide else source)
        t0 = time.perf_counter()
        res = run_child(__file__, ["--child", name, "--budget", args.budget], name)
        raw[name] = res | {"wall_seconds": time.perf_counter() - t0, "date": dt.date.today().isoformat()}
        trained = set(json.loads((run / "split.json").read_text())["train"])
        val_ids = {json.loads(ln)["id"] for ln in IN_DOMAIN.read_text().splitlines() if ln}
        if trained & val_ids:
            raise SystemExit(f"{run} trained on prompts of {IN_DOMAIN}")
        table = {n: figures(r) | {"steps": r["steps"], "training_prompts": r["training_prompts"]}
                 for n, r in raw.items()}  # fmt: skip
        chosen = min(table, key=lambda n: table[n]["other_kl"]["value"])
        out = {
            "selection": "validation",
            "rule": RULE,
            "chosen": chosen,
            **adoption,
            "candidates": {n: CANDIDATES.get(n, r["overrides"]) for n, r in raw.items()},
            "budget": args.budget,
            "table": table,
            "raw": raw,
            "splits": {
                k: str(p.relative_to(ROOT))
                for k, p in (("in_domain", IN_DOMAIN), ("other", OTHER), ("labels", LABELS))
            },  # fmt: skip
            "extra_samples_generate_seconds": extra_s,
            "resample_generate_seconds": resample_s,
            "wider_generate_seconds": wider_s,
            "cpu": cpu_model(),
            "commands": commands,
            "date": dt.date.today().isoformat(),
        }
        RESULTS.write_text(json.dumps(out, indent=1) + "\n")
        f = table[name]
        print(f"{name}: {f['steps']} steps, other KL {f['other_kl']['value']:.3f}, in-domain KL "
              f"{f['in_domain_kl']['value']:.3f}, labels kept {f['labels_accuracy_kept']['value']:.2f}",
              flush=True)  # fmt: skip
    print(f"chosen on validation: {chosen} ({RULE})")


if __name__ == "__main__":
    main()
