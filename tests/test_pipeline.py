"""End to end on tiny models: every stage writes its files; the export loads in plain transformers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill import pipeline
from distill.core.config import RunConfig
from distill.core.recipe import load_config

from conftest import tiny_recipe


@pytest.fixture()
def tiny_cfg(tmp_path, tiny_teacher_dir, prompts_file) -> RunConfig:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path / "runs", tiny_teacher_dir, prompts_file)))
    return load_config(path)


def test_run_all_writes_every_stage(tiny_cfg):
    results = pipeline.run_all(tiny_cfg)
    run = tiny_cfg.run_dir
    for name in ["config.yaml", "split.json", "answers.jsonl", "student_init/config.json",
                 "student/model.safetensors", "metrics.jsonl", "eval.json", "eval_answers.jsonl",
                 "export/model.safetensors", "export/README.md", "export/tokenizer.json",
                 "export/generation_config.json", "timings.json", "report/report.md", "report/report.html",
                 "eval_prompts.json"]:  # fmt: skip
        assert (run / name).exists(), name
    report = (run / "report" / "report.md").read_text()
    for png in ("training.png", "quality.png", "cost.png"):
        assert f"]({png})" in report
        head = (run / "report" / png).read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(head[16:20], "big") > 100  # width
    answers = [json.loads(x) for x in (run / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 13 and len({a["id"] for a in answers}) == 13
    assert all(a["finish_reason"] in ("stop", "length") and a["token_ids"] for a in answers)
    saved = json.loads((run / "eval.json").read_text())
    keys = ["kl", "top1_agreement", "perplexity", "exact_match", "rouge_l",
            "tokens_per_s_batch1", "tokens_per_s_batched", "params", "bytes"]  # fmt: skip
    for model in ("teacher", "untrained_student", "student"):
        assert all(k in saved[model] for k in keys), model
    # The teacher scored against itself: zero KL and full agreement, computed, not set.
    assert saved["teacher"]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert saved["teacher"]["top1_agreement"] == 1.0
    assert saved["student"]["params"] < saved["teacher"]["params"]
    assert saved["student"]["num_layers"] == 2 and saved["teacher"]["num_layers"] == 4
    assert results["student"]["kl"] == saved["student"]["kl"]
    # Training moved the student towards the teacher.
    assert saved["student"]["kl"] < saved["untrained_student"]["kl"]
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["max_steps"] == 6 and resolved["student"]["num_layers"] == 2
    card = (run / "export" / "README.md").read_text()
    assert str(tiny_cfg.teacher.model) in card and "| kl |" in card


def test_export_loads_in_plain_transformers_with_equal_logits(tiny_cfg):
    pipeline.run_all(tiny_cfg)
    run = tiny_cfg.run_dir
    trained = AutoModelForCausalLM.from_pretrained(run / "student", dtype=torch.float32).eval()
    exported = AutoModelForCausalLM.from_pretrained(run / "export").eval()
    tok = AutoTokenizer.from_pretrained(run / "export")
    ids = tok("the cat sat on the mat", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, trained(ids).logits, rtol=0, atol=0)


def test_stage_without_its_input_names_the_missing_stage(tiny_cfg):
    with pytest.raises(pipeline.StageError, match="distill shrink"):
        pipeline.train_student(tiny_cfg)


def test_lora_trains_adapters_and_export_is_merged(tmp_path, tiny_teacher_dir, prompts_file):
    from safetensors.torch import load_file

    from conftest import tiny_recipe

    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    recipe = tiny_recipe(tmp_path / "runs", tiny_teacher_dir, prompts_file, train={"lora": lora})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    cfg = load_config(tmp_path / "r.yaml")
    pipeline.run_all(cfg)
    run = cfg.run_dir
    init = load_file(run / "student_init" / "model.safetensors")
    exported = load_file(run / "export" / "model.safetensors")
    assert init.keys() == exported.keys()  # no adapter tensors left: merged into plain weights
    changed = {k for k in init if not torch.equal(init[k], exported[k])}
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)
    assert "model.layers.0.self_attn.q_proj.weight" in changed


def test_training_metrics_also_go_to_tensorboard(tiny_cfg):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pipeline.generate(tiny_cfg)
    pipeline.shrink(tiny_cfg)
    pipeline.train_student(tiny_cfg)
    run = tiny_cfg.run_dir
    (events,) = run.glob("tensorboard/**/events.out.tfevents.*")
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("train/loss")]
    expected = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(expected, rel=1e-6) and len(losses) == 6
    assert {"train/kd", "train/ce", "train/lr", "train/grad_norm", "train/tokens_per_s"} <= set(
        acc.Tags()["scalars"]
    )


def test_the_default_recipes_methods_together_end_to_end(tmp_path, tiny_teacher_dir, prompts_file):
    """Importance layers, width pruning, hidden-state alignment and prompt tokens in one run (what
    the embedded default recipe asks of SmolLM2): every stage runs, and the export is a stock model
    of the pruned shape whose logits are the trained student's."""
    recipe = tiny_recipe(tmp_path / "runs", tiny_teacher_dir, prompts_file,
                         student={"layer_selection": "importance", "num_layers": 3, "intermediate_size": 40},
                         train={"hidden_weight": 1.0, "prompt_weight": 0.5, "max_steps": 3})  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    cfg = load_config(tmp_path / "r.yaml")
    results = pipeline.run_all(cfg)
    run = cfg.run_dir
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["hidden"] > 0 and r["prompt_kd"] > 0 for r in rows)
    exported = AutoModelForCausalLM.from_pretrained(run / "export").eval()
    assert (exported.config.num_hidden_layers, exported.config.intermediate_size) == (3, 40)
    trained = AutoModelForCausalLM.from_pretrained(run / "student").eval()
    ids = torch.tensor([[5, 17, 9, 22]])
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, trained(ids).logits)
    assert results["student"]["params"] < results["teacher"]["params"]


