"""Check every measured figure in the docs against the JSON it came from.

A measured figure in README.md, bench/RESULTS.md or docs/*.md carries an HTML comment right
after it (and after its unit, if any) naming its source: a file under bench/results/ and a key
path in it. The comment is invisible on GitHub; the paragraph or table should name the file in
visible text as well, e.g. "(bench/results/quality.json)".

    KL **1.54**<!-- quality.json: table.width14_hidden_prompt_lr2x.kl.mean -->
    2.21×<!-- quality.json: new_default_speedup_batch1 -->
    +0.7%<!-- cache.json: cache_vs_dense_heldout_kl_rel_diff |pct -->
    4.2 min<!-- cache_scaling.json: raw.cache.0.train_seconds |min -->
    0.58×<!-- serve.json: a.b / c.d -->

Key paths are dot-separated; a list is indexed by an integer; a key that itself contains dots
(``smollm2-1.7b-shape``) is found as written. ``KEY / KEY`` (spaces around the slash) divides
two values of the same file. Transforms, after ``|``, applied in order:

    pct   x 100 (a ratio shown as a percentage)     min   seconds shown as minutes
    ms    seconds shown as milliseconds              inv   1 / x
    1-    1 - x (e.g. "40% lower": ``|1- |pct``)     -1    x - 1 (e.g. "+52%": ``|-1 |pct``)
    neg   -x                                         abs   |x|
    k M G thousands, millions, billions              MB GB MiB GiB   bytes in those units

A figure matches when it is within half a unit of its last printed digit of the JSON value
(``1.46`` matches 1.4551 to 1.4649; ``357`` matches 356.5 to 357.5).

``--check`` also lists numbers that look measured but carry no tag: a number with a decimal
point, or one followed by x, %, s, min, ms, MB, GB, MiB, GiB, tok/s or tokens/s. Fenced code
blocks, inline code, link targets, versions (``0.3.36``) and names (``SmolLM2-1.7B``) are
skipped. A number that is not a measurement (a config value, a target) is marked
``<!-- not measured -->`` right after it, the same way.

    python bench/figures.py --check            # exit 1 and one line per problem
    python bench/figures.py --check --root DIR # a copy of the repository
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

DOCS = ("README.md", "bench/RESULTS.md", "docs/*.md")
RESULTS = "bench/results"

_NUMBER = r"(?P<num>[−-]?\d[\d,]*(?:\.\d+)?)"
_UNIT = r"(?:×|x\b|%|\s?(?:tokens/s|tok/s|min|ms|s|MB|GB|MiB|GiB|M|k)\b)"
# A number, its unit, closing emphasis or code, then the comment.
TAGGED = re.compile(_NUMBER + r"(?P<unit>" + _UNIT + r")?[*_`]*<!--(?P<tag>.*?)-->")
UNTAGGED = re.compile(
    r"(?<![\w.,/#])"
    + _NUMBER
    + r"(?![\d.]*\w)(?P<unit>×|%|\s?(?:tokens/s|tok/s|min|ms|s|MB|GB|MiB|GiB)(?![\w/]))?"
)
NOT_MEASURED = "not measured"

TRANSFORMS = {
    "pct": lambda x: x * 100,
    "min": lambda x: x / 60,
    "ms": lambda x: x * 1000,
    "inv": lambda x: 1 / x,
    "1-": lambda x: 1 - x,
    "-1": lambda x: x - 1,
    "neg": lambda x: -x,
    "abs": abs,
    "k": lambda x: x / 1e3,
    "M": lambda x: x / 1e6,
    "G": lambda x: x / 1e9,
    "MB": lambda x: x / 1e6,
    "GB": lambda x: x / 1e9,
    "MiB": lambda x: x / 2**20,
    "GiB": lambda x: x / 2**30,
}


@dataclass
class Problem:
    """One line of the report: where, what the text says, what the JSON says."""

    where: str
    text: str
    detail: str

    def __str__(self) -> str:
        return f"{self.where}: {self.text}: {self.detail}"


def resolve(data: object, path: str) -> float:
    """The number at a dot-separated key path; keys that contain dots are matched whole.

    Raises:
        KeyError: no such key, or the value is not a number.
    """
    parts = path.split(".")
    node = data
    i = 0
    while i < len(parts):
        if isinstance(node, list):
            node = node[int(parts[i])]
            i += 1
            continue
        if not isinstance(node, dict):
            raise KeyError(path)
        for j in range(len(parts), i, -1):  # longest key first: "smollm2-1.7b-shape"
            key = ".".join(parts[i:j])
            if key in node:
                node = node[key]
                i = j
                break
        else:
            raise KeyError(path)
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise KeyError(path)
    return float(node)


def parse_number(text: str) -> tuple[float, int]:
    """The printed value and its number of decimals (``"−1,442.5"`` -> (-1442.5, 1))."""
    text = text.replace("−", "-").replace(",", "")
    decimals = len(text.split(".")[1]) if "." in text else 0
    return float(text), decimals


def json_value(tag: str, root: Path, cache: dict[str, object]) -> float:
    """The value a tag names, transforms applied.

    Raises:
        KeyError / FileNotFoundError / ValueError: a bad tag, file or key.
    """
    name, _, rest = tag.partition(":")
    name = name.strip()
    if name not in cache:
        cache[name] = json.loads((root / RESULTS / name).read_text())
    expression, *transforms = rest.split("|")
    keys = [k.strip() for k in expression.split(" / ")]
    value = resolve(cache[name], keys[0])
    if len(keys) == 2:
        value /= resolve(cache[name], keys[1])
    for t in transforms:
        value = TRANSFORMS[t.strip()](value)
    return value


def _strip_code(line: str) -> str:
    """Blank inline code spans and link targets so their digits are not read as figures."""
    line = re.sub(r"`[^`]*`", lambda m: " " * len(m.group()), line)
    return re.sub(r"\]\([^)]*\)", lambda m: " " * len(m.group()), line)


def check_line(where: str, line: str, root: Path, cache: dict[str, object]) -> tuple[int, list[Problem]]:
    """Compare the tagged figures of one line with their JSON and flag untagged ones."""
    problems: list[Problem] = []
    tagged = 0
    rest = _strip_code(line)
    for m in TAGGED.finditer(rest):
        tag = m["tag"].strip()
        if tag == NOT_MEASURED:
            continue
        tagged += 1
        printed, decimals = parse_number(m["num"])
        try:
            value = json_value(tag, root, cache)
        except (KeyError, OSError, ValueError, IndexError, ZeroDivisionError) as e:
            problems.append(Problem(where, m["num"], f"no value for <!-- {tag} --> ({e!r})"))
            continue
        if not math.isclose(abs(printed - value), 0, abs_tol=0.5 * 10**-decimals + 1e-9):
            problems.append(Problem(where, m["num"], f"JSON {value:.6g} <!-- {tag} -->"))
    rest = TAGGED.sub(lambda m: " " * len(m.group()), rest)
    rest = re.sub(r"<!--.*?-->", lambda m: " " * len(m.group()), rest)
    for m in UNTAGGED.finditer(rest):
        before = rest[: m.start()]
        if re.search(r"[A-Za-z]-$", before):  # a name: SmolLM2-1.7B, Llama-3.2
            continue
        if "." in m["num"] or m["unit"]:
            problems.append(Problem(where, m["num"] + (m["unit"] or ""), "untagged figure"))
    return tagged, problems


def check(root: Path) -> tuple[int, list[Problem]]:
    """Check every doc under root; return the number of tagged figures and the problems."""
    cache: dict[str, object] = {}
    problems: list[Problem] = []
    tagged = 0
    files = sorted({p for pattern in DOCS for p in root.glob(pattern)})
    for path in files:
        fenced = False
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.lstrip().startswith(("```", "~~~")):
                fenced = not fenced
                continue
            if fenced:
                continue
            where = f"{path.relative_to(root)}:{number}"
            n, found = check_line(where, line, root, cache)
            tagged += n
            problems.extend(found)
    return tagged, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare the docs with the JSON")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args(argv)
    if not args.check:
        parser.print_help()
        return 2
    tagged, problems = check(args.root)
    for p in problems:
        print(p)
    print(f"{tagged} figures checked, {len(problems)} problems", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
