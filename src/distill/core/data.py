"""Prompts in: read files, apply the chat template, split, and collate training batches."""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase as Tokenizer

from distill.core.fsio import json_lines


class DataError(ValueError):
    """A prompt file that cannot be read; the message names the file and line or field."""


@dataclass
class Prompt:
    """One prompt: chat messages ending with a user turn, an optional reference answer."""

    id: str
    messages: list[dict[str, str]]
    reference: str | None = None
    meta: dict = field(default_factory=dict)


def _content_id(messages: list[dict[str, str]]) -> str:
    blob = json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha1(blob).hexdigest()[:12]


def _record_to_prompt(rec: dict, where: str) -> Prompt:
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        for m in msgs:
            if not isinstance(m, dict) or not {"role", "content"} <= m.keys():
                raise DataError(f"{where}: every message needs 'role' and 'content', got {m!r}")
        messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in msgs]
        if messages[-1]["role"] != "user":
            raise DataError(f"{where}: the last message must be the user's (role 'user'), the one the "
                            f"teacher answers; this one is {messages[-1]['role']!r}")  # fmt: skip
    elif "prompt" in rec:
        if not isinstance(rec["prompt"], str) or not rec["prompt"].strip():
            raise DataError(f"{where}: 'prompt' must be a non-empty string")
        messages = [{"role": "user", "content": rec["prompt"]}]
    else:
        raise DataError(f"{where}: needs a 'prompt' or a 'messages' field (has {sorted(rec)})")
    ref = rec.get("reference")
    meta = {k: rec[k] for k in ("source", "license") if k in rec}
    if "choices" in rec:  # a labelling ask: the answer names one choice (the reference, when given)
        choices = rec["choices"]
        if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c.strip()
                                                                        for c in choices)):  # fmt: skip
            raise DataError(f"{where}: 'choices' must be a list of two or more labels, got {choices!r}")
        if ref is not None and str(ref).strip().lower() not in [c.strip().lower() for c in choices]:
            raise DataError(f"{where}: the reference {ref!r} must be one of its choices {choices}")
        meta["choices"] = [c.strip() for c in choices]
    explicit = rec.get("id") not in (None, "")
    pid = str(rec["id"]) if explicit else _content_id(messages)
    if explicit:
        meta["_where"] = where  # for the duplicate-id check; dropped there
    return Prompt(pid, messages, None if ref is None else str(ref), meta)


def _read_text(p: Path) -> str:
    """The file's text as UTF-8; a file in another encoding is refused with the line of the first bad byte."""
    raw = p.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{p}:{line}: not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    table = {".jsonl": "jsonl", ".json": "jsonl", ".txt": "txt", ".csv": "csv", ".parquet": "parquet"}
    if suffix not in table:
        raise DataError(f"{path}: cannot tell the format from '{suffix}'; set data.format")
    return table[suffix]


def read_prompts(path: str | Path | None, fmt: str = "auto") -> list[Prompt]:
    """Read prompts from JSONL, TXT (one per line), CSV or Parquet; None = embedded default set.

    Raises:
        DataError: naming the file and the line (JSONL/TXT/CSV) or field at fault.
    """
    if path is None:
        text = resources.files("distill").joinpath("prompts/default.jsonl").read_text()
        return _read_jsonl_lines(text, "embedded prompts/default.jsonl")
    p = Path(path)
    if not p.is_file():
        raise DataError(f"prompt file {p} does not exist")
    kind = _detect_format(p, fmt)
    if kind == "jsonl":
        prompts = _read_jsonl_lines(_read_text(p), str(p))
    elif kind == "txt":
        prompts = [
            _record_to_prompt({"prompt": line.strip()}, f"{p}:{i}")
            for i, line in enumerate(_read_text(p).splitlines(), 1)
            if line.strip()
        ]
    elif kind == "csv":
        import io

        rows = list(csv.DictReader(io.StringIO(_read_text(p), newline="")))
        prompts = [_record_to_prompt(_clean_row(r), f"{p}:{i + 2}") for i, r in enumerate(rows)]
    else:
        try:
            import pandas as pd
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise DataError(f"{p}: reading Parquet needs pandas and pyarrow") from exc
        rows = pd.read_parquet(p).to_dict("records")
        prompts = [_record_to_prompt(_clean_row(r), f"{p} row {i}") for i, r in enumerate(rows)]
    if not prompts:
        raise DataError(f"{p}: no prompts found")
    return _dedupe_ids(prompts)


