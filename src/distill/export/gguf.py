"""The student as a GGUF file that llama.cpp (and Ollama) run with no other file, and the check
that the file behaves like the student that was evaluated.

Written with the ``gguf`` package's writer and tensor-name map, as llama.cpp's own converter does:

- metadata: the architecture's hyper-parameters from the student's config (head counts and
  widths as pruning left them: ``key_length`` is written, so a head size other than
  hidden / heads is kept), linear RoPE scaling (``rope_scaling_factor``; other kinds are refused),
  the tokenizer (tokens, types, merges, special ids) and the chat template. Where the teacher is a
  GGUF file with the same vocabulary, its tokenizer fields are copied as they are (they carry
  llama.cpp's pre-tokenizer name, which a Hugging Face folder does not); otherwise they are built
  from the student's byte-level BPE ``tokenizer.json``.
- tensors: Llama's q/k projections are permuted to llama.cpp's rotary layout; Gemma 3's norm
  weights get their +1 (llama.cpp multiplies by the stored weight, transformers by 1 + weight).
  Matrices go in the chosen type (f16, q8_0, q4_0); norms stay f32; a matrix whose rows do not
  split into the type's blocks stays f16.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

TYPES = {"f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0"}


FILE_TYPES = {"f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}


ARCHS = {"llama": "LLAMA", "gemma3_text": "GEMMA3"}  # transformers' model_type -> gguf's MODEL_ARCH


# the same architectures as a model's facts name them (a GGUF header says gemma3)
EXPORTABLE = {*ARCHS, "gemma3"}


class GGUFExportError(ValueError):
    """The student cannot be written as GGUF; the message says why and what to do."""


def _gguf():
    import gguf

    return gguf


def _permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' rotate-half layout of q/k rows -> llama.cpp's interleaved pairs, per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_arch(config) -> str:
    """The GGUF architecture name for a student config, or a clear refusal."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise GGUFExportError(
            f"export.formats: gguf: students of type {model_type!r} are not supported (Llama and Gemma 3 "
            "are); export the Hugging Face folder and convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    if model_type == "llama":
        for field in ("attention_bias", "mlp_bias"):
            if getattr(config, field, False):
                raise GGUFExportError(
                    f"export.formats: gguf: a Llama student with {field}=true is not supported"
                )
    rope_scaling_factor(config)  # refuses a kind of scaling the file cannot say
    if model_type == "gemma3_text":
        _check_gemma3(config)
    return _gguf().MODEL_ARCH_NAMES[getattr(_gguf().MODEL_ARCH, ARCHS[model_type])]


def _rope_kind(rope: dict) -> str:
    return rope.get("rope_type", rope.get("type", "default"))


def rope_scaling_factor(config) -> float | None:
    """The linear RoPE scaling factor of the student's (global) attention layers, None without
    scaling: written as ``{arch}.rope.scaling.type`` ``linear`` and ``{arch}.rope.scaling.factor``, as
    llama.cpp's ``convert_hf_to_gguf.py`` does (llama.cpp divides positions by it). Gemma 3 (4B and
    larger: factor 8) scales its global layers only, and llama.cpp its sliding layers never.

    Raises:
        GGUFExportError: another kind of scaling (YaRN, Llama 3's, dynamic, ...), which llama.cpp
            reads from keys or tensors this exporter does not write, or scaled sliding layers.
    """
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if "full_attention" in rope:  # per layer type (Gemma 3)
        sliding = _rope_kind(rope.get("sliding_attention") or {})
        if sliding != "default":
            raise GGUFExportError(
                f"export.formats: gguf: llama.cpp's Gemma 3 runs its sliding layers without rope scaling; "
                f"this student's sliding layers have {sliding!r} scaling. Set export.formats=[hf]"
            )
        rope = rope["full_attention"] or {}
    kind = _rope_kind(rope)
    if kind == "default":
        return None
    if kind == "linear":
        return float(rope["factor"])
    raise GGUFExportError(
        f"export.formats: gguf: rope scaling of type {kind!r} is not supported (none and linear are); "
        "set export.formats=[hf] and convert the folder with llama.cpp's convert_hf_to_gguf.py"
    )


