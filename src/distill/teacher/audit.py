"""Tokenizer audit: may a teacher's logits be compared with a student's position by position?

Four verdicts, decided from the two tokenizers and the two LM heads alone:

    same        one tokenizer, heads of one size: every loss of distill.losses applies
    padded      one tokenizer, a head padded past the vocabulary (152,064 vs 151,936): the same
                losses on the real vocabulary, the padding columns masked
    extension   one vocabulary extends the other (added tokens, same ids and rules for the shared
                ones): token-level losses on the shared ids
    different   anything else: a token-level loss would pair unrelated ids. Use sequence-level KD
                (train.alpha: 0, the teacher's text only) or a cross-tokenizer loss

The comparison covers the vocabularies (token -> id), the BPE merges, the normaliser, the
pre-tokeniser, the special tokens and the chat templates; ``distill audit TEACHER STUDENT`` prints it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

VERDICTS = ("same", "padded", "extension", "different")


METHODS = {
    "same": ["any train.loss (token level)", "sequence-level KD (train.alpha: 0)"],
    "padded": ["any train.loss on the real vocabulary (padding columns masked)", "sequence-level KD"],
    "extension": ["token-level losses on the shared ids", "sequence-level KD"],
    "different": [
        "train.cross_tokenizer: span (alignment by character spans)",
        "train.cross_tokenizer: uld (Universal Logit Distillation)",
        "sequence-level KD (train.alpha: 0: the teacher's answers as text)",
    ],
}


@dataclass
class Audit:
    verdict: str
    teacher_vocab: int
    student_vocab: int
    teacher_head: int
    student_head: int
    shared_tokens: int  # token strings in both vocabularies
    shared_same_id: int  # of those, with the same id in both
    checks: dict[str, bool] = field(default_factory=dict)  # what agrees: merges, normalizer, ...
    notes: list[str] = field(default_factory=list)

    @property
    def methods(self) -> list[str]:
        return METHODS[self.verdict]

    @property
    def token_level(self) -> bool:
        """May a token-level loss pair the two models' logits id by id?"""
        return self.verdict != "different"

    def as_dict(self) -> dict:
        return {**asdict(self), "methods": self.methods}

    def lines(self) -> list[str]:
        out = [f"verdict: {self.verdict}",
               f"vocabulary: teacher {self.teacher_vocab:,} tokens (head {self.teacher_head:,}), "
               f"student {self.student_vocab:,} (head {self.student_head:,}); {self.shared_tokens:,} token "
               f"strings shared, {self.shared_same_id:,} with the same id"]  # fmt: skip
        out += [f"{k}: {'same' if v else 'differs'}" for k, v in self.checks.items()]
        out += self.notes
        out.append("valid methods: " + "; ".join(self.methods))
        return out


def _backend(tok) -> dict:
    try:
        return json.loads(tok.backend_tokenizer.to_str())
    except (AttributeError, ValueError):  # a slow tokenizer: nothing to compare beyond the vocabulary
        return {}


def _merges(spec: dict) -> list:
    merges = (spec.get("model") or {}).get("merges") or []
    return [" ".join(m) if isinstance(m, list) else m for m in merges]


def _specials(tok) -> dict:
    return {k: str(v) for k, v in sorted(tok.special_tokens_map.items())}


def audit_tokenizers(
    teacher_tok, student_tok, teacher_head: int | None = None, student_head: int | None = None
) -> Audit:
    """The verdict for a teacher/student pair; ``*_head``: the LM heads' rows (``config.vocab_size``),
    by default the tokenizers' lengths."""
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    th, sh = teacher_head or len(teacher_tok), student_head or len(student_tok)
    shared = tv.keys() & sv.keys()
    same_id = sum(tv[k] == sv[k] for k in shared)
    tb, sb = _backend(teacher_tok), _backend(student_tok)
    checks = {
        "merges": _merges(tb) == _merges(sb),
        "normalizer": tb.get("normalizer") == sb.get("normalizer"),
        "pre-tokenizer": tb.get("pre_tokenizer") == sb.get("pre_tokenizer"),
        "special tokens": _specials(teacher_tok) == _specials(student_tok),
        "chat template": getattr(teacher_tok, "chat_template", None)
        == getattr(student_tok, "chat_template", None),
    }
    rules = checks["merges"] and checks["normalizer"] and checks["pre-tokenizer"]
    notes = []
    smaller, larger = (tv, sv) if len(tv) <= len(sv) else (sv, tv)
    if tv == sv and rules:
        verdict = "same" if th == sh == len(tv) else "padded"
        if verdict == "padded":
            notes.append(f"the heads have {th:,} and {sh:,} rows for {len(tv):,} tokens: "
                         "the rows past the vocabulary are padding and are masked")  # fmt: skip
    elif (
        all(larger.get(k) == v for k, v in smaller.items())
        and checks["normalizer"]
        and checks["pre-tokenizer"]
    ):
        verdict = "extension"
        extra, whose = [k for k in larger if k not in smaller], "student" if larger is sv else "teacher"
        notes.append(f"{len(extra):,} tokens only in the {whose}'s vocabulary (e.g. {extra[:3]}); "
                     f"the shared {len(smaller):,} have the same ids")  # fmt: skip
    else:
        verdict = "different"
        if tv == sv:
            notes.append("the same vocabulary but other tokenisation rules: the same text becomes other ids, "
                         "so ids cannot be paired even though every token exists in both")  # fmt: skip
    if not checks["chat template"]:
        notes.append("the chat templates differ: each model is given prompts in its own template")
    return Audit(verdict, len(tv), len(sv), th, sh, len(shared), same_id, checks, notes)


def load_audit_tokenizer(ref: str, *, trust_remote_code: bool = False):
    """A model reference's tokenizer, read from a GGUF's header when it is one (no weights converted)."""
    from transformers import AutoTokenizer

    from distill.core.models import ModelError, resolve_gguf, resolve_model_dir

    gguf = resolve_gguf(ref)
    if gguf is not None:
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    folder = resolve_model_dir(ref)
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((folder / n).is_file() for n in names):
        raise ModelError(f"{folder} has no tokenizer ({', '.join(names)}); save it beside the model")
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)


def audit_models(teacher: str, student: str, *, trust_remote_code: bool = False) -> Audit:
    """``audit_tokenizers`` for two model references (folders, GGUF files, bundled names)."""
    from distill.core.models import model_facts

    t_tok = load_audit_tokenizer(teacher, trust_remote_code=trust_remote_code)
    s_tok = load_audit_tokenizer(student, trust_remote_code=trust_remote_code)
    t_head = model_facts(teacher, trust_remote_code=trust_remote_code).vocab_size or None
    s_head = model_facts(student, trust_remote_code=trust_remote_code).vocab_size or None
    return audit_tokenizers(t_tok, s_tok, t_head, s_head)
