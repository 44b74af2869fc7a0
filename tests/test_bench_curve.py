"""bench/curve.py: which points of the compute curve are still missing; the training clock each records."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _curve():
    spec = importlib.util.spec_from_file_location("bench_curve", ROOT / "bench" / "curve.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
