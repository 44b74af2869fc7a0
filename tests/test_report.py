"""The report: intervals over prompts against hand computations, the page of a tiny run (and that it
renders in headless Chromium with no console errors), `distill report` and `distill compare`."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from distill import pipeline
from distill.cli import app
from distill.core.recipe import load_config
from distill.evaluate import intervals as stats
from distill.evaluate.report import cost_per_million, fmt, samples

from conftest import tiny_recipe


def _quantile(sorted_vals: list[float], q: float) -> float:
    """numpy's default ('linear') quantile, by hand: position q * (n - 1) between two order stats."""
    pos = q * (len(sorted_vals) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def test_bootstrap_interval_is_the_percentiles_of_the_resampled_statistic():
    kl = [0.5, 1.25, 2.0, 0.75, 3.0]
    tokens = [4, 5, 2, 8, 1]
    cols = {"m:kl": np.array(kl), "m:tokens": np.array(tokens)}
    got = stats.bootstrap(stats.ratio_of_sums("m:kl", "m:tokens"), cols, draws=500, seed=7)
    assert got.value == pytest.approx(sum(kl) / sum(tokens)) and got.n == 5
    # by hand, on the same draws: each resample's ratio of sums, then the 2.5% and 97.5% points
    idx = stats.resample_indices(5, 500, 7)
    ratios = sorted(sum(kl[i] for i in row) / sum(tokens[i] for i in row) for row in idx.tolist())
    assert got.low == pytest.approx(_quantile(ratios, 0.025), rel=1e-12)
    assert got.high == pytest.approx(_quantile(ratios, 0.975), rel=1e-12)
    assert got.low < got.value < got.high
    # the same seed gives the same interval; another seed another one
    again = stats.bootstrap(stats.ratio_of_sums("m:kl", "m:tokens"), cols, draws=500, seed=7)
    other = stats.bootstrap(stats.ratio_of_sums("m:kl", "m:tokens"), cols, draws=500, seed=8)
    assert (again.low, again.high) == (got.low, got.high) != (other.low, other.high)


def test_bootstrap_interval_of_a_mean_matches_the_normal_approximation():
    # 100 prompts, 30 right: the interval of the accuracy is about 0.3 +- 1.96 * sqrt(0.3 * 0.7 / 100)
    cols = {"m:correct": np.array([1.0] * 30 + [0.0] * 70)}
    got = stats.bootstrap(stats.mean("m:correct"), cols, draws=20000, seed=0)
    half = 1.96 * math.sqrt(0.3 * 0.7 / 100)
    assert got.value == 0.3
    assert got.low == pytest.approx(0.3 - half, abs=0.012) and got.high == pytest.approx(
        0.3 + half, abs=0.012
    )
    # no spread, no interval width; one prompt, no interval at all
    flat = stats.bootstrap(stats.mean("m:x"), {"m:x": np.full(10, 0.25)}, draws=200)
    assert (flat.low, flat.value, flat.high) == (0.25, 0.25, 0.25)
    one = stats.bootstrap(stats.mean("m:x"), {"m:x": np.array([1.0])})
    assert one.low == -math.inf and one.high == math.inf


def _rows(model_vals: dict) -> list[dict]:
    return [
        {"id": f"p{i}", "kl": kl, "agree": agree, "ce": ce, "tokens": tok, "exact_match": em, "rouge_l": rl,
         "correct": c, "judge_logprob": jl, "judge_tokens": jt, "answer_tokens": jt}
        for i, (kl, agree, ce, tok, em, rl, c, jl, jt) in enumerate(model_vals)
    ]  # fmt: skip


def test_quality_intervals_kept_and_the_warning_when_the_interval_is_wider_than_the_difference():
    # four prompts; per prompt: kl sum, agreements, ce sum, tokens, exact, rouge, correct, judge sum, judged
    teacher = _rows([(0, 4, 2.0, 4, 1, 1, 1, -2.0, 4), (0, 2, 1.0, 2, 1, 1, 1, -1.0, 2),
                     (0, 3, 3.0, 3, 1, 1, 0, -3.0, 3), (0, 1, 0.5, 1, 1, 1, None, -0.5, 1)])  # fmt: skip
    student = _rows([(2.0, 3, 4.0, 4, 0, 0.5, 1, -4.0, 4), (1.0, 1, 2.0, 2, 1, 1.0, 0, -2.0, 2),
                     (3.0, 1, 6.0, 3, 0, 0.2, 0, -9.0, 3),
                     (0.5, 1, 1.0, 1, 0, 0.3, None, -1.0, 1)])  # fmt: skip
    untrained = _rows([(2.1, 3, 4.0, 4, 0, 0.4, 1, -4.0, 4), (0.9, 1, 2.0, 2, 1, 1.0, 0, -2.0, 2),
                       (3.2, 1, 6.0, 3, 0, 0.3, 0, -9.0, 3),
                       (0.4, 1, 1.0, 1, 0, 0.2, None, -1.0, 1)])  # fmt: skip
    out = stats.quality_intervals({"teacher": teacher, "untrained_student": untrained, "student": student},
                                  draws=400)  # fmt: skip
    s = out["models"]["student"]
    assert out["prompts"] == 4
    assert s["kl"]["value"] == pytest.approx(6.5 / 10)  # ratio of sums: 6.5 nats over 10 tokens
    assert s["top1_agreement"]["value"] == pytest.approx(6 / 10)
    assert s["perplexity"]["value"] == pytest.approx(math.exp(13 / 10))
    assert s["teacher_logprob"]["value"] == pytest.approx(-16 / 10)
    assert s["exact_match"]["value"] == pytest.approx(0.25)
    assert s["rouge_l"]["value"] == pytest.approx(2.0 / 4)
    assert s["reference_accuracy"]["value"] == pytest.approx(1 / 3)  # the prompt without a reference left out
    kept = out["kept"]
    assert kept["top1_agreement"]["value"] == pytest.approx(0.6)
    assert kept["kl"]["value"] == pytest.approx(math.exp(-0.65))
    assert kept["perplexity"]["value"] == pytest.approx(math.exp(6.5 / 10) / math.exp(13 / 10))
    assert kept["teacher_logprob"]["value"] == pytest.approx(math.exp(-1.6 - (-0.65)))
    assert kept["reference_accuracy"]["value"] == pytest.approx((1 / 3) / (2 / 3))
    for ci in [*s.values(), *kept.values()]:
        assert ci["low"] <= ci["value"] <= ci["high"]
    # the student and the untrained student differ by less than the noise of 4 prompts: said so
    assert out["vs_untrained"]["kl"]["value"] == pytest.approx(6.5 / 10 - 6.6 / 10)
    assert any(w.startswith("kl:") and "wider than the difference" in w for w in out["warnings"])
    # a student clearly better on every prompt: its KL difference has an interval without 0, no warning
    better = [dict(r, kl=r["kl"] / 4) for r in student]
    clear = stats.quality_intervals({"teacher": teacher, "untrained_student": untrained, "student": better},
                                    draws=400)  # fmt: skip
    assert clear["vs_untrained"]["kl"]["high"] < 0
    assert not any(w.startswith("kl:") for w in clear["warnings"])


def test_cost_per_million_tokens_and_sample_picks():
    assert cost_per_million(100.0, 0.72) == pytest.approx(0.72 / 3600 / 100 * 1e6)  # $2 per million
    assert cost_per_million(None, 1.0) is None and cost_per_million(10.0, None) is None
    per_prompt = {"student": [{"id": f"p{i}", "rouge_l": r} for i, r in enumerate([0.5, 0.9, 0.1, 0.3, 0.7])]}
    answers = [
        {"id": f"p{i}", "model": m, "text": f"{m} {i}"} for i in range(5) for m in ("teacher", "student")
    ]
    prompts = {"p1": {"messages": [{"role": "user", "content": "the best one"}]}}
    picked = samples(answers, per_prompt, prompts, k_random=2, seed=0)
    assert [(k, i) for k, i, *_ in picked[:2]] == [("best", "p1"), ("worst", "p2")]
    assert picked[0][2] == "the best one" and picked[0][3] == {"teacher": "teacher 1", "student": "student 1"}
    assert {i for _, i, *_ in picked[2:]} <= {"p0", "p3", "p4"} and len(picked) == 4


def _evaluated_run(tmp_path, teacher, prompts, name: str, layers: int, **sections):
    recipe = tiny_recipe(tmp_path / "runs", teacher, prompts, student={"num_layers": layers},
                         data={"heldout_size": 6}, **sections)  # fmt: skip
    recipe["name"] = name
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cfg = load_config(path)
    for stage in ("generate", "shrink", "train_student", "evaluate"):
        getattr(pipeline, stage)(cfg)
    return cfg.run_dir


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _render(page, tmp_path, *extra: str) -> tuple[str, list[str]]:
    """The DOM headless Chromium made of ``page`` and the console messages it logged."""
    args = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-extensions", "--no-first-run", "--host-resolver-rules=MAP * ~NOTFOUND",
            f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr", "--v=0", *extra,
            page.as_uri()]  # fmt: skip
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout, [line for line in out.stderr.splitlines() if ":CONSOLE" in line]


