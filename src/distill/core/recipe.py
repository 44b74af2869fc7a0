"""Recipes: a YAML file (or the embedded default) with ``--set`` overrides in, a typed ``RunConfig`` out,
and the resolved config written back as YAML."""

from __future__ import annotations

import difflib
import json
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ValidationError,
)

from distill.core.config import ConfigError, RunConfig
from distill.core.units import nearest


def _keys_at(loc: tuple) -> list[str]:
    """The valid keys of the config section at ``loc`` (e.g. ``("train",)``)."""
    model: Any = RunConfig
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        model = next(
            (a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)),
            None,
        )
        if model is None:
            return []
    return list(model.model_fields)


# What other tools (transformers' TrainingArguments, TRL) call some of our keys.
_KNOWN_AS = {
    "learning_rate": "lr",
    "num_train_steps": "max_steps",
    "max_train_steps": "max_steps",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "temperature": "distill_temperature",
    "beta": "jsd_beta",
    "max_grad_norm": "grad_clip",
    "save_steps": "checkpoint_every",
    "save_total_limit": "keep_checkpoints",
}


def _key_hint(key: str, valid: list[str]) -> str:
    """' (did you mean X?)' for an unknown key: a close spelling of a valid key, or the key another
    tool's name (even misspelt) stands for."""
    hint = nearest(key, valid)
    if hint:
        return hint
    alias = difflib.get_close_matches(key, list(_KNOWN_AS), n=1, cutoff=0.75)
    return f" (did you mean {_KNOWN_AS[alias[0]]!r}?)" if alias and _KNOWN_AS[alias[0]] in valid else ""


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            hint = _key_hint(str(e["loc"][-1]), _keys_at(e["loc"][:-1]))
            lines.append(f"  {path}: unknown key{hint}; remove it or check the spelling")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"  {path}: {msg}{got_s}")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse one ``key.path=value`` override; the value is read as YAML (so 3e-4, true, [1,2])."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.path=value, e.g. train.lr=3e-4")
    key, raw = item.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from exc
    return keys, value


def _apply_override(tree: dict, keys: list[str], value: Any) -> None:
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(keys)}: {k} is not a section")
        node = child
    node[keys[-1]] = value


def default_recipe_text() -> str:
    """The embedded default recipe, as YAML text."""
    return resources.files("distill").joinpath("recipes/default.yaml").read_text()


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a recipe (or the embedded default when ``path`` is None) and apply overrides.

    Raises:
        ConfigError: unknown key, wrong type, unreadable YAML; the message names the key path.
    """
    return load_config_with_notes(path, overrides)[0]


def load_config_with_notes(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> tuple[RunConfig, list[str]]:
    """``load_config``, and one line for each recipe value the teacher signal turned off (e.g.
    ``train.hidden_weight`` with ``--set cache.use=true``); a conflicting value set in ``overrides``
    is refused instead.

    Raises:
        ConfigError: unknown key, wrong type, unreadable YAML; the message names the key path.
    """
    if path is None:
        source, text = "embedded default recipe", default_recipe_text()
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        source, text = str(p), p.read_text()
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections")
    explicit: set[str] = set()
    for item in overrides or []:
        keys, value = parse_override(item)
        _apply_override(tree, keys, value)
        explicit.add(".".join(keys))
    if overrides:
        source += " + --set " + " ".join(overrides)
    notes: list[str] = []
    try:
        cfg = RunConfig.model_validate(tree, context={"explicit": explicit, "notes": notes})
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None
    return cfg, notes


def dump_config(cfg: RunConfig, path: str | Path, header: str = "") -> None:
    """Write the resolved config as YAML (it holds no secrets: keys are named, never stored), after
    ``header``: comment lines (``distill.core.terms.Terms.comment``), which add no key."""
    if any(line and not line.startswith("#") for line in header.splitlines()):
        raise ValueError("a config header is comment lines only")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    from distill.core.fsio import write_text

    write_text(Path(path), header + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def _quoted(value: str) -> str:
    """A string as a YAML scalar that reads back as the same string (a path named 'null', '1e3')."""
    return json.dumps(value)


def quick_start_overrides(
    sets: list[str] | None = None,
    *,
    teacher: str | None = None,
    student: str | None = None,
    data: str | Path | None = None,
    api_base: str | None = None,
) -> list[str]:
    """The ``--set`` overrides the quick-start flags stand for, then ``sets``.

    ``teacher``: a model reference (teacher.kind=local, teacher.model), or with ``api_base`` the
    model name the server expects (teacher.kind=openai, teacher.api.base_url, teacher.api.model,
    teacher.model=null). ``student``: ``shrink`` (student.init=shrink) or a model reference
    (student.init=model, student.model). ``data``: data.path.

    Raises:
        ConfigError: ``--api-base`` without ``--teacher``, or a flag and a ``--set`` naming the
            same key (or a section holding it): the value would depend on which one wins.
    """
    if api_base is not None and teacher is None:
        raise ConfigError("--api-base needs --teacher: the model name the server expects, e.g. gpt-4o-mini")
    flags: list[tuple[str, str, str]] = []  # (flag, key, value as YAML)
    if api_base is not None:
        flags += [("--api-base", "teacher.kind", "openai"), ("--api-base", "teacher.model", "null"),
                  ("--api-base", "teacher.api.base_url", _quoted(api_base)),
                  ("--teacher", "teacher.api.model", _quoted(teacher))]  # fmt: skip
    elif teacher is not None:
        flags += [("--teacher", "teacher.kind", "local"), ("--teacher", "teacher.model", _quoted(teacher))]
    if student == "shrink":
        flags.append(("--student", "student.init", "shrink"))
    elif student is not None:
        flags += [("--student", "student.init", "model"), ("--student", "student.model", _quoted(student))]
    if data is not None:
        flags.append(("--data", "data.path", _quoted(str(data))))
    for item in sets or []:
        named = ".".join(parse_override(item)[0])
        for flag, key, _ in flags:
            if named == key or key.startswith(named + ".") or named.startswith(key + "."):
                raise ConfigError(
                    f"{flag} sets {key}, and --set {item} names it too: give it once, with the flag "
                    "or with --set"
                )
    return [f"{key}={value}" for _, key, value in flags] + list(sets or [])
