"""Precision and device chosen by measurement: the probe, its cache, the choice, the config plumbing."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from distill.cli import app
from distill.core import hardware
from distill.core.hardware import Precision, choose_precision, resolve_device
from distill.core.recipe import load_config
from distill.teacher import factory

CPU = torch.device("cpu")


def _fake_probe(bf16_ratio: float, calls: list):
    def probe(hidden: int, intermediate: int) -> dict:
        calls.append((hidden, intermediate))
        fp32 = 40.0
        return {
            "shape": "fake",
            "gflops": {"float32": {"16": fp32, "256": fp32}, "bfloat16": {"16": fp32 / bf16_ratio,
                                                                         "256": fp32 / bf16_ratio}},
            "bf16_over_fp32_time": bf16_ratio,
        }  # fmt: skip

    return probe


@pytest.mark.parametrize(("ratio", "want"), [(75.0, "float32"), (1.0, "float32"), (0.3, "bfloat16")])
def test_auto_takes_the_faster_dtype_on_this_cpu(monkeypatch, ratio, want):
    """An AVX2-only CPU (bf16 75x slower), a tie (bf16 must clearly win), an AMX CPU (3x faster)."""
    calls = []
    monkeypatch.setattr(hardware, "probe_cpu_matmul", _fake_probe(ratio, calls))
    p = choose_precision("auto", CPU, 64, 256)
    assert p.dtype == want and calls == [(64, 256)]
    assert p.probe["cpu"] == hardware.cpu_model() and "bf16/fp32 time" in p.reason


def test_probe_is_cached_per_machine_class_and_shape(monkeypatch):
    calls = []
    monkeypatch.setattr(hardware, "probe_cpu_matmul", _fake_probe(0.3, calls))
    first = choose_precision("auto", CPU, 64, 256)
    assert choose_precision("auto", CPU, 64, 256) is first  # decided once per process
    hardware._DECIDED.clear()  # a new process reads the probe cache instead of measuring
    again = choose_precision("auto", CPU, 64, 256)
    assert len(calls) == 1 and again.dtype == first.dtype and "cached probe" in again.reason
    choose_precision("auto", CPU, 128, 256)  # another shape is measured
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # capping the ISA makes another machine class
    choose_precision("auto", CPU, 64, 256)
    assert len(calls) == 3


def test_an_explicit_dtype_wins_without_a_probe(monkeypatch):
    def no_probe(*_):
        raise AssertionError("an explicit dtype must not be probed")

    monkeypatch.setattr(hardware, "probe_cpu_matmul", no_probe)
    for dtype in ("float32", "bfloat16"):
        assert choose_precision(dtype, CPU, 64, 256) == Precision(
            dtype, f"{dtype} (set in the config)", "cpu"
        )


def test_the_real_probe_measures_both_dtypes_at_the_given_shape():
    probe = hardware.probe_cpu_matmul(64, 128)
    for dtype in ("float32", "bfloat16"):
        assert set(probe["gflops"][dtype]) == {str(r) for r in hardware.PROBE_ROWS}
        assert all(v > 0 for v in probe["gflops"][dtype].values())
    assert probe["bf16_over_fp32_time"] > 0 and "(rows, 64) @ (64, 128)" in probe["shape"]


def test_devices_resolve_and_a_missing_gpu_is_refused():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda:1")
    with pytest.raises(Exception, match="teacher.device"):
        load_config(None, ["teacher.device=gpu0"])


def test_default_recipe_shows_dtype_auto_and_a_time_budget():
    out = CliRunner().invoke(app, ["show-config"])
    assert out.exit_code == 0
    cfg = yaml.safe_load(out.output)
    assert cfg["teacher"]["dtype"] == cfg["train"]["dtype"] == cfg["evaluate"]["speed_dtype"] == "auto"
    assert cfg["train"]["time_budget"] == "6m"


def test_old_bf16_flag_still_means_a_dtype():
    assert load_config(None, ["train.bf16=false"]).train.dtype == "float32"
    assert load_config(None, ["train.bf16=true"]).train.dtype == "bfloat16"
    with pytest.raises(ValueError, match="still 'auto'"):
        _ = load_config(None).train.bf16  # an unresolved dtype cannot be used by mistake


def test_a_run_records_the_chosen_precision(tmp_path, tiny_teacher_dir, prompts_file, monkeypatch):
    """The pipeline resolves auto before any work: config.yaml holds the concrete dtypes,
    precision.json and eval.json the reasons and measured figures."""
    from distill import pipeline

    calls = []
    monkeypatch.setattr(hardware, "probe_cpu_matmul", _fake_probe(75.0, calls))
    from conftest import tiny_recipe

    recipe = tiny_recipe(tmp_path / "runs", tiny_teacher_dir, prompts_file,
                         train={"dtype": "auto", "max_steps": 2},
                         evaluate={"speed_dtype": "auto"})  # fmt: skip
    recipe["teacher"]["dtype"] = "auto"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    cfg = load_config(tmp_path / "r.yaml")
    pipeline.run_all(cfg)
    run = cfg.run_dir
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (
        saved["teacher"]["dtype"] == saved["train"]["dtype"] == saved["evaluate"]["speed_dtype"] == "float32"
    )
    precision = json.loads((run / "precision.json").read_text())
    assert precision["train"]["probe"]["bf16_over_fp32_time"] == 75.0
    assert json.loads((run / "eval.json").read_text())["precision"]["speed"]["dtype"] == "float32"
    assert len(calls) == 1  # one probe for the whole run (teacher and student share the shapes)


def test_teacher_placement_plumbing_on_cpu(tiny_teacher_dir, tmp_path, prompts_file):
    """teacher.device and device_map reach the loader, and the live teacher hands its signal back on
    the batch's device (the CPU here; on a GPU box the same code moves a teacher to cuda:1)."""
    from distill import pipeline
    from distill.core.data import collate
    from distill.core.models import load_model
    from distill.teacher.signal import HeadRows, LiveTeacher

    from conftest import tiny_recipe

    spread = load_model(
        str(tiny_teacher_dir), device_map="auto"
    )  # accelerate places it (all on the CPU here)
    assert spread.device.type == "cpu"
    recipe = tiny_recipe(tmp_path, tiny_teacher_dir, prompts_file)
    recipe["teacher"]["device"] = "cpu"
    cfg = type(load_config(None)).model_validate(recipe)
    teacher = factory.load_teacher(cfg, torch.float32)
    assert teacher.device == CPU
    live = LiveTeacher(teacher)
    batch = collate([([5, 6, 7, 8], [False, False, True, True])], 0)
    dense = live.signal(batch)
    rows = live.signal(batch, lazy=True)
    assert isinstance(rows, HeadRows) and dense.device == rows.hidden.device == batch.input_ids.device
    torch.testing.assert_close(rows.logits(), dense, rtol=1e-4, atol=1e-4)
    if not torch.cuda.is_available():
        with pytest.raises(Exception, match="no CUDA device"):
            pipeline.prepare(
                cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"device": "cuda:1"})})
            )