def _check_gemma3(config) -> None:
    """llama.cpp's Gemma 3 fixes what transformers' config can vary: every 6th layer global, the
    others sliding with rope base 10000, and queries scaled by 1/sqrt(head size)."""
    n = int(config.num_hidden_layers)
    expected = ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(n)]
    types = list(getattr(config, "layer_types", None) or expected)
    if types != expected:
        full = [i for i, t in enumerate(types) if t == "full_attention"]
        raise GGUFExportError(
            "export.formats: gguf: llama.cpp runs Gemma 3 with every 6th layer global (5, 11, ...) and the "
            f"others sliding; this student's global layers are {full}. Keep whole groups of 6 teacher "
            "layers (student.layers), or set export.formats=[hf]"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    local = (rope.get("sliding_attention") or {}).get(
        "rope_theta", getattr(config, "rope_local_base_freq", 1e4)
    )
    if float(local) != 10000.0:
        raise GGUFExportError(
            f"export.formats: gguf: llama.cpp's Gemma 3 uses rope base 10000 on sliding layers, not {local}"
        )
    if getattr(config, "query_pre_attn_scalar", _head_dim(config)) != _head_dim(config):
        raise GGUFExportError(
            "export.formats: gguf: llama.cpp scales Gemma 3 queries by 1/sqrt(head_dim); this student's "
            f"query_pre_attn_scalar is {config.query_pre_attn_scalar}"
        )


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _template_reader(teacher_gguf: Path | None, vocab: list[str], arch: str):
    """The teacher's GGUF reader, if its vocabulary (and architecture) is the student's."""
    if teacher_gguf is None:
        return None
    gguf = _gguf()
    reader = gguf.GGUFReader(str(teacher_gguf))
    field = reader.fields.get("tokenizer.ggml.tokens")
    arch_field = reader.fields.get("general.architecture")
    if field is None or arch_field is None or arch_field.contents() != arch:
        return None
    # SentencePiece vocabularies spell a space "▁" in one place and " " in the other
    same = [t.replace("\u2581", " ") for t in field.contents()] == [t.replace("\u2581", " ") for t in vocab]
    return reader if same else None


def _vocab_from_tokenizer(tok, vocab_size: int) -> tuple[list[str], list[int]]:
    gguf = _gguf()
    by_id = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # the embedding is padded past the tokenizer
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def _write_tokenizer(writer, tok, student_dir: Path, vocab_size: int, template) -> None:
    """Tokenizer fields: copied from the teacher's GGUF when it has this vocabulary, else built."""
    gguf = _gguf()
    if template is not None:
        for key, field in template.fields.items():
            if key.startswith("tokenizer."):
                value = field.contents()
                if field.types[0] == gguf.GGUFValueType.ARRAY:
                    writer.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=field.types[-1])
                else:
                    writer.add_key_value(key, value, field.types[0])
        if "tokenizer.chat_template" not in template.fields and tok.chat_template:
            writer.add_chat_template(tok.chat_template)
        return
    spec = (
        json.loads((student_dir / "tokenizer.json").read_text())
        if (student_dir / "tokenizer.json").is_file()
        else {}
    )
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
        raise GGUFExportError(
            f"export.formats: gguf: the student's tokenizer ({student_dir / 'tokenizer.json'}) is not a "
            "byte-level BPE with GPT-2's pre-tokenizer, and the teacher is not a GGUF file to copy the "
            "tokenizer from; export the Hugging Face folder and convert it with llama.cpp's "
            "convert_hf_to_gguf.py"
        )
    tokens, types = _vocab_from_tokenizer(tok, vocab_size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("pad", writer.add_pad_token_id),
        ("unk", writer.add_unk_token_id),
    ):
        tid = getattr(tok, f"{name}_token_id", None)
        if tid is not None:
            add(int(tid))
    ids = tok("a")["input_ids"]
    writer.add_add_bos_token(bool(ids) and tok.bos_token_id is not None and ids[0] == tok.bos_token_id)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def _write_hparams(writer, config, arch: str, template) -> None:
    gguf = _gguf()
    head_dim = _head_dim(config)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(config.num_key_value_heads))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) and "rope_theta" in rope else None
    if theta is None and isinstance(rope, dict) and "full_attention" in rope:
        theta = rope["full_attention"].get("rope_theta")
    theta = theta or getattr(config, "rope_theta", None) or 10000.0
    writer.add_rope_freq_base(float(theta))
    factor = rope_scaling_factor(config)
    _check_template_rope(template, arch, factor)
    if factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    else:  # gemma3: sliding-window attention; the layer pattern from the teacher, if it says one
        if getattr(config, "sliding_window", None):
            writer.add_sliding_window(int(config.sliding_window))
        if template is not None:
            key = f"{arch}.attention.sliding_window_pattern"
            if key in template.fields:
                writer.add_key_value(key, template.fields[key].contents(), template.fields[key].types[0])


