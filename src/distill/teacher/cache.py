"""Offline teacher signal: the teacher's top-k log-probs, computed once and stored in shards.

Layout of a cache folder::

    meta.json                 what produced it: teacher, weights and tokenizer hashes, k, ...
    shard-00000.safetensors   ids (M, k) uint16/int32, logprobs (M, k) float16, tail (M,) float16,
                              with tail samples also sample_ids (M, m), sample_logprobs (M, m)
    shard-00000.sha256        checksum of the shard, written before the shard becomes visible

A shard holds a fixed, deterministic group of samples, and its safetensors metadata
lists them (key, first row, row count). A sample's key is a hash of its token ids,
so the cache does not depend on the order training visits samples. A shard appears
under its final name only once written, fsynced and checksummed (atomic rename), so
a killed ``distill cache`` resumes by skipping the shards that exist.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel

from distill import __version__
from distill.core import fsio, interrupt
from distill.core.data import Batch, collate
from distill.core.progress import progress_bar
from distill.losses.divergences import TopKTeacher
from distill.teacher.crosstok import ROW_FIELDS, CrossTeacher
from distill.teacher.signal import sample_key

Example = tuple[list[int], list[bool]]


class CacheError(ValueError):
    """A cache that does not match the run, or is damaged."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def weights_hash(folder: Path) -> str:
    """Hash of a model folder's safetensors files (names and bytes)."""
    h = hashlib.sha256()
    for f in sorted(Path(folder).glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()[:32]


def tokenizer_hash(tok) -> str:
    """Hash of the vocabulary and special tokens: what decides token ids."""
    vocab = sorted(tok.get_vocab().items())
    blob = json.dumps([vocab, tok.all_special_tokens], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


@dataclass(frozen=True)
class CacheMeta:
    """What a cache holds and what produced it; compared with the run before training."""

    teacher: str
    teacher_weights_hash: str
    tokenizer_hash: str
    vocab_size: int
    k: int
    scoring_temperature: float
    id_dtype: str
    logprob_dtype: str
    samples_per_shard: int
    num_samples: int
    tail_samples: int = 0  # ids drawn per position from the teacher's mass outside the top k
    samples_hash: str = ""  # of the sorted sample keys: which training sequences the shards hold
    version: str = __version__
    # across tokenizers (CrossTeacher.item_parts): the method and the student's tokenizer; "off": a
    # token-level cache, rows at the student's positions in the one shared vocabulary
    cross_tokenizer: str = "off"
    student_tokenizer_hash: str = ""
    cross_rows: str = ""  # which student positions get a row, and how (crosstok.CROSS_ROWS)

    def check_against(self, expected: dict) -> None:
        """Raise ``CacheError`` naming every field that differs from ``expected``."""
        diffs = [
            f"{k}: cache has {getattr(self, k)!r}, run needs {v!r}"
            for k, v in expected.items()
            if getattr(self, k) != v
        ]
        if diffs:
            raise CacheError("teacher cache does not match this run:\n  " + "\n  ".join(diffs))

    def check_samples(self, samples_hash: str, cache_dir: Path) -> None:
        """Refuse to add shards to a cache begun for other training sequences (answers regenerated,
        the split or the filter changed since): its shards would hold some of each."""
        if self.samples_hash and self.samples_hash != samples_hash:
            raise CacheError(
                f"{cache_dir} was begun for other training sequences than this run's (answers.jsonl, "
                f"the split or the filter changed since); delete {cache_dir} and run distill cache again"
            )


def samples_hash(keys: list[str]) -> str:
    """One hash for a set of sample keys (order does not matter)."""
    return hashlib.sha256("\n".join(sorted(set(keys))).encode()).hexdigest()[:16]


def _target_rows(example: Example) -> list[int]:
    """Positions t whose next token t + 1 is a counted (answer) token."""
    _, mask = example
    return [t for t in range(len(mask) - 1) if mask[t + 1]]


def _tail_samples(lp: torch.Tensor, ids: torch.Tensor, m: int, key: str) -> tuple[np.ndarray, np.ndarray]:
    """``m`` ids per row drawn (with replacement) from the teacher's distribution outside its
    top-k ``ids``, and their log-probs; -inf log-probs where a row has no tail to draw from.
    The draw is seeded by the sample's key, so a cache is the same however it is built."""
    probs = lp.exp().scatter(-1, ids, 0.0)  # (n, V): the tail only
    has_tail = probs.sum(-1) > 1e-12
    s_ids = torch.zeros((lp.shape[0], m), dtype=torch.long)
    gen = torch.Generator().manual_seed(int(key[:15], 16))
    if has_tail.any():
        s_ids[has_tail] = torch.multinomial(probs[has_tail], m, replacement=True, generator=gen)
    s_lp = lp.gather(-1, s_ids).masked_fill(~has_tail[:, None], float("-inf"))
    return s_ids.numpy(), s_lp.numpy()


@torch.no_grad()
def _score(model: PreTrainedModel, batch: list[Example], pad_id: int, k: int, temperature: float,
           tail_samples: int = 0):  # fmt: skip
    """Top-k ids, log-probs and tail log-mass for the counted positions of each example, and
    with ``tail_samples`` the tail samples' ids and log-probs."""
    b = collate(batch, pad_id).to(model.device)
    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.float()  # (B, T, V)
    logp = torch.log_softmax(logits / temperature, -1).cpu()
    out = []
    for i, ex in enumerate(batch):
        rows = torch.tensor(_target_rows(ex), dtype=torch.long)
        lp = logp[i, rows]  # (n, V)
        vals, ids = lp.topk(k, -1)  # (n, k) each
        tail = torch.log((-torch.expm1(torch.logsumexp(vals, -1).clamp_max(0))).clamp_min(1e-30))
        row = (ids.numpy(), vals.numpy(), tail.numpy())
        if tail_samples:
            row += _tail_samples(lp, ids, tail_samples, sample_key(ex[0]))
        out.append(row)
    return out


def build_cache(
    teacher: PreTrainedModel | Callable[[list[Example]], list[tuple]],
    examples: list[Example],
    out_dir: Path,
    meta: CacheMeta,
    *,
    pad_id: int,
    batch_size: int = 8,
) -> Path:
    """Score every example with the teacher and write the shards (resumes; skips done shards).

    ``teacher`` is a model, or a function giving each example's rows ``(ids (n, k),
    logprobs (n, k), tail log-mass (n,))`` (e.g. log-probs an API returned), followed by
    ``(sample ids (n, m), sample log-probs (n, m))`` when ``meta.tail_samples`` is m > 0.
    """
    uniq = {sample_key(ex[0]): ex for ex in examples}
    meta = _begin(out_dir, meta, list(uniq))
    keys = sorted(uniq)
    id_np = np.uint16 if meta.id_dtype == "uint16" else np.int32
    if isinstance(teacher, torch.nn.Module):
        model = teacher.eval()

        def teacher(batch: list[Example]) -> list[tuple]:
            return _score(model, batch, pad_id, meta.k, meta.scoring_temperature, meta.tail_samples)

    for path, group, done in _missing_shards(out_dir, keys, meta.samples_per_shard):
        fields = _FIELDS[: 5 if meta.tail_samples else 3]
        parts: dict[str, list[np.ndarray]] = {name: [] for name in fields}
        index, start = [], 0
        for j in range(0, len(group), batch_size):
            chunk = group[j : j + batch_size]
            scored = teacher([uniq[c] for c in chunk])
            for key, row in zip(chunk, scored, strict=True):
                if len(row) != len(parts):
                    got, need = len(row), len(parts)
                    raise CacheError(f"the teacher scorer gave {got} arrays per sample, not {need}")
                for (name, arrays), a in zip(parts.items(), row, strict=True):
                    arrays.append(a.astype(id_np if name.endswith("ids") else np.float16))
                index.append([key, start, len(row[0])])
                start += len(row[0])
        _write_shard(path, parts, index, {"ids": meta.k, "sample_ids": meta.tail_samples}, id_np)
        done.append(f"{start} tokens")
    return out_dir


_FIELDS = ("ids", "logprobs", "tail", "sample_ids", "sample_logprobs")  # a shard's tensors, in row order


def _missing_shards(out_dir: Path, keys: list[str], per_shard: int):
    """``(path, sample keys, done)`` for each shard of ``keys`` (sorted) not yet written, in order, under
    a progress bar; the caller writes the shard whole and appends a line for the bar to ``done``.
    Between shards a stop request ends the build (the shards written stay; the same command resumes)."""
    n_shards = (len(keys) + per_shard - 1) // per_shard
    with progress_bar("shard") as bar:
        task = bar.add_task("teacher cache", total=n_shards, info="")
        for s in range(n_shards):
            path = out_dir / f"shard-{s:05d}.safetensors"
            if path.is_file():
                bar.update(task, advance=1, info="exists")
                continue
            done: list[str] = []
            yield path, keys[s * per_shard : (s + 1) * per_shard], done
            bar.update(task, advance=1, info=done[-1] if done else "")
            if s + 1 < n_shards:
                interrupt.check(f"stopped after shard {s + 1} of {n_shards}, each written whole to "
                                f"{out_dir}; run the same command again to resume")  # fmt: skip


def _begin(out_dir: Path, meta: CacheMeta, keys: list[str]) -> CacheMeta:
    """``meta`` with the samples' hash, written to a new cache folder, or checked against the one a
    folder begun earlier holds (a resumed build adds to it only for the same samples and settings)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path = out_dir / "meta.json"
    meta = dataclasses.replace(meta, samples_hash=samples_hash(keys))
    if meta_path.is_file():
        old = CacheMeta(**json.loads(meta_path.read_text()))
        old.check_samples(meta.samples_hash, out_dir)
        old.check_against({k: v for k, v in meta.__dict__.items() if k not in ("version", "samples_hash")})
    else:
        fsio.write_text(meta_path, json.dumps(meta.__dict__, indent=1))
    return meta


def _write_shard(path: Path, parts: dict[str, list[np.ndarray]], index, widths: dict[str, int], id_np):
    def empty(name: str) -> np.ndarray:
        width = widths["sample_ids" if name.startswith("sample") else "ids"]
        return np.zeros((0,) if name == "tail" else (0, width), id_np if name.endswith("ids") else np.float16)

    tensors = {name: np.concatenate(arrays) if arrays else empty(name) for name, arrays in parts.items()}
    tmp = path.with_name(path.name + ".tmp")
    side = path.with_suffix(".sha256")
    side_tmp = side.with_name(side.name + ".tmp")
    try:
        digest = fsio.save_safetensors(tensors, tmp, metadata={"index": json.dumps(index)}, name=path)
        fsio.write_bytes(side_tmp, (digest + "\n").encode())
    except BaseException:
        tmp.unlink(missing_ok=True)  # a half-written shard does not stay behind
        side_tmp.unlink(missing_ok=True)
        raise
    os.replace(side_tmp, side)
    os.replace(tmp, path)  # the shard becomes visible last, complete and checksummed
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


_VERIFIED = "verified.json"  # shard -> [size, mtime_ns, sha256] when last hashed and found intact


def verify_cache(cache_dir: Path, *, quick: bool = False) -> list[str]:
    """Problems found (empty when every shard matches its checksum).

    ``quick``: a shard whose size, modification time and checksum file are those recorded when it
    was last hashed and found intact is not read again (training starts then cost a ``stat`` per
    shard, not a pass over the whole cache); any other shard is hashed. ``distill cache --verify``
    hashes every shard.
    """
    stamp_path = cache_dir / _VERIFIED
    try:
        stamp = json.loads(stamp_path.read_text()) if quick and stamp_path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        stamp = {}
    problems, fresh = [], {}
    for shard in sorted(cache_dir.glob("shard-*.safetensors")):
        side = shard.with_suffix(".sha256")
        if not side.is_file():
            problems.append(f"{shard.name}: checksum file missing")
            continue
        want = side.read_text().strip()
        st = shard.stat()
        seen = [st.st_size, st.st_mtime_ns, want]
        if stamp.get(shard.name) == seen or file_sha256(shard) == want:
            fresh[shard.name] = seen
        else:
            problems.append(f"{shard.name}: checksum mismatch (corrupted); delete it and rerun distill cache")
    if fresh != stamp:
        try:
            tmp = stamp_path.with_name(_VERIFIED + f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(fresh))
            os.replace(tmp, stamp_path)
        except OSError:
            pass  # a read-only cache is only hashed again next time
    return problems


_NP_DTYPES = {"U16": np.uint16, "I32": np.int32, "I64": np.int64, "F16": np.float16, "F32": np.float32}


def _shard_header(path: Path) -> tuple[int, dict]:
    """(where the tensor data starts, the safetensors header) of a shard, reading only the header."""
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return 8 + size, json.loads(f.read(size))


def _map_shard(path: Path) -> dict[str, np.ndarray]:
    """A shard's tensors as read-only views of one memory map of the file (nothing is read yet)."""
    start, header = _shard_header(path)
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, info in header.items():
        if name != "__metadata__":
            begin, end = info["data_offsets"]
            dtype = np.dtype(_NP_DTYPES[info["dtype"]])
            out[name] = buf[start + begin : start + end].view(dtype).reshape(info["shape"])
    return out


class _ShardRows(Mapping):
    """Sample key -> that sample's rows of each field, from memory-mapped shards. Only the shard
    headers are read up front; the most recently used shards stay mapped (at most ``open_shards``)."""

    def __init__(self, shards: list[Path], fields: tuple[str, ...], open_shards: int = 256) -> None:
        self.shards, self.fields = shards, fields
        self.where: dict[str, tuple[int, int, int]] = {}  # key -> (shard, first row, rows)
        for s, path in enumerate(shards):
            for key, first, n in json.loads(_shard_header(path)[1]["__metadata__"]["index"]):
                self.where[key] = (s, first, n)
        self._mapped = functools.lru_cache(maxsize=open_shards)(lambda s: _map_shard(self.shards[s]))

    def __getitem__(self, key: str) -> tuple[np.ndarray, ...]:
        s, first, n = self.where[key]
        tensors = self._mapped(s)
        return tuple(tensors[name][first : first + n] for name in self.fields)

    def __contains__(self, key: object) -> bool:
        return key in self.where

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


def _open(cache_dir: Path, expected: dict | None) -> CacheMeta:
    """A cache folder's ``meta.json``, checked against what the run needs (``expected``), once every
    shard is found intact (``verify_cache``, quick): nothing reads a damaged shard's header."""
    meta_path = cache_dir / "meta.json"
    if not meta_path.is_file():
        raise CacheError(f"{cache_dir} is not a teacher cache (no meta.json): run `distill cache`")
    meta = CacheMeta(**json.loads(meta_path.read_text()))
    if expected:
        meta.check_against(expected)
    problems = verify_cache(cache_dir, quick=True)
    if problems:
        raise CacheError(f"teacher cache {cache_dir} is damaged:\n  " + "\n  ".join(problems))
    return meta


def _require_samples(cache_dir: Path, missing: int, needed: int) -> None:
    if missing:
        raise CacheError(
            f"teacher cache {cache_dir} lacks {missing} of {needed} training samples "
            "(different data, tokenizer or max_seq_len?); rerun `distill cache`"
        )


class CachedTeacher:
    """The teacher signal read from a cache; the teacher model is never loaded."""

    def __init__(
        self,
        cache_dir: Path,
        expected: dict | None = None,
        examples: list[Example] | None = None,
        tail: str = "auto",
    ):
        """``tail``: how the losses treat the mass outside the k ids (``TopKTeacher``); ``auto``
        takes the tail samples when the cache holds them, else a bucket."""
        self.meta = _open(cache_dir, expected)
        if tail == "auto":  # tail mass and samples are known only at temperature 1
            tail = ("renormalize" if self.meta.scoring_temperature != 1.0
                    else "sample" if self.meta.tail_samples else "bucket")  # fmt: skip
        if tail != "renormalize" and self.meta.scoring_temperature != 1.0:
            raise CacheError(
                f"cache.tail {tail!r} needs a cache scored at temperature 1; {cache_dir} was scored at "
                f"{self.meta.scoring_temperature}: use cache.tail: renormalize"
            )
        self.tail = tail
        if tail == "sample" and not self.meta.tail_samples:
            raise CacheError(
                f"cache.tail is 'sample' but {cache_dir} holds no tail samples (tail_samples: 0); "
                "set cache.tail_samples (e.g. 4) and rerun `distill cache`, or use cache.tail: bucket"
            )
        # key -> (ids, logprobs, tail[, sample_ids, sample_logprobs]) rows of that sample,
        # read from memory-mapped shards: a cache larger than RAM trains as well as a small one
        self.rows = _ShardRows(
            sorted(cache_dir.glob("shard-*.safetensors")), _FIELDS[: 5 if self.meta.tail_samples else 3]
        )
        examples = examples or []
        _require_samples(cache_dir, sum(sample_key(ex[0]) not in self.rows for ex in examples), len(examples))

    def signal(self, batch: Batch, *, lazy: bool = False) -> TopKTeacher:
        """Top-k teacher for the shifted positions of ``batch``: ``(B, T-1, k)`` ids and log-probs.

        With ``tail="bucket"`` the losses give the mass outside the k ids its own outcome on
        both sides, so a student is also pulled to keep little mass where the teacher has little;
        with ``tail="sample"`` the stored tail samples stand for that mass, id by id.
        """
        b, t = batch.input_ids.shape
        k, m = self.meta.k, self.meta.tail_samples if self.tail == "sample" else 0
        ids = torch.zeros((b, t - 1, k), dtype=torch.long)
        lps = torch.full((b, t - 1, k), float("-inf"))
        tails = torch.zeros((b, t - 1))
        s_ids = torch.zeros((b, t - 1, m), dtype=torch.long)
        s_lps = torch.full((b, t - 1, m), float("-inf"))
        mask = batch.answer_mask[:, 1:]
        for i, start, n_tok in batch.samples():
            key = sample_key(batch.input_ids[i, start : start + n_tok].tolist())
            if key not in self.rows:
                raise CacheError(f"sample {key} is not in the teacher cache; rerun `distill cache`")
            c_ids, c_lp, c_tail, *c_samples = self.rows[key]
            pos = mask[i, start : start + n_tok - 1].nonzero().squeeze(-1) + start
            if len(pos) != len(c_ids):
                raise CacheError(f"sample {key}: cache has {len(c_ids)} rows, batch counts {len(pos)}")
            ids[i, pos] = torch.from_numpy(c_ids.astype(np.int64))
            lps[i, pos] = torch.from_numpy(c_lp.astype(np.float32))
            tails[i, pos] = torch.from_numpy(c_tail.astype(np.float32))
            if m:
                s_ids[i, pos] = torch.from_numpy(c_samples[0].astype(np.int64))
                s_lps[i, pos] = torch.from_numpy(c_samples[1].astype(np.float32))
        dev = batch.input_ids.device
        samples = (s_ids.to(dev), s_lps.to(dev)) if m else (None, None)
        return TopKTeacher(ids.to(dev), lps.to(dev), self.tail, tails.to(dev), *samples,
                           temperature=self.meta.scoring_temperature)  # fmt: skip


# a cross-tokenizer shard's tensors: per distribution row, then per multi-token chunk (span)
_CROSS_FIELDS = {"span": (*ROW_FIELDS["span"], "chunk_teacher"), "uld": ROW_FIELDS["uld"]}


_CROSS_DTYPES = {"ids": np.int32, "logprobs": np.float16, "sorted": np.float16, "tail": np.float16,
                 "chunk_teacher": np.float32}  # fmt: skip


def build_cross_cache(teacher: CrossTeacher, out_dir: Path, meta: CacheMeta, *, batch_size: int = 8) -> Path:
    """The teacher's side of every training sample of a run across tokenizers
    (``CrossTeacher.item_parts``: its top-k mapped into the student's vocabulary, or its sorted
    probabilities, and its log-probability of each multi-token chunk), in shards as ``build_cache``
    writes them (resumes; each shard appears whole and checksummed). A shard's index holds
    ``[key, first row, rows, first chunk, chunks]`` per sample."""
    keys = sorted(teacher.items)
    meta = _begin(out_dir, meta, keys)
    fields = _CROSS_FIELDS[meta.cross_tokenizer]
    for path, group, done in _missing_shards(out_dir, keys, meta.samples_per_shard):
        parts: dict[str, list[np.ndarray]] = {name: [] for name in fields}
        index, row, chunk = [], 0, 0
        for j in range(0, len(group), batch_size):
            batch = group[j : j + batch_size]
            for key, part in zip(batch, teacher.item_parts([teacher.items[k] for k in batch]), strict=True):
                for name in fields:
                    parts[name].append(part[name].cpu().numpy().astype(_CROSS_DTYPES[name]))
                n, c = len(part[fields[0]]), len(part.get("chunk_teacher", ()))
                index.append([key, row, n, chunk, c])
                row, chunk = row + n, chunk + c
        _write_shard(path, parts, index, {"ids": meta.k, "sample_ids": 0}, np.int32)
        done.append(f"{row} rows")
    return out_dir


class CachedCrossTeacher(CrossTeacher):
    """A ``CrossTeacher`` whose signal for the training samples is read from a cache
    (``build_cross_cache``); ``model`` (optional) scores only samples the cache cannot hold: the
    student's own, on-policy."""

    def __init__(self, cache_dir: Path, expected: dict, items: dict, *, model=None, **kw) -> None:
        self.meta = _open(cache_dir, expected)
        self.shards = sorted(cache_dir.glob("shard-*.safetensors"))
        self.where: dict[str, tuple[int, int, int, int, int]] = {}
        for s, path in enumerate(self.shards):
            for key, row, n, chunk, c in json.loads(_shard_header(path)[1]["__metadata__"]["index"]):
                self.where[key] = (s, row, n, chunk, c)
        _require_samples(cache_dir, sum(k not in self.where for k in items), len(items))
        self._mapped = functools.lru_cache(maxsize=256)(lambda s: _map_shard(self.shards[s]))
        super().__init__(model, items, **kw)

    def parts_for(self, keys: list[str], items: list) -> list[dict[str, torch.Tensor]]:
        out: list = [None] * len(keys)
        live = [j for j, key in enumerate(keys) if key not in self.where]
        if live:  # the student's own samples: graded by the model, live
            for j, part in zip(live, self.item_parts([items[j] for j in live]), strict=True):
                out[j] = part
        for j, key in enumerate(keys):
            if key in self.where:
                s, row, n, chunk, c = self.where[key]
                tensors = self._mapped(s)
                part = {}
                for name in _CROSS_FIELDS[self.meta.cross_tokenizer]:
                    rows = (
                        tensors[name][chunk : chunk + c]
                        if name == "chunk_teacher"
                        else tensors[name][row : row + n]
                    )
                    part[name] = torch.from_numpy(
                        np.array(rows, np.int64 if name == "ids" else np.float32)
                    )  # a copy
                out[j] = part
        return out
