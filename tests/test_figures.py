"""bench/figures.py: the docs' measured figures against bench/results/*.json."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "figures.py"


def _check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--root", str(root)],
        capture_output=True,
        text=True,
        check=False,
    )


def _copy_docs(dst: Path) -> None:
    """The files the check reads: README.md, bench/RESULTS.md, docs/*.md, bench/results/."""
    shutil.copy(ROOT / "README.md", dst / "README.md")
    shutil.copytree(ROOT / "docs", dst / "docs", ignore=shutil.ignore_patterns("*.png"))
    (dst / "bench").mkdir()
    shutil.copy(ROOT / "bench" / "RESULTS.md", dst / "bench" / "RESULTS.md")
    shutil.copytree(ROOT / "bench" / "results", dst / "bench" / "results")


def test_repository_figures_match_their_json() -> None:
    result = _check(ROOT)
    assert result.returncode == 0, result.stdout


def test_a_changed_figure_fails_naming_its_line(tmp_path: Path) -> None:
    _copy_docs(tmp_path)
    readme = tmp_path / "README.md"
    lines = readme.read_text().splitlines(keepends=True)
    tag = "<!-- serve.json: llamacpp_ratios.q8_0.single -->"
    number = next(i for i, line in enumerate(lines) if "4.24×" + tag in line.replace("**", ""))
    lines[number] = lines[number].replace("4.24×", "4.42×")
    readme.write_text("".join(lines))

    result = _check(tmp_path)

    assert result.returncode == 1
    assert f"README.md:{number + 1}: 4.42" in result.stdout
    assert "llamacpp_ratios.q8_0.single" in result.stdout


def test_an_untagged_figure_fails(tmp_path: Path) -> None:
    _copy_docs(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(readme.read_text() + "\nThe student runs at 3.14× the teacher's speed.\n")

    result = _check(tmp_path)

    assert result.returncode == 1
    assert "3.14×: untagged figure" in result.stdout


def test_tags_resolve_dotted_keys_transforms_and_tolerance() -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    import figures

    data = {"teachers": {"smollm2-1.7b-shape": {"ratio": 0.4977}}, "rows": [{"s": 90.0}]}
    assert figures.resolve(data, "teachers.smollm2-1.7b-shape.ratio") == 0.4977
    assert figures.resolve(data, "rows.0.s") == 90.0
    assert figures.parse_number("−1,442.5") == (-1442.5, 1)
    assert abs(figures.TRANSFORMS["pct"](0.0069) - 0.69) < 1e-12
    assert figures.TRANSFORMS["min"](90.0) == 1.5
