"""bench/ood.py's verdict on the issue's targets: on the figure, and on its whole 95% interval."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from ood import target_met  # noqa: E402


@pytest.mark.parametrize(
    ("key", "value", "low", "high", "met", "on_interval"),
    [
        ("kl", 1.996, 1.80, 2.18, True, False),  # under 2.0 on its figure, its interval straddles it
        ("kl", 1.77, 1.56, 1.98, True, True),
        ("kl", 2.0, 1.9, 2.0, True, True),  # on the target counts as met
        ("kl", 2.12, 1.93, 2.30, False, False),
        ("top1_agreement", 0.49, 0.442, 0.544, True, False),  # a lower bound is what a >= target needs
        ("top1_agreement", 0.46, 0.45, 0.50, True, True),
        ("task_accuracy_kept", 0.31, 0.07, 0.77, False, False),
    ],
)
def test_met_on_the_interval_only_when_its_far_end_meets_the_target(key, value, low, high, met, on_interval):
    got = target_met(key, value, low, high)
    assert got == {f"default_ood_test_{key}_met": met, f"default_ood_test_{key}_met_on_interval": on_interval}
