"""Build a shrunk student from the teacher: which layers, heads and MLP channels it keeps.

Depth: evenly spaced layers, or the most important by block importance. Width: the most
important attention heads and MLP channels by activation (NVIDIA's Minitron). With a parameter
target, a grid of shapes is searched: each is built, scored untrained against the teacher on
calibration answers, and timed; the lowest untrained KL wins. Every candidate is printed and
written to ``student_candidates.json``, so the choice is visible.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict

import torch
from transformers import PreTrainedModel

from distill.core.config import StudentConfig
from distill.core.data import prompt_part
from distill.core.models import count_params
from distill.core.progress import console
from distill.core.units import parse_count
from distill.evaluate.metrics import forced_metrics, timed_generation
from distill.student.importance import (
    Candidate,
    WidthImportance,
    block_importance,
    most_important_layers,
    top_channels,
    top_heads,
    width_importance,
)
from distill.student.prune import evenly_spaced_layers, prune_width, shrink_layers

Example = tuple[list[int], list[bool]]


MLP_FRACTIONS = (1.0, 0.75, 0.5)  # the shape search's MLP widths, of the teacher's


SPEED_TOKENS = 16


def build_student(
    teacher: PreTrainedModel,
    layers: list[int],
    num_heads: int | None = None,
    intermediate_size: int | None = None,
    width: WidthImportance | None = None,
    hidden_size: int | None = None,
) -> PreTrainedModel:
    """The teacher's ``layers``, each cut to its ``num_heads`` most important heads and
    ``intermediate_size`` most important MLP channels, and the residual stream to its
    ``hidden_size`` most important channels (None: all; ``width`` needed otherwise)."""
    student = shrink_layers(teacher, layers)
    cfg = teacher.config
    if num_heads == cfg.num_attention_heads:
        num_heads = None
    if intermediate_size == cfg.intermediate_size:
        intermediate_size = None
    if hidden_size == cfg.hidden_size:
        hidden_size = None
    if num_heads is None and intermediate_size is None and hidden_size is None:
        return student
    if width is None:
        raise ValueError("width pruning needs the teacher's width importance")
    heads = (
        [top_heads(width.heads[i], cfg.num_key_value_heads, num_heads) for i in layers] if num_heads else None
    )
    channels = (
        [top_channels(width.channels[i], intermediate_size) for i in layers] if intermediate_size else None
    )
    hidden = top_channels(width.hidden, hidden_size) if hidden_size else None
    return prune_width(student, heads, channels, hidden)


def _per_layer_params(
    teacher: PreTrainedModel, num_heads: int | None, inter: int | None, width
) -> tuple[int, int]:
    """(parameters outside the decoder layers, parameters per layer) of a student of this width."""
    one, two = (count_params(build_student(teacher, list(range(k)), num_heads, inter, width)) for k in (1, 2))
    return one - (two - one), two - one


def width_grid(teacher: PreTrainedModel) -> list[tuple[int, int]]:
    """(heads, MLP channels) of the shape search: every multiple of the key/value heads from all
    down to two thirds of them; MLP at ``MLP_FRACTIONS`` of the teacher's, rounded to a multiple of
    64 (of 8 below 512)."""
    cfg = teacher.config
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_options = [h for h in range(n_heads, 0, -n_kv) if h >= math.ceil(2 * n_heads / 3) and h % n_kv == 0]
    step = 64 if cfg.intermediate_size >= 512 else 8  # matmul-friendly widths
    mlp = dict.fromkeys(max(step, round(cfg.intermediate_size * f / step) * step) for f in MLP_FRACTIONS)
    return [(h, inter) for h in head_options or [n_heads] for inter in mlp]


def depth_for_params(teacher: PreTrainedModel, heads: int, inter: int, target: int, width) -> int:
    """The deepest student of this width with at most ``target`` parameters (0: none fits)."""
    base, per_layer = _per_layer_params(teacher, heads, inter, width)
    return int(max(0, min(teacher.config.num_hidden_layers, (target - base) // per_layer)))


def depth_for_speedup(
    teacher: PreTrainedModel, fast_teacher: PreTrainedModel, heads: int, inter: int, target: float, tok,
    rows: list[list[int]], dtype: torch.dtype, width,
) -> int:  # fmt: skip
    """The deepest student of this width expected to generate at ``target`` x the teacher's speed
    or more (0: none). Seconds per token at a third and two thirds of the teacher's depth are timed
    beside the teacher's and fitted to ``a + b * depth`` (a: embeddings, head and the decoding loop;
    b: one layer); the fit gives the depth."""
    n = teacher.config.num_hidden_layers
    d1, d2 = max(1, n // 3), max(2, 2 * n // 3)
    per_token = {}
    for d in (d1, d2):
        probe = build_student(teacher, list(range(d)), heads, inter, width).to(dtype)
        per_token[d] = 1 / _speedup(probe, fast_teacher, tok, rows)  # in units of the teacher's time
    b = (per_token[d2] - per_token[d1]) / (d2 - d1)
    a = per_token[d1] - b * d1
    if b <= 0:  # timing noise swamped the layers' cost: no reliable answer from this width
        return 0
    return int(max(0, min(n, (1 / target - a) // b)))


def _speedup(student: PreTrainedModel, teacher: PreTrainedModel, tok, rows: list[list[int]]) -> float:
    """Batch-1 generation tokens/s of ``student`` over ``teacher`` (both already in the speed
    dtype), timed in alternation, best of two rounds each: a slow moment of a shared machine hits
    both."""
    for m in (teacher, student):
        timed_generation(m, tok, rows, 4)  # warm-up
    best = {"t": 0.0, "s": 0.0}
    for _ in range(2):
        best["t"] = max(best["t"], timed_generation(teacher, tok, rows, SPEED_TOKENS))
        best["s"] = max(best["s"], timed_generation(student, tok, rows, SPEED_TOKENS))
    return best["s"] / best["t"]


def choose_student(
    s: StudentConfig,
    teacher: PreTrainedModel,
    tok,
    calib: list[Example] | None,
    speed_dtype: torch.dtype,
) -> tuple[PreTrainedModel, Candidate, dict]:
    """The shrunk student ``s`` asks for, the candidate it came from, and the record of every
    candidate (``calib`` None: no teacher answers yet, so nothing can be scored: even layers only)."""
    n = teacher.config.num_hidden_layers
    if calib is None:
        layers = s.layers or evenly_spaced_layers(n, s.num_layers)
        return build_student(teacher, layers), Candidate("given" if s.layers else "even", layers), {}
    pad = tok.pad_token_id
    importance = block_importance(teacher, calib, pad)
    needs_width = any(
        x is not None
        for x in (s.num_heads, s.intermediate_size, s.hidden_size, s.target_params, s.target_speedup)
    )
    width = width_importance(teacher, calib, pad) if needs_width else None
    prompt_rows = [prompt_part(*calib[0])]
    fast_teacher = copy.deepcopy(teacher).to(speed_dtype)
    searching = s.target_params is not None or s.target_speedup is not None
    if searching:
        shapes = []
        for heads, inter in width_grid(teacher):
            depths = []
            if s.target_params is not None:
                depths.append(depth_for_params(teacher, heads, inter, parse_count(s.target_params), width))
            if s.target_speedup is not None:
                depths.append(depth_for_speedup(teacher, fast_teacher, heads, inter, s.target_speedup, tok,
                                                prompt_rows, speed_dtype, width))  # fmt: skip
            depth = min(depths)
            if depth >= 1 and (depth, heads, inter) not in shapes:
                shapes.append((depth, heads, inter))
        if not shapes:
            wanted = f"target_params={s.target_params}, target_speedup={s.target_speedup}"
            raise ValueError(f"no student of the searched shapes meets student.{wanted}; relax them")
        selections = [s.layer_selection]
    else:
        shapes = [(len(s.layers) if s.layers else s.num_layers, s.num_heads, s.intermediate_size)]
        selections = ["given"] if s.layers else ["even", "importance"]
    candidates = []
    for depth, heads, inter in shapes:
        for sel in selections:
            if sel == "given":
                layers = s.layers
            elif sel == "even":
                layers = evenly_spaced_layers(n, depth)
            else:
                layers = most_important_layers(importance, depth)
            name = f"{sel}-{depth}L-{heads}h-{inter}ffn" if searching else sel
            candidates.append(Candidate(name, layers, heads, inter, s.hidden_size))
    speedups: dict[tuple, float] = {}  # one timing per shape: the layers kept do not change the speed
    for c in candidates:
        student = build_student(teacher, c.layers, c.num_heads, c.intermediate_size, width, c.hidden_size)
        m = forced_metrics(student, teacher, calib, pad, 8, len(tok))
        c.untrained_kl, c.untrained_top1 = m["kl"], m["top1_agreement"]
        c.params = count_params(student)
        shape = (len(c.layers), c.num_heads, c.intermediate_size, c.hidden_size)
        if shape not in speedups:
            speedups[shape] = _speedup(student.to(speed_dtype), fast_teacher, tok, prompt_rows)
        c.speedup = speedups[shape]
        console.print(f"  candidate {c.name:<10} {len(c.layers)} layers, {c.params / 1e6:.1f}M params: "
                      f"untrained KL {c.untrained_kl:.2f}, top-1 {c.untrained_top1:.3f} on {len(calib)} "
                      f"calibration answers; {c.speedup:.2f}x the teacher's speed")  # fmt: skip
    if searching:
        # the lowest untrained KL among those measured fast enough (the fit is a prediction)
        fast = [c for c in candidates if s.target_speedup is None or c.speedup >= s.target_speedup]
        if not fast:
            console.print(f"[yellow]no candidate measured {s.target_speedup}x the teacher's speed; taking "
                          "the fastest[/yellow]")  # fmt: skip
        chosen = min(fast, key=lambda c: c.untrained_kl) if fast else max(candidates, key=lambda c: c.speedup)
    else:
        chosen = next(c for c in candidates if c.name == ("given" if s.layers else s.layer_selection))
    report = {
        "chosen": chosen.name,
        "importance": importance,
        "target_params": s.target_params,
        "target_speedup": s.target_speedup,
        "speed_dtype": str(speed_dtype).removeprefix("torch."),
        "candidates": [asdict(c) for c in candidates],
    }
    student = build_student(
        teacher, chosen.layers, chosen.num_heads, chosen.intermediate_size, width, chosen.hidden_size
    )
    return student, chosen, report
