"""The healing stage: general text before the task data, held-out prompts left out, resumable."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill import pipeline
from distill.core.data import DataError, general_text_examples, read_general_text
from distill.core.recipe import load_config
from distill.stages import train as train_stage

from conftest import tiny_recipe, tiny_run


def test_read_general_text_splits_documents_and_names_bad_lines(tmp_path):
    txt = tmp_path / "t.txt"
    txt.write_text("first doc\nstill first\n\n\n  second doc  \n\n")
    assert read_general_text(txt) == ["first doc\nstill first", "second doc"]
    jl = tmp_path / "t.jsonl"
    jl.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert read_general_text(jl) == ["a", "b"]
    jl.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(DataError, match=r't.jsonl:2: each line must be an object with a "text" string'):
        read_general_text(jl)
    jl.write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(DataError, match=r"t.jsonl:2: not valid JSON"):
        read_general_text(jl)
    (tmp_path / "e.txt").write_text("\n\n  \n")
    with pytest.raises(DataError, match="no text in it"):
        read_general_text(tmp_path / "e.txt")
    with pytest.raises(DataError, match="no such file"):
        read_general_text(tmp_path / "missing.txt")
    default = read_general_text("default")
    assert len(default) > 500 and all(d.strip() for d in default)


def test_the_bundled_text_holds_no_prompt_of_the_default_set():
    from distill.core.data import read_prompts

    docs = read_general_text("default")
    openings = {d.splitlines()[0].lower().rstrip("?").strip() for d in docs}
    prompts = {p.messages[-1]["content"].lower().rstrip("?").strip() for p in read_prompts(None)}
    assert not openings & prompts


def test_general_text_examples_run_documents_together_and_leave_out_heldout(tiny_teacher_dir):
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    docs = ["the cat sat", "What is   your NAME? said the dog", "a b c d e f g h"]
    examples, report = general_text_examples(tok, docs, max_len=5, exclude=["what is your name?"])
    assert report["documents"] == 2 and report["dropped_heldout"] == 1
    eos = [tok.eos_token_id]
    stream = tok("the cat sat", add_special_tokens=False)["input_ids"] + eos
    stream += tok("a b c d e f g h", add_special_tokens=False)["input_ids"] + eos
    assert report["tokens"] == len(stream)
    assert [ids for ids, _ in examples] == [
        r for r in (stream[i : i + 5] for i in range(0, len(stream), 5)) if len(r) >= 2
    ]
    assert all(m == [False] + [True] * (len(ids) - 1) for ids, m in examples)


def test_healing_runs_first_and_a_rerun_starts_from_its_weights(tmp_path, tiny_teacher_dir, prompts_file):
    text = tmp_path / "general.txt"
    text.write_text(
        "\n\n".join(f"plain sentence number {i} about the weather and the sea" for i in range(40))
    )
    cfg = tiny_run(tmp_path, tiny_teacher_dir, prompts_file, heal={"data": str(text), "max_steps": 3},
                   train={"max_steps": 2})  # fmt: skip
    run = cfg.run_dir
    heal_steps = [json.loads(x) for x in (run / "heal" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in heal_steps] == [1, 2, 3] and all(r["kd"] > 0 for r in heal_steps)
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["heal"]["steps"] == 3 and summary["heal"]["documents"] == 40
    healed = AutoModelForCausalLM.from_pretrained(run / "student_init")
    load_model(healed, run / "heal" / "healed.safetensors")
    healed = healed.state_dict()
    init = AutoModelForCausalLM.from_pretrained(run / "student_init")
    assert any(not torch.equal(healed[k], v) for k, v in init.state_dict().items())  # healing changed it
    # a rerun of the task stage from scratch starts from the healed weights, without healing again
    seen = {}
    real_train = train_stage.train

    def spy(student, *args, **kwargs):
        seen.setdefault("first", {k: v.clone() for k, v in student.state_dict().items()})
        return real_train(student, *args, **kwargs)

    train_stage.train = spy
    try:
        pipeline.train_student(cfg)
    finally:
        train_stage.train = real_train
    assert len((run / "heal" / "metrics.jsonl").read_text().splitlines()) == 3
    for k, v in healed.items():
        torch.testing.assert_close(seen["first"][k], v)


def test_a_missing_heal_file_is_refused_before_any_work(tmp_path, tiny_teacher_dir, prompts_file):
    recipe = tiny_recipe(
        tmp_path / "runs", tiny_teacher_dir, prompts_file, heal={"data": str(tmp_path / "no.txt")}
    )
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(DataError, match="no.txt: no such file"):
        pipeline.prepare(load_config(tmp_path / "r.yaml"))
    assert not (tmp_path / "runs" / "tiny").exists()
