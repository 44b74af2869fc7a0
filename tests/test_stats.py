"""Intervals over prompts where a figure does not exist: a student with its own tokenizer (no KL, no
top-1 agreement, perplexity in other tokens) and resamples on which a figure is not finite."""

from __future__ import annotations

import math

import numpy as np
import pytest

from distill.evaluate import intervals as stats


def _rows(values: list[tuple]) -> list[dict]:
    """Per-prompt rows as ``evaluate_model`` writes them: kl sum, agreements, ce sum, tokens, bytes."""
    return [
        {"id": f"p{i}", "kl": kl, "agree": agree, "ce": ce, "tokens": tok, "bytes": nbytes,
         "exact_match": 0.0, "rouge_l": 0.5, "correct": None, "judge_logprob": -ce, "judge_tokens": tok}
        for i, (kl, agree, ce, tok, nbytes) in enumerate(values)
    ]  # fmt: skip


# the teacher against itself (KL 0, every position agrees), in its own tokens
TEACHER = _rows([(0.0, 4, 2.0, 4, 20), (0.0, 2, 1.0, 2, 9), (0.0, 3, 3.0, 3, 14), (0.0, 5, 2.5, 5, 22)])
# students with another tokenizer: no KL or agreement (they would pair ids), more tokens per answer
STUDENT = _rows([(None, None, 5.0, 6, 20), (None, None, 2.0, 3, 9), (None, None, 6.0, 5, 14),
                 (None, None, 5.5, 7, 22)])  # fmt: skip
UNTRAINED = _rows([(None, None, 9.0, 6, 20), (None, None, 4.0, 3, 9), (None, None, 9.5, 5, 14),
                   (None, None, 8.0, 7, 22)])  # fmt: skip


def test_a_missing_kl_is_no_column_of_zeros():
    cols = stats.prompt_columns({"teacher": TEACHER, "student": STUDENT})
    assert np.isnan(cols["student:kl"]).all() and np.isnan(cols["student:agree"]).all()
    assert (cols["teacher:kl"] == 0).all() and list(cols["student:tokens"]) == [6, 3, 5, 7]
    # no tokens judged on a prompt still adds 0 to the judge's sums
    judged = stats.prompt_columns({"m": [dict(STUDENT[0], judge_logprob=None, judge_tokens=None)]})
    assert judged["m:judge_tokens"][0] == 0 and judged["m:judge_logprob"][0] == 0


def test_a_student_with_its_own_tokenizer_is_kept_by_bits_per_byte_alone():
    out = stats.quality_intervals({"teacher": TEACHER, "untrained_student": UNTRAINED, "student": STUDENT},
                                  draws=300)  # fmt: skip
    for model in ("student", "untrained_student"):
        assert "kl" not in out["models"][model] and "top1_agreement" not in out["models"][model]
    assert out["models"]["teacher"]["kl"]["value"] == 0.0
    # nothing kept is made of a missing figure, nor of perplexities in two tokenizers' units
    assert not {"kl", "top1_agreement", "perplexity"} & set(out["kept"])
    assert not {"kl", "top1_agreement"} & set(out["vs_untrained"])
    # bits per byte: nats per byte / ln 2, the same bytes for both, so kept = teacher's / student's
    teacher_bpb, student_bpb = 8.5 / 65 / math.log(2), 18.5 / 65 / math.log(2)
    assert out["models"]["student"]["bits_per_byte"]["value"] == pytest.approx(student_bpb)
    assert out["kept"]["bits_per_byte"]["value"] == pytest.approx(teacher_bpb / student_bpb)
    # the two students share a tokenizer: their perplexities compare
    got = out["vs_untrained"]["perplexity"]["value"]
    assert got == pytest.approx(math.exp(18.5 / 21) - math.exp(30.5 / 21))


def test_a_teacher_known_only_by_its_answers_has_no_bits_per_byte():
    api = [dict(r, kl=None, agree=None, ce=None, tokens=None) for r in TEACHER]
    out = stats.quality_intervals({"teacher": api, "student": STUDENT}, draws=100)
    assert set(out["models"]["teacher"]) == {"teacher_logprob", "exact_match", "rouge_l"}
    assert "bits_per_byte" not in out["kept"] and "perplexity" not in out["kept"]


def test_the_bootstrap_counts_the_resamples_on_which_the_figure_is_not_finite():
    # one prompt of five has a reference: a resample without it has no accuracy (NaN)
    correct = np.array([math.nan, 1.0, math.nan, math.nan, math.nan])
    cols = {"m:correct": correct}
    got = stats.bootstrap(stats.metric("reference_accuracy", "m"), cols, draws=400, seed=3)
    without = sum(1 not in row for row in stats.resample_indices(5, 400, 3).tolist())
    assert 0 < without < 400 and got.dropped == without
    assert got.as_dict()["dropped"] == without and (got.value, got.low, got.high) == (1.0, 1.0, 1.0)
    # a figure finite on every resample drops none; one never finite drops them all
    assert stats.bootstrap(stats.mean("m:x"), {"m:x": np.arange(5.0)}, draws=50).dropped == 0
    never = stats.bootstrap(stats.mean("m:x"), {"m:x": np.full(5, math.inf)}, draws=50)
    assert never.dropped == 50 and (never.low, never.high) == (-math.inf, math.inf)


def test_quality_intervals_record_and_say_how_many_resamples_were_left_out():
    rows = [dict(r, correct=1.0 if i == 1 else None) for i, r in enumerate(TEACHER)]
    out = stats.quality_intervals({"teacher": rows}, draws=400, seed=5)
    acc = out["models"]["teacher"]["reference_accuracy"]
    want = sum(1 not in row for row in stats.resample_indices(4, 400, 5).tolist())
    assert acc["dropped"] == want > 0 and out["models"]["teacher"]["rouge_l"]["dropped"] == 0
    assert any(
        w.startswith("reference_accuracy (teacher):") and f"not finite on {want} of 400 resamples" in w
        for w in out["warnings"]
    ), out["warnings"]


def test_console_warnings_gather_the_resample_counts_in_one_line_and_keep_the_others():
    from distill.evaluate.intervals import summarised_warnings

    noise = "kl: the student's difference from the untrained student (+0.1) is within the noise"
    warnings = [
        "reference_accuracy (teacher): not finite on 3 of 2000 resamples of the 32 held-out prompts (...)",
        noise,
        "arithmetic: accuracy kept: not finite on 104 of 2000 resamples of the 100 items (...)",
    ]
    out = summarised_warnings(warnings)
    assert out[0] == noise and len(out) == 2
    assert out[1].startswith("2 intervals are over fewer resamples")
    assert "reference_accuracy (teacher), arithmetic: accuracy kept;" in out[1]
    assert summarised_warnings([noise]) == [noise] and summarised_warnings([]) == []
