"""Logit-level distillation between a teacher and a student with different tokenizers: the parts.

Both models read the same text, each in its own tokens. ``align`` cuts the text at the character
offsets where both tokenisations have a boundary, into chunks of one or more tokens on each side.
Two losses use the chunks:

* **Span alignment** (as in GOLD). Where a chunk is one token on the teacher's side, the teacher's
  next-token distribution before it is carried into the student's vocabulary: each teacher token
  gives its probability to the student token its text begins with (the same text where the student
  has it, `` dist`` for `` distillation`` where it does not: ``token_pieces``), the rest of its mass
  kept as a tail bucket, and compared with the student's by a forward KL. Where the student reads
  that one teacher token as several, its later positions get the chain rule's conditionals from the
  same distribution: after `` dist``, the teacher tokens whose text goes on from `` dist``, divided
  by their mass (``piece_rows``). Where a chunk is several tokens on the teacher's side, each model's
  probability of the chunk's text is the product of its tokens' (the chain rule), and the two are
  compared as the probability of one event: KL(Bernoulli(p_teacher) ‖ Bernoulli(p_student)).
* **Universal Logit Distillation** (Boizard et al., 2024). At the first token of every chunk, where
  both models start predicting the same text, the two probability vectors are sorted and compared
  by their L1 distance (the Wasserstein-1 distance under ULD's assumptions), so no id needs a match.

The teacher's side is reduced to ``k`` numbers per position (its top-k probabilities, sorted, or its
top-k ids mapped into the student's vocabulary) block by block (``teacher_rows``), so its
``(T, V_teacher)`` logits are never kept whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.core.data import student_answer_ids, token_offsets
from distill.losses.cross import chunk_kl, span_kl, uld_loss
from distill.teacher.alignment import AlignmentError, Chunk, align, piece_rows


def head_logits(hidden: Tensor, head: Tensor, bias: Tensor | None, transform) -> Tensor:
    """The logits ``(M, V)``, in float32, that the LM head ``(V, H)`` (and ``bias`` (V,)) and the
    model's logit ``transform`` make of final hidden states ``hidden`` ``(M, H)``."""
    logits = F.linear(hidden.float(), head.float(), None if bias is None else bias.float())
    return transform.apply(logits)[0] if transform is not None else logits


def check_head_logits(name: str, hidden: Tensor, logits: Tensor, head: Tensor, bias: Tensor | None,
                      transform) -> None:  # fmt: skip
    """Refuse a teacher whose logits are not its head's (and bias's) output under its declared logit
    ``transform``: the signal is made from its final hidden states ``hidden`` ``(M, H)`` that way,
    so another transform would teach the wrong distribution, silently. ``logits`` ``(M, V)``: the
    model's own at those positions. The tolerance follows their dtype (bfloat16 rounds each step).

    Raises:
        ModelError: the two differ.
    """
    from distill.core.models import ModelError

    tol = max(1e-3, 4 * torch.finfo(logits.dtype).eps)
    ours = head_logits(hidden, head, bias, transform)
    theirs = logits.to(ours.device).float()
    if not torch.allclose(ours, theirs, rtol=tol, atol=tol):
        diff = float((ours - theirs).abs().max())
        raise ModelError(
            f"{name} makes its logits some other way than its LM head (and bias) and a logit transform "
            f"its config declares (soft-capping, a logit scale): they differ by up to {diff:.3g}. A "
            "teacher with another tokenizer is read from its final hidden states that way; this one "
            "would teach another distribution than its own"
        )


