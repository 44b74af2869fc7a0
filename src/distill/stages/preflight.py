"""Everything about a run that can be checked before expensive work, checked at its start.

A typo found after an hour of teacher generation is a bug: loss names and value ranges are checked
by the config schema; this module checks the config against the files it names (prompts, models)
without loading any weights: a GGUF's header or a folder's config.json is enough to know its
architecture, depth, width and vocabulary.
"""

from __future__ import annotations

from pathlib import Path

from distill.core.config import ConfigError, RunConfig
from distill.core.data import read_general_text, read_prompts
from distill.core.hardware import resolve_device
from distill.core.models import ModelFacts, model_facts, resolve_gguf
from distill.core.units import parse_count


def _check_layers(cfg: RunConfig, teacher: ModelFacts) -> None:
    n = teacher.num_layers
    s = cfg.student
    if s.layers is not None:
        bad = [i for i in s.layers if not 0 <= i < n]
        if bad:
            raise ConfigError(
                f"student.layers: {bad} out of range; teacher {teacher.ref} has layers 0..{n - 1}"
            )
        if sorted(set(s.layers)) != list(s.layers):
            raise ConfigError(f"student.layers: {s.layers} must be increasing, without repeats")
    elif s.num_layers > n:
        raise ConfigError(
            f"student.num_layers={s.num_layers}: teacher {teacher.ref} has only {n} layers; "
            f"choose 1..{n} (fewer layers: a smaller, faster student)"
        )
    heads, kv = teacher.num_heads, teacher.num_kv_heads
    if s.num_heads is not None and heads and (s.num_heads > heads or s.num_heads % kv):
        raise ConfigError(f"student.num_heads={s.num_heads}: teacher {teacher.ref} has {heads} heads sharing "
                          f"{kv} key/value heads; choose a multiple of {kv} up to {heads}")  # fmt: skip
    if s.intermediate_size is not None and s.intermediate_size > teacher.intermediate_size:
        raise ConfigError(f"student.intermediate_size={s.intermediate_size}: teacher {teacher.ref} has "
                          f"{teacher.intermediate_size} MLP channels per layer; choose fewer")  # fmt: skip
    if s.hidden_size is not None:
        from distill.student.prune import HIDDEN_PRUNABLE

        if s.hidden_size > teacher.hidden_size:
            raise ConfigError(f"student.hidden_size={s.hidden_size}: teacher {teacher.ref} has a "
                              f"{teacher.hidden_size}-wide residual stream; choose fewer")  # fmt: skip
        h = s.num_heads or teacher.num_heads
        if h and s.hidden_size % h:
            lo, hi = s.hidden_size // h * h, (s.hidden_size // h + 1) * h
            raise ConfigError(f"student.hidden_size={s.hidden_size}: transformers wants the width to be a "
                              f"multiple of the {h} attention heads; choose {lo or h} or {hi}")  # fmt: skip
        if teacher.architecture not in HIDDEN_PRUNABLE:
            raise ConfigError(f"student.hidden_size: hidden-size pruning is written for "
                              f"{', '.join(HIDDEN_PRUNABLE)} models, and teacher {teacher.ref} is "
                              f"{teacher.architecture!r}; leave it null")  # fmt: skip
    if s.target_params is not None:
        embed = teacher.vocab_size * teacher.hidden_size
        if parse_count(s.target_params) <= embed:
            raise ConfigError(f"student.target_params={s.target_params}: the embeddings of "
                              f"teacher {teacher.ref} alone have {embed / 1e6:.1f}M parameters; "
                              "aim higher")  # fmt: skip


def check_run(cfg: RunConfig) -> dict[str, ModelFacts]:
    """Check ``cfg`` against the prompts and models it names; returns the models' facts by role.

    Raises:
        ConfigError / DataError / ModelError / ModelNotFoundError: one clear message, before any
        run folder is made or any weight is loaded.
    """
    prompts = read_prompts(cfg.data.path, cfg.data.format)  # encoding, fields, duplicate ids
    n = min(len(prompts), cfg.data.max_prompts or len(prompts))
    if cfg.data.heldout_size >= n:
        raise ConfigError(
            f"data.heldout_size={cfg.data.heldout_size} leaves no training prompts ({n} in all)"
        )
    if cfg.heal.data:
        read_general_text(cfg.heal.data)  # there, UTF-8, and with text in it
    if cfg.evaluate.tasks:
        from distill.evaluate.tasks import check_code_sandbox, load_task

        for spec in cfg.evaluate.tasks:  # there, readable, every prompt with a reference
            load_task(spec, cfg.evaluate.task_size)
        check_code_sandbox(cfg.evaluate)  # humaneval: a sandbox, or evaluate.unsafe_code=true
    try:
        resolve_device(cfg.teacher.device)
    except ValueError as exc:
        raise ConfigError(f"teacher.device: {exc}") from None
    facts: dict[str, ModelFacts] = {}
    trust = cfg.teacher.trust_remote_code
    if cfg.teacher.model:
        facts["teacher"] = model_facts(cfg.teacher.model, trust_remote_code=trust)
        if cfg.teacher.engine == "llama_cpp" and resolve_gguf(cfg.teacher.model) is None:
            raise ConfigError(
                f"teacher.engine=llama_cpp needs a .gguf teacher; {cfg.teacher.model} is not one"
            )
    if cfg.student.init == "model":
        facts["student"] = model_facts(cfg.student.model, trust_remote_code=trust)
    elif cfg.train.cross_tokenizer != "off":
        raise ConfigError(
            "train.cross_tokenizer is for a student with its own tokenizer (student.init: model); "
            "a shrunk student has the teacher's: set train.cross_tokenizer=off"
        )
    elif "teacher" in facts:
        _check_layers(cfg, facts["teacher"])
    _check_export(cfg, facts)
    _check_final_norms(cfg)
    # a local teacher grades the student's own samples (on-policy rows) id by id, whatever alpha is
    local_grader = cfg.train.onpolicy_fraction > 0 and cfg.teacher.kind == "local"
    if (
        cfg.student.init == "model"
        and cfg.teacher.model
        and (cfg.train.alpha > 0 or cfg.train.cross_tokenizer != "off" or local_grader)
    ):
        _check_tokenizers(cfg, facts)
    vocab = facts.get("teacher", facts.get("student"))
    if cfg.cache.use and vocab is not None and vocab.vocab_size and cfg.cache.k > vocab.vocab_size:
        raise ConfigError(f"cache.k={cfg.cache.k} exceeds the vocabulary ({vocab.vocab_size} tokens)")
    if cfg.cache.use and vocab is not None and cfg.cache.k + cfg.cache.tail_samples > vocab.vocab_size:
        raise ConfigError("cache.k + cache.tail_samples exceeds the vocabulary")
    return facts