def test_the_report_of_a_tiny_run(tmp_path, tiny_teacher_dir, prompts_file):
    run = _evaluated_run(tmp_path, tiny_teacher_dir, prompts_file, "tiny", 2)
    results = json.loads((run / "eval.json").read_text())
    page = run / "report" / "report.html"
    text = page.read_text()
    # self-contained: no address outside the page, the plots inside it
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", text)
    assert text.count("data:image/png;base64,") == 3 and "<script" not in text
    iv = results["intervals"]
    assert iv["prompts"] == 6 and set(iv["models"]) == {"teacher", "untrained_student", "student"}
    top1 = iv["models"]["student"]["top1_agreement"]
    assert top1["value"] == pytest.approx(results["student"]["top1_agreement"])  # the same figure, two ways
    assert iv["models"]["student"]["kl"]["value"] == pytest.approx(results["student"]["kl"])
    assert results["student"]["peak_rss_mib"] >= results["student"]["runtime_rss_mib"] > 100  # MiB: torch
    assert results["environment"]["torch"] and results["student"]["seconds_per_answer"] > 0
    kept = iv["kept"]["top1_agreement"]
    shown = f"{100 * kept['value']:.1f}% [{100 * kept['low']:.1f}, {100 * kept['high']:.1f}]"
    assert shown in text and "Sample answers" in text and "Provenance" in text
    assert "USD per million" not in text  # no price given
    md = (run / "report" / "report.md").read_text()
    assert shown in md and "![training](training.png)" in md
    # answers holding U+2028, which json.dumps(ensure_ascii=False) writes raw, are read back whole
    answers = run / "eval_answers.jsonl"
    recs = [json.loads(x) for x in answers.read_text().split("\n") if x.strip()]
    recs = [r | {"text": "line\u2028separated " + r["text"]} for r in recs]
    answers.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    # again from the folder, with a price: the cost rows appear, computed from the measured rate
    out = CliRunner().invoke(app, ["report", str(run), "--price-per-hour", "0.9"])
    assert out.exit_code == 0, out.output
    again = page.read_text()
    assert "line\u2028separated" in again
    want = cost_per_million(results["student"]["tokens_per_s_batched"], 0.9)
    # (as the report writes a number: a busy machine's slow tiny model costs over 1,000 USD, "1,234")
    assert "USD per million tokens, batched (at $0.9/h)" in again and fmt(want) in again
    if _chromium() is None:
        pytest.skip("Debian's chromium is not installed (make test installs it)")
    dom, console = _render(page, tmp_path, "--dump-dom")
    assert console == [], console
    for figure in (shown, "Quality kept", "speed-up, batch 1", "Sample answers"):
        assert figure in dom.replace("&amp;", "&"), figure
    # the check sees console errors where there are some
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<html><body><img src='missing.png'><script>console.error('broken')</script></body></html>"
    )
    assert any("broken" in line for line in _render(bad, tmp_path, "--dump-dom")[1])