@torch.no_grad()
def teacher_rows(
    hidden: Tensor,
    head: Tensor,
    k: int,
    *,
    bias: Tensor | None = None,
    with_ids: bool = False,
    transform=None,
    chunk_size: int = 64,
    targets: Tensor | None = None,
) -> dict[str, Tensor]:
    """From the teacher's final hidden states ``(M, H)`` at the positions that matter and its LM head
    ``(V, H)`` (and ``bias`` (V,), then ``transform``: ``head_logits``), block by block: ``sorted``
    its top-k probabilities, descending (M, k) and ``tail`` the rest (M,) for ULD; ``with_ids``: its
    top-k ``ids`` (its own) and their ``logprobs`` for span alignment; with ``targets`` (M,) teacher
    ids, their ``target_logprob`` (M,). Peak memory: one ``(chunk_size, V)`` block."""
    parts: dict[str, list[Tensor]] = {
        "sorted": [],
        "tail": [],
        "ids": [],
        "logprobs": [],
        "target_logprob": [],
    }
    for start in range(0, hidden.shape[0], chunk_size):
        logits = head_logits(hidden[start : start + chunk_size], head, bias, transform)
        logp = torch.log_softmax(logits, -1)
        top, ids = logp.topk(min(k, logp.shape[-1]), -1)
        parts["sorted"].append(top.exp())
        parts["tail"].append((1 - top.exp().sum(-1)).clamp_min(0))
        if with_ids:
            parts["ids"].append(ids)
            parts["logprobs"].append(top)
        if targets is not None:
            parts["target_logprob"].append(
                logp.gather(-1, targets[start : start + chunk_size, None]).squeeze(-1)
            )
    return {name: torch.cat(v) for name, v in parts.items() if v}


# the teacher's numbers per distribution row, by method (``CrossSignal`` fields; a cache stores them)
ROW_FIELDS = {"span": ("ids", "logprobs"), "uld": ("sorted", "tail")}


# which student positions get a row, and how, by method (``CrossTeacher._dist_rows``): a cache
# records it, and one made otherwise (an older release's) is refused
CROSS_ROWS = {"span": "one-teacher-token chunks, every position (piece_rows)", "uld": "chunk starts"}


@dataclass
class CrossItem:
    """One training sample as the teacher reads it, and how its answer aligns with the student's."""

    teacher_ids: list[int]  # the teacher's prompt (its own template) and the answer in its tokens
    teacher_start: int  # index of the teacher's first answer token
    student_start: int  # index of the student's first answer token within its sample
    chunks: list[Chunk]  # over the answer tokens (indices relative to each answer's start)
    student_tokens: tuple[int, ...]  # the student's answer tokens in the sample (after truncation)

    @property
    def student_answer(self) -> int:
        return len(self.student_tokens)


def build_item(student_prompt: list[int], teacher_prompt: list[int], text: str, s_tok, t_tok, eos: bool,
               max_len: int) -> CrossItem | None:  # fmt: skip
    """The teacher's view of a sample whose answer the student reads as ``student_answer_ids(s_tok,
    text, eos)`` after ``student_prompt``, truncated to ``max_len`` as ``make_example`` does; None when
    the two tokenisations cannot be aligned."""
    s_ids, s_spans = token_offsets(s_tok, text)
    t_ids, t_spans = token_offsets(t_tok, text)
    try:
        chunks = align(s_spans, t_spans)
    except AlignmentError:
        return None
    n_student = len(s_ids)
    if eos and s_tok.eos_token_id is not None:
        n_student += 1
        if t_tok.eos_token_id is not None:  # the two stops pair up: a chunk of no text
            end = len(text)
            chunks.append(
                Chunk(range(len(s_ids), len(s_ids) + 1), range(len(t_ids), len(t_ids) + 1), end, end)
            )
            t_ids = [*t_ids, t_tok.eos_token_id]
    kept = max(0, min(n_student, max_len - len(student_prompt)))
    chunks = [c for c in chunks if c.student.stop <= kept]
    t_len = chunks[-1].teacher.stop if chunks else 0
    s_all = [*s_ids, s_tok.eos_token_id] if n_student > len(s_ids) else s_ids
    return CrossItem(
        [*teacher_prompt, *t_ids[:t_len]],
        len(teacher_prompt),
        len(student_prompt),
        chunks,
        tuple(s_all[:kept]),
    )