def test_resampled_answers_are_drawn_for_dropped_training_prompts_and_trained_on(
    tmp_path, tiny_teacher_dir, prompts_file
):
    """generate.resample=3, asked for after the greedy answers, with a filter that drops the longer
    half of them: the generate stage samples more answers for the training prompts whose answers were
    all dropped (none for held-out prompts), and training keeps one answer per prompt that has one
    that passed, the first that did."""
    from conftest import tiny_run

    cfg = tiny_run(tmp_path, tiny_teacher_dir, prompts_file, stages=("generate",))
    run = cfg.run_dir
    first = {a["id"]: a for a in map(json.loads, (run / "answers.jsonl").read_text().splitlines())}
    most = sorted(len(a["text"]) for a in first.values())[len(first) // 2]
    sets = ["generate.resample=3", f"filter.max_chars={most}"]
    cfg = load_config(tmp_path / "r.yaml", sets)
    pipeline.generate(cfg)
    split = json.loads((run / "split.json").read_text())
    answers = [json.loads(x) for x in (run / "answers.jsonl").read_text().splitlines()]
    drawn = {a["id"] for a in answers if "sample" in a}
    dropped = {i for i in split["train"] if len(first[i]["text"]) > most}
    assert drawn == dropped and dropped, (drawn, dropped)  # the held-out prompts get none
    passed = {a["id"] for a in answers if len(a["text"]) <= most and a["id"] in split["train"]}
    pipeline.shrink(cfg)
    pipeline.train_student(cfg)
    report = json.loads((run / "filter_report.json").read_text())
    assert passed & dropped  # some prompts were rescued by resampling
    assert report["kept"] == len(passed) and report["kept_by_resampling"] == len(passed & dropped)


def test_extra_teacher_samples_are_generated_for_training_prompts_and_trained_on(
    tmp_path, tiny_teacher_dir, prompts_file
):
    """generate.extra_samples=1: one more (sampled) answer per training prompt, none for the
    held-out ones; training reads both, and a config asking for none reads the first only."""
    from conftest import tiny_run

    cfg = tiny_run(tmp_path, tiny_teacher_dir, prompts_file,
                   generate={"extra_samples": 1, "generation_temperature": 1.5},
                   filter={"dedupe": False, "min_chars": 0})  # fmt: skip
    run = cfg.run_dir
    split = json.loads((run / "split.json").read_text())
    answers = [json.loads(x) for x in (run / "answers.jsonl").read_text().splitlines()]
    sampled = sorted(a["id"] for a in answers if a.get("sample") == 1)
    assert sampled == sorted(split["train"]) and len(answers) == 13 + len(split["train"])
    report = json.loads((run / "filter_report.json").read_text())
    assert report["kept"] + report["dropped"] == 2 * len(split["train"])
    pipeline.train_student(load_config(tmp_path / "r.yaml", ["generate.extra_samples=0"]), resume=False)
    report = json.loads((run / "filter_report.json").read_text())
    assert report["kept"] + report["dropped"] == len(split["train"])
    # The teacher cache scores the sequences training reads: one per kept answer asked for.
    for extra in (1, 0):
        pipeline.build_teacher_cache(load_config(tmp_path / "r.yaml", [f"generate.extra_samples={extra}"]))
        meta = json.loads((run / "teacher_cache" / "meta.json").read_text())
        assert meta["num_samples"] == (1 + extra) * len(split["train"]), (extra, meta["num_samples"])
        shutil.rmtree(run / "teacher_cache")
    # The shrunk student is calibrated on each prompt's first answer: the samples leave it as it is.
    chosen = {}
    for name, keep in (("with-samples", lambda a: True), ("greedy-only", lambda a: "sample" not in a)):
        other = run.parent / name
        other.mkdir()
        kept = [a for a in answers if keep(a)]
        (other / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in kept))
        sets = [f"name={name}", "student.layer_selection=importance", "student.calibration_samples=4"]
        pipeline.shrink(load_config(tmp_path / "r.yaml", sets))
        record = json.loads((other / "student_candidates.json").read_text())
        chosen[name] = [{k: v for k, v in c.items() if k != "speedup"} for c in record["candidates"]]  # timed
    assert chosen["with-samples"] == chosen["greedy-only"]
