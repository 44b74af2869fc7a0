"""bench/curve.py: which points of the compute curve are still missing; the training clock each records;
the prompts each series' points train on (and bench/choice.py's candidates)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bench(name: str):
    """bench/<name>.py loaded as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _curve():
    return _bench("curve")


def test_not_measured_names_each_series_missing_points():
    curve = _curve()
    points = {
        name: {"series": series}
        for name, series in (
            ("6m", ""),
            ("20m", ""),
            ("60m", ""),
            ("60m-large", ""),
            ("6m-frozen", "frozen"),
            ("60m-frozen", "frozen"),
        )  # fmt: skip
    }
    assert curve.not_measured(points) == ["20m-frozen", "60m-large-frozen"]
    points["20m-frozen"] = {"series": "frozen"}
    points["60m-large-frozen"] = {"series": "frozen"}
    assert curve.not_measured(points) == []


def test_the_recorded_curve_lists_what_it_lacks():
    """bench/results/curve.json's not_measured agrees with the points it holds."""
    recorded = json.loads((ROOT / "bench" / "results" / "curve.json").read_text())
    assert recorded["not_measured"] == _curve().not_measured(recorded["points"])


def test_last_elapsed_is_the_last_steps_training_clock(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_candidates", ROOT / "bench" / "candidates.py")
    candidates = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(candidates)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "elapsed_s": 2.5}\n{"step": 2, "elapsed_s": 5.25}\n\n')
    assert candidates.last_elapsed(metrics) == 5.25
    metrics.write_text('{"step": 1, "loss": 3.0}\n')  # a run from before elapsed_s was recorded
    assert candidates.last_elapsed(metrics) is None


def test_each_series_trains_on_its_own_prompts_and_a_larger_set_point_on_large_jsonl():
    from distill.core.recipe import load_config

    curve = _curve()
    large = f"data.path={curve.large_prompts()}"
    for series in ("", "frozen", "kd"):  # run before the embedded set was widened: its first 638 rows
        assert load_config(None, curve.point_overrides("20m", False, series)).data.max_prompts == 638
        cfg = load_config(None, curve.point_overrides("60m", True, series))
        assert cfg.data.max_prompts is None and str(cfg.data.path) == large.removeprefix("data.path=")
    cfg = load_config(None, curve.point_overrides("20m", False, "wide"))  # the default as shipped
    assert cfg.data.max_prompts is None and cfg.data.path is None


def test_choice_candidates_rerun_on_the_set_of_their_round():
    choice = _bench("choice")
    for name, rows in (("kd_only", 638), ("frozen_uncapped", 638), ("narrow", 268), ("kd_half_wider", None)):
        ov = choice.overrides(name, "6m")
        sets = [o for o in ov if o.startswith("data.max_prompts=")]
        assert [int(o.split("=")[1]) for o in sets][-1:] == ([rows] if rows else []), (name, ov)
    assert any(o.startswith("data.path=") for o in choice.overrides("kd_half_wider", "6m"))