@dataclass
class CrossSignal:
    """The teacher's signal at a batch's student positions, for ``loss``. ``rows``: flat indices of
    the (B, T-1) student positions with a distribution to match; ``chunk_rows``/``chunk_of``/
    ``chunk_labels``: the student positions, chunk numbers and token ids of the multi-token chunks
    (span alignment), whose teacher log-probabilities are ``chunk_teacher``."""

    method: str
    rows: Tensor
    sorted: Tensor | None = None
    tail: Tensor | None = None
    ids: Tensor | None = None
    logprobs: Tensor | None = None
    chunk_rows: Tensor | None = None
    chunk_of: Tensor | None = None
    chunk_labels: Tensor | None = None
    chunk_teacher: Tensor | None = None
    chunk_ce: Tensor | None = None  # (C,) bool: chunks taught by the CE of their text (train.cross_chunk ce)

    def loss(self, logits: Tensor, *, num_tokens) -> Tensor:
        """The cross-tokenizer KD term from the student's ``(B, T-1, V)`` logits, summed over the
        aligned positions and chunks, divided by ``num_tokens`` (the student's counted tokens)."""
        flat = logits.reshape(-1, logits.shape[-1])
        return self._total(flat, lambda x: x, max(flat.shape[0], 1), recompute=False, num_tokens=num_tokens)

    def chunked_loss(self, hidden: Tensor, weight: Tensor, bias: Tensor | None = None, *, num_tokens,
                     transform=None, chunk_size: int | None = None) -> Tensor:  # fmt: skip
        """``loss`` of the logits ``transform(hidden @ weight.T + bias)`` without making them for all
        positions: ``hidden`` ``(B, T-1, H)`` (the student's final states), ``chunk_size`` positions at
        a time (default: about 2**24 logits a block), each block's logits made again in backward
        (activation checkpointing), so at most one ``(chunk_size, V)`` block lives at once."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        chunk = chunk_size or max(1, (1 << 24) // weight.shape[0])

        def make(h: Tensor) -> Tensor:
            out = F.linear(h, weight, bias)
            return transform.apply(out)[0] if transform is not None else out

        return self._total(flat, make, chunk, recompute=True, num_tokens=num_tokens)

    def _total(self, source: Tensor, make, chunk: int, *, recompute: bool, num_tokens) -> Tensor:
        """The term from ``source`` rows (logits, or hidden states that ``make`` turns into logits),
        ``chunk`` rows of logits at a time."""
        from torch.utils.checkpoint import checkpoint

        def run(fn, x: Tensor) -> Tensor:
            return checkpoint(fn, x, use_reentrant=False) if recompute else fn(x)

        total = source.new_zeros((), dtype=torch.float32)
        for lo in range(0, self.rows.numel(), chunk):
            total = total + run(
                partial(self._rows_term, make, lo, lo + chunk, num_tokens), source[self.rows[lo : lo + chunk]]
            )
        if self.chunk_rows is not None and self.chunk_rows.numel():
            parts = []
            for lo in range(0, self.chunk_rows.numel(), chunk):
                labels = self.chunk_labels[lo : lo + chunk, None]
                parts.append(
                    run(partial(_token_logprob, make, labels), source[self.chunk_rows[lo : lo + chunk]])
                )
            student = torch.zeros_like(self.chunk_teacher).index_add_(0, self.chunk_of, torch.cat(parts))
            ce = self.chunk_ce if self.chunk_ce is not None else torch.zeros_like(student, dtype=torch.bool)
            denom = num_tokens if num_tokens is not None else max(student.shape[0], 1)
            total = total - student[ce].sum() / denom  # the text's cross-entropy, at full weight
            total = total + chunk_kl(student[~ce], self.chunk_teacher[~ce], num_tokens=denom)
        return total

    def _rows_term(self, make, lo: int, hi: int, num_tokens, x: Tensor) -> Tensor:
        """The distribution term of rows ``lo:hi`` of ``rows``, from their sources ``x``."""
        if self.method == "uld":
            return uld_loss(make(x), self.sorted[lo:hi], self.tail[lo:hi], num_tokens=num_tokens)
        return span_kl(make(x), self.ids[lo:hi], self.logprobs[lo:hi], num_tokens=num_tokens)


def _token_logprob(make, labels: Tensor, x: Tensor) -> Tensor:
    """Each row's log-probability of its token ``labels`` (R, 1) under the logits ``make(x)``."""
    return torch.log_softmax(make(x).float(), -1).gather(-1, labels).squeeze(-1)