def _clean_row(row: dict) -> dict:
    out = {}
    for k, v in row.items():
        if v is None or (isinstance(v, float) and v != v) or v == "":
            continue
        if k == "messages" and isinstance(v, str):
            v = json.loads(v)
        elif k == "messages" and not isinstance(v, list):
            v = list(v)  # parquet gives numpy arrays of dicts
        out[k] = v
    return out


def _jsonl_objects(text: str, name: str):
    """``(line number, object)`` for each non-blank line; a line that is not a JSON object is named."""
    for i, line in enumerate(json_lines(text), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{name}:{i}: not valid JSON ({exc.msg})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{name}:{i}: each line must be a JSON object")
        yield i, rec


def _read_jsonl_lines(text: str, name: str) -> list[Prompt]:
    prompts = []
    for i, rec in _jsonl_objects(text, name):
        prompts.append(_record_to_prompt(rec, f"{name}:{i}"))
    return _dedupe_ids(prompts)


def _dedupe_ids(prompts: list[Prompt]) -> list[Prompt]:
    """Refuse two prompts given the same ``id``; identical prompts without one get ``-1``, ``-2``."""
    where: dict[str, str] = {}
    for pr in prompts:
        w = pr.meta.pop("_where", None)
        if w is None:
            continue
        if pr.id in where:
            raise DataError(f"{w}: prompt id {pr.id!r} is already used at {where[pr.id]}; ids must be unique")
        where[pr.id] = w
    seen: dict[str, int] = {}
    for pr in prompts:
        n = seen.get(pr.id, 0)
        seen[pr.id] = n + 1
        if n:
            pr.id = f"{pr.id}-{n}"
    return prompts


def split_prompts(
    prompts: list[Prompt], heldout_size: int, seed: int = 0
) -> tuple[list[Prompt], list[Prompt]]:
    """Deterministic (train, heldout) split: depends on the ids and seed, not the file order."""
    if heldout_size >= len(prompts):
        raise DataError(
            f"data.heldout_size={heldout_size} leaves no training prompts ({len(prompts)} in all)"
        )
    ids = sorted(p.id for p in prompts)
    random.Random(seed).shuffle(ids)
    held = set(ids[:heldout_size])
    return [p for p in prompts if p.id not in held], [p for p in prompts if p.id in held]


def with_system_prompt(prompt: Prompt, system_prompt: str | None) -> Prompt:
    """``prompt`` with ``system_prompt`` as its first turn, unless it has a system turn already."""
    if not system_prompt or prompt.messages[0]["role"] == "system":
        return prompt
    messages = [{"role": "system", "content": system_prompt}, *prompt.messages]
    return Prompt(prompt.id, messages, prompt.reference, prompt.meta)


def _render(tok: Tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` as the model sees them, ending where the answer starts."""
    if tok.chat_template:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tok(text, add_special_tokens=False)["input_ids"])
    text = "\n".join(m["content"] for m in messages) + "\n"
    return list(tok(text)["input_ids"])


def prompt_token_ids(
    tok: Tokenizer, prompt: Prompt, *, system_prompt: str | None = None, max_tokens: int = 256
) -> list[int]:
    """Token ids of the prompt as the model sees it, ending where the answer starts.

    Uses the tokenizer's chat template; a tokenizer without one (a base model)
    gets the turns' text joined by newlines. A prompt longer than ``max_tokens`` loses the
    start of its last user turn's text: BOS, the system turn and the template's headers stay.

    Raises:
        DataError: the prompt does not fit even with that turn's text gone.
    """
    messages = with_system_prompt(prompt, system_prompt).messages
    ids = _render(tok, messages)
    if len(ids) <= max_tokens:
        return ids
    last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=len(messages) - 1)
    content = tok(messages[last]["content"], add_special_tokens=False)["input_ids"]
    cut = len(ids) - max_tokens
    while cut < len(content):
        # Re-encoding the decoded tail can merge tokens differently: cut more until it fits.
        kept = tok.decode(content[cut:])
        trimmed = [*messages[:last], {**messages[last], "content": kept}, *messages[last + 1 :]]
        ids = _render(tok, trimmed)
        if len(ids) <= max_tokens:
            return ids
        cut += max(1, len(ids) - max_tokens)
    raise DataError(
        f"prompt {prompt.id}: its template, system turn and earlier turns alone take more than "
        f"data.max_prompt_tokens={max_tokens} tokens; raise data.max_prompt_tokens or shorten them"
    )


@dataclass
class Batch:
    """A right-padded training batch, or a packed one.

    input_ids: (B, T) int64; attention_mask: (B, T) int64, 1 on sample tokens, 0 on padding;
    answer_mask: (B, T) bool, True where the token belongs to the teacher's answer (the
    positions that are predicted and counted).

    Packed (``position_ids`` set): a row holds several samples one after another, positions
    restarting at 0 for each, so attention stays inside each sample (transformers builds a
    block-diagonal causal mask from position ids when no attention mask is given);
    ``segments[row]`` lists each sample's ``(start, length)``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    answer_mask: torch.Tensor
    position_ids: torch.Tensor | None = None
    segments: list[list[tuple[int, int]]] | None = None

    def to(self, device: torch.device | str) -> Batch:
        pos = None if self.position_ids is None else self.position_ids.to(device)
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.answer_mask.to(device),
                     pos, self.segments)  # fmt: skip

    @property
    def num_target_tokens(self) -> int:
        """Positions whose next token is counted by the loss (after the shift by one)."""
        return int(self.answer_mask[:, 1:].sum())

    def prompt_targets(self) -> torch.Tensor:
        """(B, T-1) bool: positions whose next token is a prompt token of the same sample (prompt
        distillation; a packed row's sample boundaries are not targets)."""
        targets = self.attention_mask[:, 1:].bool() & ~self.answer_mask[:, 1:]
        for row, start, _ in self.samples():
            if start > 0:
                targets[row, start - 1] = False  # predicts the next sample's first token
        return targets

    def model_inputs(self) -> dict:
        """Keyword arguments for a causal LM's forward (no KV cache: a packed mask needs none)."""
        if self.position_ids is None:
            return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "use_cache": False}
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "use_cache": False}

    def samples(self) -> list[tuple[int, int, int]]:
        """``(row, start, length)`` of every sample in the batch."""
        if self.segments is None:
            return [(i, 0, int(n)) for i, n in enumerate(self.attention_mask.sum(1).tolist())]
        return [(i, start, n) for i, row in enumerate(self.segments) for start, n in row]


def prompt_part(ids: list[int], answer_mask: list[bool]) -> list[int]:
    """The prompt of an ``(ids, answer mask)`` example: its tokens before the first answer token."""
    return ids[: answer_mask.index(True)] if True in answer_mask else ids


def make_example(prompt_ids: list[int], answer_ids: list[int], max_len: int) -> tuple[list, list]:
    """Concatenate prompt and answer, truncating the answer to fit ``max_len``."""
    keep = max(0, max_len - len(prompt_ids))
    answer = answer_ids[:keep]
    ids = prompt_ids + answer
    mask = [False] * len(prompt_ids) + [True] * len(answer)
    return ids[:max_len], mask[:max_len]


def collate(examples: list[tuple[list[int], list[bool]]], pad_id: int) -> Batch:
    """Right-pad (ids, answer mask) pairs into a ``Batch``."""
    width = max(len(ids) for ids, _ in examples)
    b = len(examples)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attn = torch.zeros((b, width), dtype=torch.long)
    amask = torch.zeros((b, width), dtype=torch.bool)
    for i, (ids, m) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attn[i, : len(ids)] = 1
        amask[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
    return Batch(input_ids, attn, amask)


# transformers turns packed position ids into a per-sample (block-diagonal) mask only with torch >= 2.6;
# older torch would let packed samples attend to each other, silently.
PACKING_MIN_TORCH = (2, 6)


def pack(examples: list[tuple[list[int], list[bool]]], pad_id: int, max_len: int) -> Batch:
    """Pack (ids, answer mask) pairs into as few rows of at most ``max_len`` tokens as first-fit
    decreasing allows; each sample keeps its own positions (0, 1, ...), so a model given
    ``position_ids`` and no attention mask attends only within each sample."""
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) < PACKING_MIN_TORCH:
        raise ValueError(f"train.packing needs torch >= {'.'.join(map(str, PACKING_MIN_TORCH))} (this is "
                         f"{torch.__version__}): packed samples would attend to each other")  # fmt: skip
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i][0]), i))
    rows: list[list[int]] = []
    fill: list[int] = []
    for i in order:
        n = len(examples[i][0])
        if n > max_len:
            raise ValueError(f"sample of {n} tokens does not fit a packed row of {max_len}")
        for r, used in enumerate(fill):
            if used + n <= max_len:
                rows[r].append(i)
                fill[r] += n
                break
        else:
            rows.append([i])
            fill.append(n)
    width = max(fill)
    b = len(rows)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attn = torch.zeros((b, width), dtype=torch.long)
    amask = torch.zeros((b, width), dtype=torch.bool)
    pos = torch.zeros((b, width), dtype=torch.long)
    segments = []
    for r, members in enumerate(rows):
        start, seg = 0, []
        for i in members:
            ids, m = examples[i]
            n = len(ids)
            input_ids[r, start : start + n] = torch.tensor(ids, dtype=torch.long)
            amask[r, start : start + n] = torch.tensor(m, dtype=torch.bool)
            attn[r, start : start + n] = 1
            pos[r, start : start + n] = torch.arange(n)
            seg.append((start, n))
            start += n
        pos[r, start:] = torch.arange(width - start)  # the padding is a sequence of its own
        segments.append(seg)
    return Batch(input_ids, attn, amask, pos, segments)


def read_general_text(path: str | Path) -> list[str]:
    """The documents of a healing text: ``default`` (the bundled ``prompts/general.txt``), a
    ``.jsonl`` file with a ``"text"`` string per line, or plain text whose documents are separated
    by blank lines.

    Raises:
        DataError: the file is missing, not UTF-8, a JSONL line is not an object with a ``text``
            string, or there is no text at all; the message names the file and line.
    """
    if str(path) == "default":
        name, text = (
            "embedded prompts/general.txt",
            resources.files("distill").joinpath("prompts/general.txt").read_text(),
        )
    else:
        p = Path(path)
        if not p.is_file():
            raise DataError(f"{p}: no such file (heal.data: a .txt or .jsonl of text, or 'default')")
        name, text = str(p), _read_text(p)
    if str(path).endswith(".jsonl"):
        docs = []
        for i, rec in _jsonl_objects(text, name):
            if not isinstance(rec.get("text"), str):
                raise DataError(f'{name}:{i}: each line must be an object with a "text" string')
            docs.append(rec["text"])
    else:
        docs = [d.strip() for d in re.split(r"\n\s*\n", text)]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"{name}: no text in it; the healing stage needs some")
    return docs


def general_text_examples(
    tok, docs: list[str], max_len: int, exclude: list[str] = ()
) -> tuple[list[tuple[list[int], list[bool]]], dict]:
    """Training examples from plain text: the documents, each ended by EOS, run together and cut
    into rows of ``max_len`` tokens, every token a target (``answer_mask`` all True).

    ``exclude``: texts (the held-out prompts) whose documents are dropped, so no held-out prompt
    is trained on; the report counts them.
    """
    needles = [" ".join(x.lower().split()) for x in exclude if x.strip()]
    kept, dropped = [], 0
    for d in docs:
        flat = " ".join(d.lower().split())
        if any(n in flat for n in needles):
            dropped += 1
            continue
        kept.append(d)
    stream: list[int] = []
    for d in kept:
        stream += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    rows = [stream[i : i + max_len] for i in range(0, len(stream), max_len)]
    rows = [r for r in rows if len(r) >= 2]
    examples = [(r, [False] + [True] * (len(r) - 1)) for r in rows]
    return examples, {
        "documents": len(kept),
        "dropped_heldout": dropped,
        "tokens": len(stream),
        "rows": len(rows),
    }


def student_answer_ids(s_tok, text: str, eos: bool) -> list[int]:
    """The student's own tokens of a teacher's answer ``text``, then its EOS when the teacher stopped."""
    ids = token_offsets(s_tok, text)[0]
    return [*ids, s_tok.eos_token_id] if eos and s_tok.eos_token_id is not None else ids


def token_offsets(tok, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """``text``'s token ids without special tokens, and each token's character span."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]
