"""Teacher vs student on held-out prompts: fidelity, answer quality, speed, size -> eval.json."""

from __future__ import annotations

import copy
import math
import re
import time
from fractions import Fraction
from pathlib import Path

import torch
from rich.table import Table
from transformers import PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from distill.core import interrupt
from distill.core.answers import answer_key
from distill.core.config import EvaluateConfig
from distill.core.data import Prompt, collate, make_example
from distill.core.generation import generate_batch
from distill.core.models import count_params, folder_bytes
from distill.core.progress import progress_bar
from distill.losses.divergences import forward_kl, token_cross_entropy

NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


def last_number_matches(answer: str, reference: str) -> bool:
    """The answer's last number equals the reference as a number (so 0.5 == 1/2 == 0.50)."""
    ref = _as_fraction(reference.strip())
    nums = NUMBER.findall(answer)
    return ref is not None and bool(nums) and _as_fraction(nums[-1]) == ref


METRICS = [
    "kl", "top1_agreement", "perplexity", "bits_per_byte", "teacher_logprob", "exact_match", "rouge_l",
    "reference_accuracy",
    "tokens_per_s_batch1", "tokens_per_s_batched", "params", "bytes",
]  # fmt: skip


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over whitespace tokens (longest common subsequence)."""
    a, b = candidate.split(), reference.split()
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def named_choices(answer: str, choices) -> set[str]:
    """The ``choices`` (lower case) that ``answer`` names as whole words, in any case."""
    low = answer.lower()
    labels = {c.strip().lower() for c in choices}
    return {c for c in labels if re.search(rf"(?<!\w){re.escape(c)}(?!\w)", low)}


def matches_reference(answer: str, reference: str) -> bool:
    """A numeric reference must equal the answer's last number (as a number); text must appear in it."""
    ref = reference.strip()
    if NUMBER.fullmatch(ref):
        return last_number_matches(answer, ref)
    return ref.lower() in answer.lower()


@torch.no_grad()
def forced_metrics(
    model: PreTrainedModel,
    teacher: PreTrainedModel | None,
    examples: list[tuple[list[int], list[bool]]],
    pad_id: int,
    batch_size: int,
    vocab_size: int | None = None,
) -> dict[str, float | None]:
    """Per-token KL(teacher || model), top-1 agreement and perplexity on teacher answers
    (KL and agreement are None without a local teacher), and under ``per_example`` each example's
    sums (``kl``, ``agree``, ``ce``) and token count, from which a bootstrap over prompts resamples.

    ``vocab_size``: the tokenizer's length; LM-head columns past it (padding, e.g. 152,064 vs
    151,936) are dropped on both sides, so a pair whose heads differ only by padding compares.
    """
    rows: list[dict] = []
    for i in range(0, len(examples), batch_size):
        interrupt.check()
        b = collate(examples[i : i + batch_size], pad_id).to(model.device)
        s = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1].float()
        s = s[..., :vocab_size] if vocab_size else s  # (B, T-1, V)
        mask = b.answer_mask[:, 1:]
        t = None
        if teacher is not None:
            t_in = b.to(teacher.device)
            t = teacher(input_ids=t_in.input_ids, attention_mask=t_in.attention_mask).logits[:, :-1]
            t = (t[..., :vocab_size] if vocab_size else t).float().to(s.device)
        targets = b.input_ids[:, 1:]
        for r in range(s.shape[0]):  # each example's sums, for the intervals over prompts
            m, sr = mask[r : r + 1], s[r : r + 1]
            row = {"ce": float(token_cross_entropy(sr, targets[r : r + 1], m, num_tokens=1)),
                   "tokens": int(m.sum()), "kl": None, "agree": None}  # fmt: skip
            if t is not None:
                row["kl"] = float(forward_kl(sr, t[r : r + 1], m, num_tokens=1))
                row["agree"] = int((sr.argmax(-1) == t[r : r + 1].argmax(-1))[m].sum())
            rows.append(row)
    count = max(sum(r["tokens"] for r in rows), 1)
    return {
        "kl": sum(r["kl"] for r in rows) / count if teacher is not None else None,
        "top1_agreement": sum(r["agree"] for r in rows) / count if teacher is not None else None,
        "perplexity": math.exp(sum(r["ce"] for r in rows) / count),
        "scored_tokens": count,
        "per_example": rows,
    }