def test_compare_two_tiny_runs(tmp_path, tiny_teacher_dir, prompts_file):
    a = _evaluated_run(tmp_path, tiny_teacher_dir, prompts_file, "two", 2)
    b = _evaluated_run(tmp_path, tiny_teacher_dir, prompts_file, "three", 3)
    out = CliRunner().invoke(app, ["compare", str(a), str(b), "--out", str(tmp_path / "cmp")])
    assert out.exit_code == 0, out.output
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    rows = {r["run"]: r for r in data["rows"]}
    for name, run in (("two", a), ("three", b)):
        res = json.loads((run / "eval.json").read_text())
        assert rows[name]["top1_agreement"] == res["intervals"]["models"]["student"]["top1_agreement"]
        assert rows[name]["speedup_batch1"] == res["summary"]["speedup_batch1"]
        assert rows[name]["params_m"] == pytest.approx(res["student"]["params"] / 1e6)
    assert rows["two"]["params_m"] < rows["three"]["params_m"]
    # the Pareto front by hand: a run is on it unless the other is at least as fast and as good
    x = {n: r["speedup_batch1"] for n, r in rows.items()}
    y = {n: r["top1_agreement"]["value"] for n, r in rows.items()}
    front = [n for n in rows if not any(x[m] >= x[n] and y[m] >= y[n] and (x[m], y[m]) != (x[n], y[n])
                                        for m in rows if m != n)]  # fmt: skip
    assert sorted(data["pareto"]) == sorted(front)
    html = (tmp_path / "cmp" / "compare.html").read_text()
    assert "data:image/png;base64," in html and "three" in html and "two" in html
    assert (tmp_path / "cmp" / "compare.md").read_text().count("\n| ") >= 3  # header + 2 runs
    # a run without an evaluation, or one run alone: refused, nothing written
    (tmp_path / "empty").mkdir()
    out = CliRunner().invoke(app, ["compare", str(a), str(tmp_path / "empty"), "--out", str(tmp_path / "c2")])
    assert out.exit_code == 2 and "no eval.json" in out.output and not (tmp_path / "c2").exists()
    out = CliRunner().invoke(app, ["compare", str(a), "--out", str(tmp_path / "c3")])
    assert out.exit_code == 2 and "at least two" in out.output
    out = CliRunner().invoke(app, ["report", str(tmp_path / "empty")])
    assert out.exit_code == 2 and "no eval.json" in out.output and "Traceback" not in out.output


