"""Aligning two tokenizations of one text: chunks of characters both sides cut at, and the pieces
of each teacher token in the student's vocabulary."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Chunk:
    student: range  # token indices of the student's tokenisation
    teacher: range
    start: int  # character offsets in the text
    end: int

    @property
    def one_to_one(self) -> bool:
        return len(self.student) == 1 and len(self.teacher) == 1


class AlignmentError(ValueError):
    """The two tokenisations do not cover the same text."""


def align(student: list[tuple[int, int]], teacher: list[tuple[int, int]]) -> list[Chunk]:
    """The finest chunks of the text whose two ends are boundaries in both tokenisations.

    A boundary after token i is its end, provided the next token starts there or later (byte-level
    tokenizers give the pieces of one character the same span: no boundary between them).
    """

    def boundaries(spans: list[tuple[int, int]]) -> dict[int, int]:  # character offset -> tokens before it
        out = {}
        for i, (_, end) in enumerate(spans):
            nxt = spans[i + 1][0] if i + 1 < len(spans) else None
            if nxt is None or nxt >= end:
                out[end] = i + 1
        return out

    if not student or not teacher:
        return []
    if student[-1][1] != teacher[-1][1]:
        raise AlignmentError(f"the student's tokens end at character {student[-1][1]}, the teacher's at "
                             f"{teacher[-1][1]}: not the same text")  # fmt: skip
    bs, bt = boundaries(student), boundaries(teacher)
    chunks, si, ti, start = [], 0, 0, 0
    for offset in sorted(bs.keys() & bt.keys()):
        s_end, t_end = bs[offset], bt[offset]
        if s_end > si and t_end > ti:
            chunks.append(Chunk(range(si, s_end), range(ti, t_end), start, offset))
            si, ti, start = s_end, t_end, offset
    return chunks


def alignment_shares(chunks: list[Chunk], n_student: int) -> dict[str, float]:
    """Shares of the student's tokens: in one-to-one chunks (``one_to_one``), in chunks the teacher
    reads as one token (``one_teacher_token``: span gives each a whole distribution), and with any
    logit signal (``any``: every chunk, a distribution or a chunk probability)."""
    one = sum(len(c.student) for c in chunks if c.one_to_one)
    single = sum(len(c.student) for c in chunks if len(c.teacher) == 1)
    any_ = sum(len(c.student) for c in chunks)
    n = max(n_student, 1)
    return {"one_to_one": one / n, "one_teacher_token": single / n, "any": any_ / n}


def _mid_text(tok):
    """``text(tokens)``: the text of a list of ``tok``'s tokens in the middle of a sequence, decoded
    after an anchor token whose text is then removed, since decoders treat the first token apart (a
    SentencePiece ``▁the`` alone decodes to ``the``, after a word to `` the``); None: not after the
    anchor's text."""
    anchor = next(t for t in ("a", "x", "e") if t in tok.get_vocab())
    base = tok.convert_tokens_to_string([anchor])

    def text(tokens: list[str]) -> str | None:
        full = tok.convert_tokens_to_string([anchor, *tokens])
        return full[len(base) :] if full.startswith(base) else None

    return text


def surfaces(tok) -> list[str | None]:
    """Each token's text in the middle of a sequence (None: a special token or no text of its own)."""
    special = set(tok.all_special_ids)
    text = _mid_text(tok)
    out: list[str | None] = []
    for i in range(len(tok)):
        got = None if i in special else text([tok.convert_ids_to_tokens(i)])
        out.append(got if got and "\ufffd" not in got else None)  # a partial character: no text
    return out