class CrossTeacher:
    """A live teacher whose tokenizer differs from the student's: each batch is read again in the
    teacher's tokens, the teacher runs once, and its signal is reduced to ``k`` numbers per aligned
    student position, block by block (``teacher_rows``), from its final hidden states, LM head (and
    bias) and declared logit transform: checked against its own logits on the first batch it scores
    (``check_head_logits``)."""

    def __init__(self, model, items: dict[str, CrossItem], *, method: str, k: int, pieces: Tensor | None,
                 pad_id: int, tokenizers: tuple | None = None, prompts: dict[tuple, list[int]] | None = None,
                 max_len: int = 0, chunk_loss: str = "bernoulli") -> None:  # fmt: skip
        """``pieces``: each teacher token in the student's tokens (span; ``token_pieces``).
        ``tokenizers`` (student's, teacher's), ``prompts`` (the teacher's prompt ids by the student's)
        and ``max_len``: what ``retokenize`` needs to align the student's own samples (on-policy)."""
        from distill.losses.fused import LogitTransform

        self.model, self.items, self.method, self.k = model, items, method, k
        self.pieces, self.pad_id, self.chunk_loss = pieces, pad_id, chunk_loss
        self.transform = None
        self._head_checked = False  # the model's logits == its head's under ``transform``? (once)
        if model is not None:  # (none: a cache answers for the teacher)
            self.model = model.eval()
            self.transform = LogitTransform.of(model.config)
        self.tokenizers, self.prompts, self.max_len = tokenizers, prompts or {}, max_len
        self.sampled: dict[str, CrossItem] = {}  # this step's on-policy samples
        self._step: int | None = None
        self.sampled_counts = {"samples": 0, "aligned": 0, "retokenized": 0, "tokens": 0, "one_to_one": 0}

    def retokenize(self, prompts: list[list[int]], answers: list[list[int]], *, step: int) -> list[list[int]]:
        """The student's own answers (on-policy samples) to ``prompts``, as its tokenizer reads their
        text (a sample in other tokens than the canonical ones, such as ``t``+``he`` for ``the``, is
        re-read: the teacher's alignment is by the text), each with the item that aligns it with the
        teacher's tokens; kept until the next step's samples."""
        from distill.core.data import make_example
        from distill.teacher.signal import sample_key

        if self.tokenizers is None:
            raise ValueError("CrossTeacher.retokenize needs the two tokenizers")
        s_tok, t_tok = self.tokenizers
        if step != self._step:
            self.sampled, self._step = {}, step
        special = set(s_tok.all_special_ids)
        out = []
        for prompt, ans in zip(prompts, answers, strict=True):
            eos = bool(ans) and ans[-1] in special
            text = s_tok.decode(ans[:-1] if eos else ans, skip_special_tokens=True)
            ids = student_answer_ids(s_tok, text, eos)
            counts = self.sampled_counts
            counts["samples"] += 1
            counts["retokenized"] += ids != ans
            t_prompt = self.prompts.get(tuple(prompt))
            item = None
            if t_prompt is not None:
                item = build_item(prompt, t_prompt, text, s_tok, t_tok, eos, self.max_len)
            if item is not None and item.chunks:
                self.sampled[sample_key(make_example(prompt, ids, self.max_len)[0])] = item
                counts["aligned"] += 1
                counts["tokens"] += item.student_answer
                counts["one_to_one"] += sum(len(c.student) for c in item.chunks if c.one_to_one)
            out.append(ids)
        return out

    def _dist_rows(self, item: CrossItem) -> list[tuple[Chunk, int]]:
        """The item's student positions that get a whole distribution, as (chunk, position in it).
        ULD: the first of every chunk. Span: every position of each chunk the teacher reads as one
        token (one-to-one, or split by the student: ``piece_rows``)."""
        if self.method == "uld":
            return [(c, 0) for c in item.chunks]
        return [(c, j) for c in item.chunks if len(c.teacher) == 1 for j in range(len(c.student))]

    def _multi_chunks(self, item: CrossItem) -> list[Chunk]:
        """The chunks compared as the probability of their text (span: those of several teacher
        tokens, whose single-token distributions cannot be paired)."""
        return [c for c in item.chunks if self.method == "span" and len(c.teacher) > 1]

    @torch.no_grad()
    def item_parts(self, items: list[CrossItem]) -> list[dict[str, Tensor]]:
        """The teacher's side of each item, from one forward pass over them: for every row of
        ``_dist_rows`` (in order) its ``k`` numbers (span: ``ids`` in the student's vocabulary and
        ``logprobs``, by ``piece_rows``; ULD: ``sorted`` probabilities and ``tail``), and for every
        chunk of ``_multi_chunks`` the teacher's log-probability of its text, ``chunk_teacher``. They
        depend on the item alone, so a cache can keep them (``CachedCrossTeacher``)."""
        from distill.core.data import collate

        if self.model is None:
            raise ValueError("this cross-tokenizer teacher has no model to score new samples with")
        t_batch = collate([(it.teacher_ids, [True] * len(it.teacher_ids)) for it in items], self.pad_id)
        dev = next(self.model.parameters()).device
        out = self.model(input_ids=t_batch.input_ids.to(dev), attention_mask=t_batch.attention_mask.to(dev),
                         output_hidden_states=True, logits_to_keep=1)  # fmt: skip
        hidden = out.hidden_states[-1]  # (b, T_t, H) after the final norm
        t_width = hidden.shape[1]
        dist_t, of_row, read, depth, ch_t, counts = [], [], [], [], [], []
        width = self.pieces.shape[1] if self.pieces is not None else 1
        for b, it in enumerate(items):
            t_base = b * t_width + it.teacher_start - 1  # predicts the teacher's answer token 0
            dist = self._dist_rows(it)
            for c, j in dist:  # one teacher position per chunk, however many student rows read it
                if j == 0:
                    dist_t.append(t_base + c.teacher[0])
                of_row.append(len(dist_t) - 1)
                got = list(it.student_tokens[c.student[0] : c.student[0] + j])[:width] if j else []
                read.append(got + [-1] * (width - len(got)))
                depth.append(j)
            multi = self._multi_chunks(it)
            for n, c in enumerate(multi):  # (teacher position, its token, the chunk's number in the item)
                ch_t += [(t_base + j, it.teacher_ids[it.teacher_start + j], n) for j in c.teacher]
            counts.append((len(dist), len(multi), sum(len(c.teacher) for c in multi)))
        out_head = self.model.get_output_embeddings()
        head, bias = out_head.weight, getattr(out_head, "bias", None)
        if not self._head_checked:  # the last position's logits came with the forward pass
            check_head_logits(type(self.model).__name__, hidden[:, -1], out.logits[:, -1], head, bias,
                              self.transform)  # fmt: skip
            self._head_checked = True
        flat_h = hidden.reshape(-1, hidden.shape[-1])
        dev = flat_h.device  # the parts stay there: the student's device takes them in ``signal``
        picked = flat_h[torch.tensor(dist_t, dtype=torch.long, device=dev)]
        span = self.method == "span"
        rows = teacher_rows(picked, head, self.k, bias=bias, with_ids=span, transform=self.transform)
        if span:
            if self.pieces.device != dev:  # moved once, not every step
                self.pieces = self.pieces.to(dev)
            of = torch.tensor(of_row, dtype=torch.long, device=dev)
            rows["ids"], rows["logprobs"] = piece_rows(
                rows["ids"][of], rows["logprobs"][of], self.pieces,
                torch.tensor(read, dtype=torch.long, device=dev).reshape(len(read), width),
                torch.tensor(depth, dtype=torch.long, device=dev),
            )  # fmt: skip
        names = ROW_FIELDS[self.method]
        lp = None
        if ch_t:
            pos = torch.tensor([p for p, _, _ in ch_t], dtype=torch.long, device=dev)
            tgt = torch.tensor([t for _, t, _ in ch_t], dtype=torch.long, device=dev)
            lp = teacher_rows(flat_h[pos], head, 1, bias=bias, transform=self.transform, targets=tgt)
            lp = lp["target_logprob"]
        parts, r0, t0 = [], 0, 0
        for n_dist, n_multi, n_tok in counts:
            part = {name: rows[name][r0 : r0 + n_dist] for name in names}
            if span:
                which = torch.tensor([c for _, _, c in ch_t[t0 : t0 + n_tok]], dtype=torch.long, device=dev)
                got = lp[t0 : t0 + n_tok].float() if n_tok else torch.zeros(0, device=dev)
                part["chunk_teacher"] = torch.zeros(n_multi, device=dev).index_add_(0, which, got)
            parts.append(part)
            r0, t0 = r0 + n_dist, t0 + n_tok
        return parts

    def parts_for(self, keys: list[str], items: list[CrossItem]) -> list[dict[str, Tensor]]:
        """The teacher's side of the samples ``keys`` (``item_parts``); a cache answers from disk."""
        return self.item_parts(items)

    def signal(self, batch, lazy: bool = False) -> CrossSignal:
        from distill.teacher.signal import sample_key

        width = batch.input_ids.shape[1] - 1  # the student's shifted positions per row
        dev = batch.input_ids.device
        samples = []
        for i, start, n in batch.samples():
            key = sample_key(batch.input_ids[i, start : start + n].tolist())
            item = self.items.get(key) or self.sampled.get(key)
            if item is not None and item.chunks:
                samples.append((i, start, item, key))
        if not samples:
            return CrossSignal(self.method, torch.zeros(0, dtype=torch.long))
        parts = self.parts_for([k for *_, k in samples], [it for _, _, it, _ in samples])
        names = ROW_FIELDS[self.method]
        dist_s, fields, ch_s, ch_of, ch_lab, ch_teacher = [], {n: [] for n in names}, [], [], [], []
        ch_ce = []  # per chunk: taught by the CE of its text (teacher answers only, not the student's own)
        n_chunks = 0
        for (i, start, it, key), part in zip(samples, parts, strict=True):
            s_base = i * width + start + it.student_start - 1  # predicts the student's answer token 0
            dist = self._dist_rows(it)
            if len(part[names[0]]) != len(dist):
                raise ValueError(f"sample {key}: the teacher's signal has {len(part[names[0]])} rows, the "
                                 f"alignment {len(dist)}; rerun `distill cache`")  # fmt: skip
            dist_s += [s_base + c.student[j] for c, j in dist]
            for name in names:  # (a cache's parts are on the CPU, a live teacher's on its device)
                fields[name].append(part[name].to(dev))
            s_row_ids = batch.input_ids[i]
            for c in self._multi_chunks(it):
                for j in c.student:
                    ch_s.append(s_base + j)
                    ch_of.append(n_chunks)
                    ch_lab.append(int(s_row_ids[start + it.student_start + j]))
                n_chunks += 1
                ch_ce.append(self.chunk_loss == "ce" and key in self.items)
            if "chunk_teacher" in part:
                ch_teacher.append(part["chunk_teacher"].to(dev))
        cat = {name: torch.cat(v) for name, v in fields.items()}
        sig = CrossSignal(self.method, torch.tensor(dist_s, dtype=torch.long, device=dev), **cat)
        if n_chunks:
            sig.chunk_rows = torch.tensor(ch_s, dtype=torch.long, device=dev)
            sig.chunk_of = torch.tensor(ch_of, dtype=torch.long, device=dev)
            sig.chunk_labels = torch.tensor(ch_lab, dtype=torch.long, device=dev)
            sig.chunk_teacher = torch.cat(ch_teacher).float()
            sig.chunk_ce = torch.tensor(ch_ce, dtype=torch.bool, device=dev)
        return sig