def test_bits_per_byte_is_nats_per_byte_over_ln2():
    cols = {"m:ce": np.array([2.0, 1.0]), "m:bytes": np.array([4.0, 2.0])}
    assert stats.metric("bits_per_byte", "m")(cols) == pytest.approx(3 / 6 / math.log(2))
    both = {**cols, "t:ce": np.array([1.0, 0.5]), "t:bytes": np.array([4.0, 2.0])}
    assert stats.kept("bits_per_byte", "m", "t")(both) == pytest.approx(0.5)


def test_peak_memory_is_the_childs_own_not_its_parents(tiny_teacher_dir):
    """Linux keeps ru_maxrss across exec, so a child measured that way reports its parent's peak:
    with 1.5 GiB held here, the tiny model's process must still report far less."""
    import torch

    from distill.evaluate.metrics import peak_memory

    held = np.ones(3 << 27, dtype=np.float32)  # 1.5 GiB, touched
    got = peak_memory(tiny_teacher_dir, [1, 2, 3], 4, torch.float32)
    assert held.sum() > 0
    assert 100 < got["runtime_rss_mib"] <= got["peak_rss_mib"] < 1200, got


def _cross_tokenizer_eval(old_intervals: bool = False) -> dict:
    """eval.json of a student with its own tokenizer: no KL or top-1 agreement for the students
    (None), figures in their own tokens. ``old_intervals``: as an earlier evaluation wrote it, with
    the students' missing KL and agreement turned into 0 (KL 0, "kept KL 100%") and no record of
    the tokenizer."""

    def rows(ce: list[float], tokens: list[int], paired: bool) -> list[dict]:
        return [{"id": f"p{i}", "kl": 0.0 if paired else None, "agree": t if paired else None, "ce": c,
                 "tokens": t, "bytes": 4 * t + 2, "exact_match": 0.0, "rouge_l": 0.3 + 0.1 * i,
                 "correct": None, "judge_logprob": -c, "judge_tokens": t}
                for i, (c, t) in enumerate(zip(ce, tokens, strict=True))]  # fmt: skip

    per_prompt = {"teacher": rows([2.0, 1.0, 3.0, 2.5], [4, 2, 3, 5], True),
                  "untrained_student": rows([9.0, 4.0, 9.5, 8.0], [6, 3, 5, 7], False),
                  "student": rows([5.0, 2.0, 6.0, 5.5], [6, 3, 5, 7], False)}  # fmt: skip
    if old_intervals:
        per_prompt = {m: [dict(r, kl=r["kl"] or 0.0, agree=r["agree"] or 0) for r in rs]
                      for m, rs in per_prompt.items()}  # fmt: skip
    intervals = stats.quality_intervals(per_prompt, draws=200)
    model = {"perplexity": 3.0, "bits_per_byte": 0.5, "rouge_l": 0.45, "exact_match": 0.0,
             "params": 10_000_000, "tokens_per_s_batch1": 50.0, "tokens_per_s_batched": 200.0}  # fmt: skip
    results = {
        "teacher": dict(model, kl=0.0, top1_agreement=1.0, params=25_000_000, tokens_per_s_batch1=25.0),
        "untrained_student": dict(model, kl=None, top1_agreement=None),
        "student": dict(model, kl=None, top1_agreement=None),
        "summary": {"heldout_prompts": 4, "speedup_batch1": 2.0, "speedup_batched": 2.0, "size_ratio": 0.4},
        "intervals": intervals,
    }
    if not old_intervals:
        for m in ("untrained_student", "student"):
            results[m]["own_tokenizer"] = True
    return results


