"""Where a student trained across tokenizers still loses to its teacher: bits per byte split by how
the two tokenizers cut the text.

    python bench/crosstok_chunks.py [--runs runs]

For every run recorded in ``bench/results/crosstok.json`` (sampled answers) whose student is still on
disk, for the untrained student and for the teacher: each model's cross-entropy (nats) on the
teacher's held-out answers, in its own tokens, summed over three kinds of chunk (``crosstok.align``):
one token on each side (``one_to_one``), one teacher token read by the student as several
(``teacher_one``: span gives those a distribution per student token since the chain-rule rows), and
several teacher tokens (``teacher_several``: a Bernoulli KL on the chunk's probability). The
stop tokens count as one-to-one. Written to crosstok.json under ``nats_by_chunk``, with the bytes of
text of each kind; the kinds add up to the model's whole figure in ``bits_per_byte``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from crosstok import RESULTS, ROOT, held_out, named_run, run_name  # noqa: E402

KINDS = ("one_to_one", "teacher_one", "teacher_several")


def kind(chunk) -> str:
    if chunk.one_to_one:
        return "one_to_one"
    return "teacher_one" if len(chunk.teacher) == 1 else "teacher_several"


@torch.no_grad()
def nats_by_chunk(model_dir: Path, cfg, s_tok, t_tok, side: str) -> dict[str, float]:
    """The model in ``model_dir`` (the ``side``, "student" or "teacher", of the pair): its nats on the
    held-out answers by kind of chunk, and the bytes of each kind."""
    from transformers import AutoModelForCausalLM

    from distill.core.data import token_offsets
    from distill.teacher.alignment import align

    tok = s_tok if side == "student" else t_tok
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = {k: 0.0 for k in KINDS} | {f"{k}_bytes": 0 for k in KINDS}
    for prompt, ans, rec in held_out(tok, cfg):
        text = rec["text"]
        logits = model(torch.tensor([prompt + ans])).logits[0, len(prompt) - 1 : -1].float()
        nats = -torch.log_softmax(logits, -1).gather(-1, torch.tensor(ans)[:, None]).squeeze(-1)
        chunks = align(token_offsets(s_tok, text)[1], token_offsets(t_tok, text)[1])
        for c in chunks:  # (an answer cut at train.max_seq_len, as bits_per_byte cuts it: what is left)
            own = c.student if side == "student" else c.teacher
            out[kind(c)] += float(nats[own.start : min(own.stop, len(ans))].sum())
            out[f"{kind(c)}_bytes"] += len(text[c.start : c.end].encode()) if own.stop <= len(ans) else 0
        text_tokens = len(token_offsets(tok, text)[0])
        out["one_to_one"] += float(nats[text_tokens:].sum())  # the stop token, if kept: the two stops
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default=str(ROOT / "runs"))
    args = ap.parse_args()
    from distill.core.models import load_tokenizer, resolve_model_dir
    from distill.core.recipe import load_config

    whole = json.loads(RESULTS.read_text())
    pair = ["teacher.model=gemma3-270m", "student.init=model", "student.model=smollm2-135m-instruct"]
    where = [f"runs_dir={args.runs}", f"name={run_name('sampled', 'seqkd', 0.5)}"]
    first = load_config(None, [*pair, "data.heldout_size=32", *where])
    s_tok, t_tok = load_tokenizer(first.student.model), load_tokenizer(first.teacher.model)
    found = whole.setdefault("nats_by_chunk", {})
    for name in ("teacher", "untrained_student", *whole["methods"]):
        if name == "teacher":
            folder, side = resolve_model_dir(first.teacher.model), "teacher"
        elif name == "untrained_student":
            folder, side = resolve_model_dir(first.student.model), "student"  # (student.init model)
        else:
            folder, side = Path(args.runs) / named_run("sampled", name) / "student", "student"
        if name in found or not (folder / "config.json").is_file():
            continue
        found[name] = nats_by_chunk(folder, first, s_tok, t_tok, side)
        print(name, found[name])
    RESULTS.write_text(json.dumps(whole, indent=1))


if __name__ == "__main__":
    main()
