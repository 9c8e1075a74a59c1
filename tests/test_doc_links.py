"""Docs point at things that exist: every ``bench/results/`` record named in the repo's Markdown,
Python and shell files, and every relative Markdown link (with its ``#anchor``) in README.md,
bench/README.md and docs/."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECORD = re.compile(r"bench/results/([A-Za-z0-9_.\-]+)")
LINK = re.compile(r"\]\(([^)\s]+)\)")
OUTPUT_EXAMPLES = {"bench/results/generate-h200.json", "bench/results/profile.json"}  # --out targets in docstrings
PAGES = ["README.md", "bench/README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


def _tracked() -> list[str]:
    try:
        listed = subprocess.run(["git", "ls-files", "*.md", "*.py", "*.sh"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    return [name for name in listed if not name.startswith("bench/results/")]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as dashes."""
    return re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        heading = None if in_code else re.match(r"#+\s+(.*)", line)
        if heading:
            slug = _slug(heading.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def test_every_named_record_exists() -> None:
    missing = []
    for name in _tracked():
        text = (ROOT / name).read_text(errors="replace")
        for match in RECORD.finditer(text):
            path = "bench/results/" + match.group(1).rstrip(".")
            if path not in OUTPUT_EXAMPLES and "<" not in text[match.start():match.end() + 1]:
                if not (ROOT / path).exists():
                    missing.append(f"{name}: {path}")
    assert not missing, "records named but not in bench/results/:\n" + "\n".join(missing)


def test_every_relative_link_resolves() -> None:
    broken = []
    for name in PAGES:
        page = ROOT / name
        for match in LINK.finditer(page.read_text()):
            target = match.group(1)
            if re.match(r"[a-z]+:", target):
                continue  # http:, https:, mailto:
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                broken.append(f"{name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{name}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)