def _check_tokenizers(cfg: RunConfig, facts: dict[str, ModelFacts]) -> None:
    """A token-level loss (train.alpha > 0) pairs the two models' logits id by id: refused, with
    the audit, when the tokenizers differ (``distill audit``); a cross-tokenizer loss needs a live
    local teacher on the answer tokens."""
    from distill.teacher.audit import audit_models

    result = audit_models(
        cfg.teacher.model, cfg.student.model, trust_remote_code=cfg.teacher.trust_remote_code
    )
    t = cfg.train
    if t.cross_tokenizer != "off":
        unsupported = {
            "train.hidden_weight": t.hidden_weight > 0,
            "train.prompt_weight": t.prompt_weight > 0,
            "teacher.kind=openai": cfg.teacher.kind == "openai",
        }  # fmt: skip
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ConfigError(f"train.cross_tokenizer={t.cross_tokenizer} needs a live local teacher on the "
                              f"answer tokens; turn off {', '.join(bad)}")  # fmt: skip
        return
    if not result.token_level:
        if t.alpha > 0:
            uses = f"train.alpha={t.alpha} distils the teacher's logits"
        else:
            uses = f"train.onpolicy_fraction={t.onpolicy_fraction} grades the student's samples by logits"
        text_only = "train.alpha=0" + (" and train.onpolicy_fraction=0" if t.onpolicy_fraction > 0 else "")
        raise ConfigError(
            f"{uses} token by token, but {cfg.teacher.model} and "
            f"{cfg.student.model} do not share a tokenizer, so the ids would pair unrelated tokens. "
            + "; ".join(result.lines())
            + f". Set train.cross_tokenizer=span (or uld) for logit-level KD across tokenizers, {text_only} "
            "to train on the teacher's answers as text (sequence-level KD), or choose a student with the "
            "teacher's tokenizer"
        )


def _check_final_norms(cfg: RunConfig) -> None:
    """Hidden-state alignment reads each model's last layer at its final norm (``final_norm``): a
    model without one by a known name is refused now, not at the first training step. Built on the
    meta device from its config (no weights); a GGUF file not yet converted is not checked."""
    if cfg.train.hidden_weight <= 0:
        return
    from distill.core.models import FINAL_NORMS, final_norm, gguf_cache_dir

    refs = {"teacher.model": cfg.teacher.model}
    if cfg.student.init == "model":
        refs["student.model"] = cfg.student.model
    for key, ref in refs.items():
        gguf = resolve_gguf(ref) if ref else None
        folder = gguf_cache_dir(gguf) if gguf is not None else Path(ref or "")
        if not ref or not (folder / "config.json").is_file():
            continue
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        trust = cfg.teacher.trust_remote_code
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust)
        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
        except (RuntimeError, ValueError, TypeError, NotImplementedError):
            continue  # a model that cannot be built without weights: the first step will say
        if final_norm(model) is None:
            raise ConfigError(
                f"train.hidden_weight={cfg.train.hidden_weight} aligns each layer's output read at the "
                f"final norm, and {key} {ref} ({type(model).__name__}) has none named "
                f"{', '.join(FINAL_NORMS)}; set train.hidden_weight=0"
            )


def _check_export(cfg: RunConfig, facts: dict[str, ModelFacts]) -> None:
    """A GGUF export the student's architecture cannot have is refused now, not after training."""
    if "gguf" not in cfg.export.formats:
        return
    arch = (facts.get("student") or facts.get("teacher") or ModelFacts("", "", 0, 0, 0, 0)).architecture
    from distill.export.gguf import EXPORTABLE

    if arch and arch not in EXPORTABLE:
        raise ConfigError(
            f"export.formats: gguf is written for Llama and Gemma 3 students; this one is {arch!r}. "
            "Set export.formats=[hf] and convert the folder with llama.cpp's convert_hf_to_gguf.py"
        )
    # the student's rope scaling is its source's; a GGUF source's was checked with its facts
    source = cfg.student.model if cfg.student.init == "model" else cfg.teacher.model
    if source and resolve_gguf(source) is None:
        from transformers import AutoConfig

        from distill.export.gguf import GGUFExportError, rope_scaling_factor

        config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.teacher.trust_remote_code)
        try:
            rope_scaling_factor(getattr(config, "get_text_config", lambda: config)())
        except GGUFExportError as exc:
            raise ConfigError(f"{exc} (the student's rope scaling is {source}'s)") from None