@pytest.mark.parametrize("old_intervals", [False, True], ids=["new", "earlier-eval-json"])
def test_the_report_of_a_student_with_its_own_tokenizer_keeps_bits_per_byte_not_kl(tmp_path, old_intervals):
    from distill.evaluate.report import headline, write_report

    results = _cross_tokenizer_eval(old_intervals)
    cards = {label: value for label, value, _ in headline(results)}
    assert not any("KL" in label or "top-1" in label for label in cards), cards
    assert "kept: bits per byte of the teacher's answers" in cards
    write_report(tmp_path, results)
    md = (tmp_path / "report" / "report.md").read_text()
    html = (tmp_path / "report" / "report.html").read_text()
    for text in (md, html):
        assert "100.0%" not in text and "KL(teacher ‖ model): 100" not in text
        assert "kept: bits per byte" in text
        assert "has its own tokenizer: KL and top-1 agreement" in text
    cells = [[c.strip() for c in line.strip("| ").split(" | ")] for line in md.splitlines() if " | " in line]
    table = {row[0]: row[1:] for row in cells}  # teacher, untrained student, student, kept, − untrained
    kl, top1 = table["KL(teacher ‖ model), nats/token ↓"], table["top-1 agreement with the teacher ↑"]
    assert kl[0] == "0 [0, 0]" and kl[1:] == top1[1:] == ["n/a"] * 4
    ppl = table["perplexity of the teacher's answers ↓"]
    assert ppl[3] == "n/a" and "[" in ppl[2] and "[" in ppl[4]  # the students' perplexities compare
    assert "%" in table["bits per byte of the teacher's answers ↓"][3]  # the kept figure


@pytest.mark.parametrize("old_intervals", [False, True], ids=["new", "earlier-eval-json"])
@pytest.mark.parametrize("y", ["kl", "top1_agreement"])
def test_compare_leaves_a_student_with_its_own_tokenizer_out_of_a_ranking_on_kl(tmp_path, y, old_intervals):
    from distill.evaluate.compare import compare_runs

    shared = _cross_tokenizer_eval()
    for m in ("untrained_student", "student"):  # one tokenizer: KL and agreement exist
        shared[m].update(kl=0.8, top1_agreement=0.4, own_tokenizer=False)
    shared["summary"]["speedup_batch1"] = 1.5  # slower than the other run: only its quality could rank it
    runs = {"shared": shared, "own": _cross_tokenizer_eval(old_intervals)}
    for name, res in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval.json").write_text(json.dumps(res))
    compare_runs([tmp_path / "shared", tmp_path / "own"], tmp_path / "cmp", y=y)
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    rows = {r["run"]: r for r in data["rows"]}
    assert rows["own"]["kl"] is None and rows["own"]["top1_agreement"] is None
    assert rows["own"]["top1_kept"] is None
    assert data["pareto"] == ["shared"]
    assert any(n.startswith("own: left out of the plot and the ranking") and "own tokenizer" in n
               for n in data["notes"]), data["notes"]  # fmt: skip
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| own |" in md and "n/a" in md