def _check_template_rope(template, arch: str, factor: float | None) -> None:
    """Refuse a student whose rope scaling (``factor``, None: none) is not its GGUF teacher's: the file
    says the student's, as it was trained and evaluated, and a teacher that scales positions otherwise
    means the scaling was lost (or gained) on the way to the student's config."""
    if template is None:
        return
    kind_field = template.fields.get(f"{arch}.rope.scaling.type")
    factor_field = template.fields.get(f"{arch}.rope.scaling.factor")
    kind = "none" if factor_field is None else "linear"  # llama.cpp's default with a factor: linear
    if kind_field is not None:
        kind = str(kind_field.contents())
    theirs = float(factor_field.contents()) if factor_field is not None and kind != "none" else 1.0
    if kind in ("none", "linear") and math.isclose(theirs, factor or 1.0, rel_tol=1e-6):
        return  # (a factor of 1 is no scaling)
    teacher = "none" if kind == "none" else f"{kind}, factor {theirs:g}"
    student = "none" if factor is None else f"linear, factor {factor:g}"
    raise GGUFExportError(
        f"export.formats: gguf: the teacher's GGUF file scales rope positions ({teacher}), the student's "
        f"config otherwise ({student}), and the student was trained and evaluated with its config's. "
        "Set rope_parameters in the student's config.json to the teacher's, or set export.formats=[hf]"
    )


def _write_sampling(writer, student_dir: Path) -> None:
    """The student's generation settings (generation_config.json), as llama.cpp's sampling defaults."""
    path = student_dir / "generation_config.json"
    gen = json.loads(path.read_text()) if path.is_file() else {}
    if not gen.get("do_sample"):
        writer.add_sampling_temp(0.0)  # greedy, as the student was evaluated
        return
    adders = {
        "temperature": writer.add_sampling_temp,
        "top_p": writer.add_sampling_top_p,
        "top_k": writer.add_sampling_top_k,
        "repetition_penalty": writer.add_sampling_penalty_repeat,
    }
    for key, add in adders.items():
        if gen.get(key) is not None:
            add(gen[key])


def _tensor_for(name: str, data: np.ndarray, kind: str):
    """(array, raw type) for one tensor in the file's type."""
    gguf = _gguf()
    if data.ndim < 2 or kind == "f32":
        return data.astype(np.float32), None
    if kind == "f16":
        return data.astype(np.float16), None
    qtype = getattr(gguf.GGMLQuantizationType, TYPES[kind])
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if data.shape[-1] % block:  # rows that do not split into blocks stay f16
        return data.astype(np.float16), None
    return gguf.quants.quantize(data.astype(np.float32), qtype), qtype