def token_pieces(teacher_tok, student_tok, max_pieces: int = 8) -> Tensor:
    """``(V_teacher, max_pieces)``: the text of each teacher token (``surfaces``) in the student's
    tokens, -1 padded; a row of -1: no text of its own (a special token, a piece of a character) or
    text the student's tokenizer does not read back exactly (longer texts keep their first
    ``max_pieces``). Column 0, the student token that starts each teacher token's text, maps the
    teacher's next-token distribution into the student's vocabulary: a teacher token the student lacks
    whole (`` distillation``) gives its mass to the student token its text starts with (`` dist``).
    The two models' end-of-sequence tokens are one event and map to each other."""
    t_text = surfaces(teacher_tok)
    todo = [i for i, t in enumerate(t_text) if t]
    out = torch.full((len(teacher_tok), max_pieces), -1, dtype=torch.long)
    read_back = _mid_text(student_tok)
    # A token's text as the student reads it in running text: followed by a word after whitespace
    # (byte-level BPE reads "\n\n" before a word as "\n", "\n", alone as "\n\n") and by a space
    # after anything else; the tokens of that follower are dropped. Failing that, read alone.
    followed = [t_text[i] + ("x" if t_text[i][-1].isspace() else " ") for i in todo]
    enc = student_tok(followed, add_special_tokens=False, return_offsets_mapping=True) if todo else None
    alone = student_tok([t_text[i] for i in todo], add_special_tokens=False)["input_ids"] if todo else []
    # Last, a student token of the same text: for a piece inside a word (``lu`` of ``plus``), which a
    # SentencePiece tokenizer reads alone as a word (``▁lu``)
    same: dict[str, int] = {}
    for j, text in enumerate(surfaces(student_tok)):
        if text is not None and text not in same:
            same[text] = j
    for n, i in enumerate(todo):
        text = t_text[i]
        ids, spans = enc["input_ids"][n], enc["offset_mapping"][n]
        for got in ([t for t, (_, end) in zip(ids, spans, strict=True) if end <= len(text)], alone[n]):
            if got and read_back(student_tok.convert_ids_to_tokens(got)) == text:
                out[i, : min(len(got), max_pieces)] = torch.tensor(got[:max_pieces])
                break
        else:
            out[i, 0] = same.get(text, -1)
    if teacher_tok.eos_token_id is not None and student_tok.eos_token_id is not None:
        out[teacher_tok.eos_token_id] = -1
        out[teacher_tok.eos_token_id, 0] = student_tok.eos_token_id
    return out


def piece_rows(
    ids: Tensor, logprobs: Tensor, pieces: Tensor, read: Tensor, depth: Tensor
) -> tuple[Tensor, Tensor]:
    """The student's next-token distributions inside chunks the teacher reads as one token, from the
    teacher's top-k ``ids`` and ``logprobs`` (R, k) at each chunk's start, by the chain rule.

    Row r is the student's position ``depth[r]`` of its chunk, after it has read the student tokens
    ``read[r, :depth[r]]`` (R, L) of it. Each teacher token whose text, in student tokens
    (``pieces``, ``token_pieces``), begins with those and goes on gives its probability to its next
    piece; the probabilities are divided by the mass of the teacher tokens that begin so (the ones
    that end there are the row's tail: the next student token then starts the next chunk, which this
    row cannot see). At depth 0 this is column 0 of ``pieces``, undivided (the teacher's mass past its
    top k is the tail). Returns the rows' ``ids`` (-1: no student token) and ``logprobs``."""
    table = pieces.to(ids.device)
    width = table.shape[1]
    p = table[ids]  # (R, k, L)
    cols = torch.arange(width, device=ids.device)
    agree = (p == read[:, None, :]) | (cols >= depth[:, None])[:, None, :]
    match = agree.all(-1) & (p[..., 0] >= 0)  # begins with what the student has read
    nxt = p.gather(-1, depth.clamp_max(width - 1)[:, None, None].expand(-1, p.shape[1], 1)).squeeze(-1)
    nxt = torch.where(depth[:, None] < width, nxt, -1)
    out_ids = torch.where(match & (nxt >= 0), nxt, -1)
    lp = logprobs.float()
    norm = torch.logsumexp(torch.where(match, lp, -torch.inf), -1, keepdim=True)
    norm = torch.where(depth[:, None] > 0, norm, 0.0)
    empty = ~torch.isfinite(norm)  # nothing in the top k begins so: no signal at this row
    out_ids = torch.where(empty, -1, out_ids)
    return out_ids, torch.where(empty, 0.0, lp - norm)
