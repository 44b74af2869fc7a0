from __future__ import annotations

import pytest
import yaml

from distill.core.config import ConfigError, RunConfig
from distill.core.recipe import dump_config, load_config, load_config_with_notes, parse_override


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


# --- options a cache or an API teacher cannot serve -------------------------------------------

_API_TEACHER = ["teacher.kind=openai", "teacher.model=null", "student.init=model", "student.model=s"]


@pytest.mark.parametrize(
    ("signal", "overrides"), [("the cache", ["cache.use=true"]), ("an API teacher", _API_TEACHER)]
)
def test_recipe_options_follow_the_teacher_signal(signal, overrides):
    """The default recipe's hidden-state and prompt terms need a live local teacher: with a cache or
    an API teacher they are turned off, one line each saying why."""
    cfg, notes = load_config_with_notes(None, overrides)
    assert cfg.train.hidden_weight == 0 and cfg.train.prompt_weight == 0
    assert notes == [
        f"train.hidden_weight 1.0 -> 0: needs a live local teacher; the teacher signal is {signal}",
        f"train.prompt_weight 0.5 -> 0: needs a live local teacher; the teacher signal is {signal}",
    ]
    assert load_config(None, overrides) == cfg
    assert load_config_with_notes(None, [])[1] == []  # a live local teacher: nothing changes


def test_a_recipe_file_follows_the_teacher_signal_too(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"cache": {"use": True}, "train": {"hidden_weight": 0.25}}))
    cfg, notes = load_config_with_notes(p)
    assert cfg.train.hidden_weight == 0 and notes == [
        "train.hidden_weight 0.25 -> 0: needs a live local teacher; the teacher signal is the cache"
    ]


@pytest.mark.parametrize(
    "asked",
    [
        ["train.hidden_weight=1"],
        ["train.prompt_weight=0.5", "train.hidden_weight=0"],
        ["train={hidden_weight: 1}"],  # the whole section, on the command line
    ],
)
def test_an_option_asked_for_beside_a_cache_is_refused(asked):
    key = "train.prompt_weight" if "prompt" in asked[0] else "train.hidden_weight"
    signal = "the teacher signal is the cache"
    with pytest.raises(ConfigError, match=rf"{key} needs a live local teacher.*{signal}"):
        load_config(None, ["cache.use=true", *asked])
    with pytest.raises(ValueError, match="train.hidden_weight needs a live local teacher"):
        RunConfig.model_validate({"cache": {"use": True}, "train": {"hidden_weight": 1}})  # built in code


def test_onpolicy_from_the_recipe_follows_who_can_grade(tmp_path):
    p = tmp_path / "r.yaml"
    train = {"onpolicy_fraction": 0.5, "hidden_weight": 0, "prompt_weight": 0}
    p.write_text(yaml.safe_dump({"train": train}))
    cfg, notes = load_config_with_notes(p, ["cache.use=true"])  # the live teacher grades beside the cache
    assert cfg.train.onpolicy_fraction == 0.5 and notes == []
    cfg, notes = load_config_with_notes(p, _API_TEACHER)  # a chat endpoint cannot grade given tokens
    assert cfg.train.onpolicy_fraction == 0 and notes == [
        "train.onpolicy_fraction 0.5 -> 0: needs a teacher that grades the student's samples; the teacher "
        "signal is an API teacher"
    ]
    with pytest.raises(ConfigError, match="train.onpolicy_fraction needs a teacher that grades"):
        load_config(p, [*_API_TEACHER, "train.onpolicy_fraction=0.5"])