def write_gguf(
    student_dir: Path, out: Path, kind: str, teacher_gguf: Path | None = None, name: str = ""
) -> Path:
    """Write the Hugging Face student in ``student_dir`` as one GGUF file of type ``kind``."""
    return write_ggufs(student_dir, {kind: out}, teacher_gguf, name)[kind]


def write_ggufs(
    student_dir: Path, outs: dict[str, Path], teacher_gguf: Path | None = None, name: str = ""
) -> dict[str, Path]:
    """Write the student as one GGUF file per type (``{"f16": path, "q8_0": path}``): the weights,
    tokenizer and metadata are read and converted once, then each file is written from them."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    for kind in outs:
        if kind not in TYPES:
            raise GGUFExportError(f"export.gguf_types: {kind!r} is not one of {', '.join(TYPES)}")
    gguf = _gguf()
    config = AutoConfig.from_pretrained(student_dir)
    arch = gguf_arch(config)
    tok = AutoTokenizer.from_pretrained(student_dir)
    state: dict[str, torch.Tensor] = {}
    for f in sorted(student_dir.glob("*.safetensors")):
        state.update(load_file(f))
    if not state:
        raise GGUFExportError(f"export.formats: gguf: no safetensors weights in {student_dir}")
    vocab, _ = _vocab_from_tokenizer(tok, int(config.vocab_size))
    template = _template_reader(teacher_gguf, vocab, arch)
    tensors = _gguf_tensors(state, config, arch)
    for kind, out in outs.items():
        tmp = out.with_name(out.name + ".tmp")
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(name or student_dir.name)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_file_type(int(getattr(gguf.LlamaFileType, FILE_TYPES[kind])))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _write_hparams(writer, config, arch, template)
        _write_tokenizer(writer, tok, student_dir, int(config.vocab_size), template)
        _write_sampling(writer, student_dir)
        for target, data in tensors:
            array, raw = _tensor_for(target, data, "f32" if data.ndim == 1 else kind)
            writer.add_tensor(target, array, raw_dtype=raw)
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            os.replace(tmp, out)
        except OSError as e:
            writer.close()
            tmp.unlink(missing_ok=True)
            raise GGUFExportError(f"could not write {out}: {e.strerror or e}") from e
    return outs


def _gguf_tensors(state: dict[str, torch.Tensor], config, arch: str) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array as llama.cpp reads it) for each of the student's tensors."""
    gguf = _gguf()
    names = gguf.get_tensor_name_map(
        getattr(gguf.MODEL_ARCH, ARCHS[config.model_type]), int(config.num_hidden_layers)
    )
    embed = state.get("model.embed_tokens.weight")
    tied = getattr(config, "tie_word_embeddings", False)
    out = []
    for key, value in state.items():
        if key.startswith("model.language_model."):
            key = "model." + key.removeprefix("model.language_model.")
        if key == "lm_head.weight" and (tied or (embed is not None and torch.equal(value, embed))):
            continue  # llama.cpp falls back to the token embedding for the output
        if "rotary_emb" in key:
            continue
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise GGUFExportError(f"export.formats: gguf: no GGUF name for the student's tensor {key!r}")
        data = value.float().numpy()
        if arch == "llama" and key.endswith("q_proj.weight"):
            data = _permute_rotary(data, int(config.num_attention_heads))
        elif arch == "llama" and key.endswith("k_proj.weight"):
            data = _permute_rotary(data, int(config.num_key_value_heads))
        if arch == "gemma3" and target.endswith("norm.weight"):
            data = data + 1.0
        out.append((target, data))
    return out


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def open_llama(path: Path, n_ctx: int = 512, threads: int | None = None):
    """A llama.cpp model on the CPU with every position's logits kept."""
    from llama_cpp import Llama

    return Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        logits_all=True,
        verbose=False,
        n_threads=threads or max(1, torch.get_num_threads()),
        seed=0,
    )


