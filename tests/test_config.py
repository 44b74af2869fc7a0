from __future__ import annotations

import pytest
import yaml

from distill.config import ConfigError, RunConfig, dump_config, load_config, parse_override


def test_default_recipe_loads_and_round_trips(tmp_path):
    cfg = load_config()
    assert cfg.teacher.model == "smollm2-135m-instruct" and cfg.student.num_layers == 14
    dump_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["train.lr=1e-4", "student.layers=[0, 5, 29]", "train.bf16=false"])
    assert cfg.train.lr == 1e-4 and cfg.student.layers == [0, 5, 29] and cfg.train.dtype == "float32"


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"train": {"learning_rate": 0.1}}))
    with pytest.raises(ConfigError, match=r"train\.learning_rate: unknown key"):
        load_config(p)


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"train\.max_steps.*'many'"):
        load_config(None, ["train.max_steps=many"])


def test_out_of_range_and_cross_field_rules():
    with pytest.raises(ConfigError, match=r"train\.alpha"):
        load_config(None, ["train.alpha=1.5"])
    with pytest.raises(ConfigError, match="student.model must be set"):
        load_config(None, ["student.init=model"])


def test_bad_override_syntax_and_yaml(tmp_path):
    with pytest.raises(ConfigError, match="expected key.path=value"):
        parse_override("train.lr")
    p = tmp_path / "bad.yaml"
    p.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_override_into_scalar_is_refused():
    with pytest.raises(ConfigError, match="not a section"):
        load_config(None, ["name=x", "name.sub=1"])


def test_run_dir():
    assert str(RunConfig(name="a", runs_dir="r").run_dir) == "r/a"