def teacher_logprob(
    teacher: PreTrainedModel, examples: list[tuple[list[int], list[bool]]], pad_id: int, batch_size: int
) -> float:
    """The teacher's mean log-probability per token of answers ``examples`` (prompt + a model's own
    answer): how good that model's text is by the teacher's judgement, in nats (0 is the best).
    It is minus the log of the teacher's perplexity of those answers."""
    return -math.log(forced_metrics(teacher, None, examples, pad_id, batch_size)["perplexity"])


def timed_generation(model, tok, rows: list[list[int]], new_tokens: int) -> float:
    t0 = time.perf_counter()
    generate_batch(model, tok, rows, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return len(rows) * new_tokens / (time.perf_counter() - t0)


def compare_speed(
    models: dict[str, PreTrainedModel], tok: Tokenizer | dict[str, Tokenizer],
    prompt_ids: list[list[int]] | dict[str, list[list[int]]], cfg: EvaluateConfig, dtype: torch.dtype,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """Batch-1 and batched generation tokens/s of each model, measured side by side.

    Every round times each model once, in turn, and each keeps its best round: a slow moment
    of a shared machine then hits all models alike instead of whichever was measured then.
    ``tok`` and ``prompt_ids`` may be given per model (models with their own tokenizers).
    """
    fast = {name: copy.deepcopy(m).to(dtype) for name, m in models.items()}
    toks = tok if isinstance(tok, dict) else dict.fromkeys(fast, tok)
    prompts = prompt_ids if isinstance(prompt_ids, dict) else dict.fromkeys(fast, prompt_ids)
    out = {name: {"tokens_per_s_batch1": 0.0, "tokens_per_s_batched": 0.0} for name in fast}
    for key, batch in (("tokens_per_s_batch1", 1), ("tokens_per_s_batched", cfg.speed_batch_size)):
        rows = {name: (prompts[name] * batch)[:batch] for name in fast}
        for name, m in fast.items():  # warm-up
            timed_generation(m, toks[name], rows[name], cfg.speed_new_tokens)
        for _ in range(cfg.speed_repeats):
            interrupt.check()
            for name, m in fast.items():
                rate = timed_generation(m, toks[name], rows[name], cfg.speed_new_tokens)
                out[name][key] = max(out[name][key], rate)
    return out


def peak_rss_kib() -> int:
    """This process's peak resident memory in KiB: ``VmHWM``, which starts afresh at exec (Linux's
    ``ru_maxrss`` does not: a child would report its parent's peak), else ``ru_maxrss``."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _memory_child(folder: str, prompt: list[int], new_tokens: int, dtype: str) -> dict:
    from transformers import AutoModelForCausalLM as Auto  # imported before the baseline

    before = peak_rss_kib()
    model = Auto.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    with torch.no_grad():
        model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=0)  # fmt: skip
    peak = peak_rss_kib()
    mib = {"peak_rss_mib": peak, "runtime_rss_mib": before, "model_peak_mib": peak - before}
    return {k: v / 1024 for k, v in mib.items()}


def peak_memory(folder: Path, prompt: list[int], new_tokens: int, dtype: torch.dtype) -> dict:
    """Peak resident memory of a fresh process that loads the model from ``folder`` in ``dtype`` and
    answers ``prompt`` with ``new_tokens`` tokens (MiB): all of it (``peak_rss_mib``), the Python,
    torch and transformers runtime it held before loading (``runtime_rss_mib``), and the difference,
    the model's own share (``model_peak_mib``: weights, activations, KV cache)."""
    import json
    import subprocess
    import sys

    args = json.dumps([str(folder), prompt, new_tokens, str(dtype).removeprefix("torch.")])
    code = ("import json, sys; from distill.evaluate.metrics import _memory_child; "
            "print(json.dumps(_memory_child(*json.loads(sys.argv[1]))))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def evaluate_model(
    name: str,
    model: PreTrainedModel | None,
    teacher_fp32: PreTrainedModel | None,
    tok: Tokenizer,
    heldout: list[Prompt],
    prompt_ids: dict[str, list[int]],
    answers: dict[str, dict],
    cfg: EvaluateConfig,
    *,
    weights_dir: Path | None,
    max_seq_len: int,
    reference_answers: bool = False,
    judge: tuple[PreTrainedModel, Tokenizer, dict[str, list[int]]] | None = None,
) -> tuple[dict, list[dict]]:
    """Fidelity, answer quality and size of one model, and its greedy held-out answers
    (speed is measured for all models together by ``compare_speed``).

    ``reference_answers``: the model is the teacher that wrote ``answers``; its answer
    metrics are computed on those stored answers rather than on a new generation.
    ``model`` None (a teacher reached only through an API): those answer metrics alone.
    ``judge``: (teacher, its tokenizer, its prompt ids) for a model with another tokenizer than the
    teacher's (``teacher_fp32`` None then): its answers' text is read again in the teacher's tokens
    after the teacher's prompt, so ``teacher_logprob`` judges every model in the same tokens.
    """
    pad = tok.pad_token_id
    answers = {p.id: answers[answer_key(p.id)] for p in heldout if answer_key(p.id) in answers}  # sample 0
    scored = [p for p in heldout if p.id in answers]
    examples = [make_example(prompt_ids[p.id], answers[p.id]["token_ids"], max_seq_len) for p in scored]
    with progress_bar("prompt") as bar:
        res: dict = {"kl": None, "top1_agreement": None, "perplexity": None}
        if model is not None:
            forced = bar.add_task(f"{name}: teacher-forced scores", total=len(scored), info="kl, top-1, ppl")
            model = model.float()  # fidelity and answers in fp32: bf16 greedy answers vary with padding
            res = forced_metrics(model, teacher_fp32, examples, pad, cfg.batch_size, vocab_size=len(tok))
            bar.update(forced, advance=len(scored))
        what = "stored answers (read, not generated)" if reference_answers else "greedy answers"
        task = bar.add_task(f"{name}: {what}", total=len(scored), info="")
        outputs, own = [], []  # own: (prompt + the model's own answer) for the teacher to judge
        # The teacher's stored answers are the reference: its row scores them as they are
        # (exact match 1 by definition) instead of re-generating with other batch padding.
        for p in scored if reference_answers else []:
            outputs.append({"id": p.id, "model": name, "text": answers[p.id]["text"],
                            "finish_reason": answers[p.id]["finish_reason"]})  # fmt: skip
            own.append(make_example(prompt_ids[p.id], answers[p.id]["token_ids"], max_seq_len))
        bar.update(task, advance=len(outputs))
        for i in range(0, len(scored) if not reference_answers else 0, cfg.batch_size):
            chunk = scored[i : i + cfg.batch_size]
            interrupt.check()
            gens = generate_batch(
                model, tok, [prompt_ids[p.id] for p in chunk], max_new_tokens=cfg.max_new_tokens
            )
            for p, g in zip(chunk, gens, strict=True):
                text = tok.decode(g.token_ids, skip_special_tokens=True)
                outputs.append({"id": p.id, "model": name, "text": text, "finish_reason": g.finish_reason})
                own.append(make_example(prompt_ids[p.id], g.token_ids, max_seq_len))
            bar.update(task, advance=len(chunk))
    # each prompt's figures, for the intervals over prompts (distill.stats, the report)
    forced = dict(zip([p.id for p in scored], res.get("per_example") or [{}] * len(scored), strict=True))
    res.pop("per_example", None)
    # the bytes of the scored answer text (as truncated to max_seq_len): bits per byte does not
    # depend on the tokenizer, so models with different tokenizers compare on it
    scored_bytes = {p.id: len(tok.decode([i for i, m in zip(*ex, strict=True) if m], skip_special_tokens=True)
                              .encode()) for p, ex in zip(scored, examples, strict=True)}  # fmt: skip
    judge_model, judge_pad, to_judge = teacher_fp32, pad, own
    if judge is not None:  # another tokenizer: the answers' text in the teacher's tokens
        from distill.core.data import student_answer_ids

        judge_model, j_tok, j_prompts = judge
        judge_pad = j_tok.pad_token_id if j_tok.pad_token_id is not None else j_tok.eos_token_id
        ans = [student_answer_ids(j_tok, o["text"], o["finish_reason"] == "stop") for o in outputs]
        to_judge = [
            make_example(j_prompts[o["id"]], a, max_seq_len) for o, a in zip(outputs, ans, strict=True)
        ]
    judged_ids = [o["id"] for o, e in zip(outputs, to_judge, strict=True) if any(e[1])]
    judged = {}
    if judge_model is not None and judged_ids:
        rows = forced_metrics(
            judge_model, None, [e for e in to_judge if any(e[1])], judge_pad, cfg.batch_size
        )
        judged = dict(zip(judged_ids, rows["per_example"], strict=True))
    teacher_text = {p.id: answers[p.id]["text"] for p in scored}
    refs = {p.id: p.reference for p in scored if p.reference}
    per_prompt = []
    for o, e in zip(outputs, own, strict=True):
        f, j = forced.get(o["id"], {}), judged.get(o["id"], {})  # e: in the model's own tokens
        per_prompt.append({
            "id": o["id"], "kl": f.get("kl"), "agree": f.get("agree"), "ce": f.get("ce"),
            "tokens": f.get("tokens"), "answer_tokens": sum(e[1]), "bytes": scored_bytes[o["id"]],
            "exact_match": float(o["text"].strip() == teacher_text[o["id"]].strip()),
            "rouge_l": rouge_l(o["text"], teacher_text[o["id"]]),
            "correct": float(matches_reference(o["text"], refs[o["id"]])) if o["id"] in refs else None,
            "judge_logprob": -j["ce"] if j else None, "judge_tokens": j.get("tokens"),
        })  # fmt: skip
    judged_tokens = sum(r["judge_tokens"] or 0 for r in per_prompt)
    judged_sum = sum(r["judge_logprob"] for r in per_prompt if r["judge_tokens"])
    res["teacher_logprob"] = judged_sum / judged_tokens if judged_tokens else None
    n = max(len(per_prompt), 1)
    total_bytes = sum(r["bytes"] for r in per_prompt)
    ce_sum = sum(r["ce"] for r in per_prompt if r["ce"] is not None)
    res["bits_per_byte"] = ce_sum / math.log(2) / total_bytes if model is not None and total_bytes else None
    res["exact_match"] = sum(r["exact_match"] for r in per_prompt) / n
    res["rouge_l"] = sum(r["rouge_l"] for r in per_prompt) / n
    graded = [r["correct"] for r in per_prompt if r["correct"] is not None]
    res["reference_accuracy"] = sum(graded) / len(graded) if refs else None
    res["reference_prompts"] = len(refs)
    # KL and top-1 agreement pair token ids: None for a model with its own tokenizer, which is then
    # compared with the teacher by bits per byte (perplexity is per token of its own tokenizer)
    res["own_tokenizer"] = judge is not None
    res["per_prompt"] = per_prompt
    res["params"] = count_params(model) if model is not None else None
    res["bytes"] = folder_bytes(weights_dir) if weights_dir is not None else None
    res["num_layers"] = model.config.num_hidden_layers if model is not None else None
    return res, outputs


def results_table(results: dict[str, dict]) -> Table:
    """Models side by side, one metric a row."""
    table = Table(title="teacher vs students (held-out prompts)")
    table.add_column("metric")
    for name in results:
        table.add_column(name, justify="right")
    for m in METRICS:
        row = []
        for r in results.values():
            v = r.get(m)
            if v is None:
                row.append("-")
            elif m in ("params", "bytes"):
                row.append(f"{v / 1e6:,.1f}M" if m == "params" else f"{v / 2**20:,.1f} MiB")
            elif isinstance(v, float):
                row.append(f"{v:.3f}" if abs(v) < 1000 else f"{v:,.0f}")
            else:
                row.append(str(v))
        table.add_row(m, *row)
    return table


def _as_fraction(text: str) -> Fraction | None:
    try:
        return Fraction(text.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None