def llama_logprobs(llm, ids: list[int]) -> np.ndarray:
    """log p(ids[t] | ids[:t]) for t >= 1, in llama.cpp."""
    llm.reset()
    llm.eval(ids)
    scores = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
    scores -= scores.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(scores).sum(axis=-1))
    return scores[np.arange(len(ids) - 1), ids[1:]] - logz


def llama_greedy(llm, ids: list[int], n: int, eos: int | None) -> list[int]:
    """n tokens of greedy continuation in llama.cpp (argmax of the logits, no sampler)."""
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        if nxt == eos:
            break
        llm.eval([nxt])
    return out


@torch.no_grad()
def hf_logprobs(model, ids: list[int]) -> np.ndarray:
    x = torch.tensor([ids])
    logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].double(), -1)
    return logp[torch.arange(len(ids) - 1), x[0, 1:]].numpy()


@torch.no_grad()
def hf_greedy(model, ids: list[int], n: int, eos: int | None) -> list[int]:
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return out[0, len(ids) :].tolist()


def reference(model, rows: list[tuple[list[int], list[int]]], n_new: int, eos: int | None) -> dict:
    """What the evaluated student does on (prompt ids, answer ids) rows, for the export checks:
    the log-probs of each answer's tokens, teacher-forced, and ``n_new`` tokens of greedy answer."""
    return {
        "logprobs": [hf_logprobs(model, p + a)[len(p) - 1 :] for p, a in rows],
        "greedy": [hf_greedy(model, p, n_new, eos) for p, _ in rows],
    }


def check_gguf(
    paths: dict[str, Path], ref: dict, rows: list[tuple[list[int], list[int]]], n_new: int, eos: int | None
) -> dict:
    """Each GGUF file against the Hugging Face student's ``reference`` on the same rows.

    Per file: the share of prompts whose greedy continuation (``n_new`` tokens) is the same token
    for token; the mean and largest |difference| of the teacher-forced log-probs of the answers;
    the perplexity of the answers, and its ratio to the f16 file's (the cost of quantising).
    """
    ref_lp, ref_greedy = ref["logprobs"], ref["greedy"]
    hf_nll = -float(np.concatenate(ref_lp).mean())
    n_ctx = max(len(p) + max(len(a), n_new) for p, a in rows) + 8
    out: dict = {"prompts": len(rows), "new_tokens": n_new, "hf_perplexity": math.exp(hf_nll), "files": {}}
    for kind, path in paths.items():
        llm = open_llama(path, n_ctx=n_ctx)
        lps = [llama_logprobs(llm, p + a)[len(p) - 1 :] for p, a in rows]
        greedy = [llama_greedy(llm, p, n_new, eos) for p, _ in rows]
        diffs = np.concatenate([np.abs(x - y) for x, y in zip(lps, ref_lp, strict=True)])
        nll = -float(np.concatenate(lps).mean())
        same = [g == r for g, r in zip(greedy, ref_greedy, strict=True)]
        first = [
            next((i for i, (x, y) in enumerate(zip(g, r, strict=False)) if x != y), min(len(g), len(r)))
            for g, r in zip(greedy, ref_greedy, strict=True)
        ]
        out["files"][kind] = {
            "file": path.name,
            "bytes": path.stat().st_size,
            "greedy_match": sum(same) / len(same),
            "greedy_tokens_agreeing_mean": float(np.mean(first)),
            "logprob_abs_diff_mean": float(diffs.mean()),
            "logprob_abs_diff_max": float(diffs.max()),
            "perplexity": math.exp(nll),
        }
        del llm
    base = out["files"].get("f16")
    if base:
        for rec in out["files"].values():
            rec["perplexity_vs_f16"] = rec["perplexity"] / base["perplexity"]
    return out
