"""What the bench scripts share: argparse types, dtype names, tolerances, the usage error."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch

__all__ = ["positive_ints", "names_from", "UsageError", "DTYPES", "DEFAULT_TOL", "exit_status", "git_commit",
           "write_record"]

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# ||out-ref|| / ||ref||. bf16: the Inductor-vs-eager level; on the 16-layer reference decoder plain
# torch.compile (no graphs at all) measured rel_err 0.019-0.023 on an H100 (2026-11-23), so 2e-2 failed it.
DEFAULT_TOL = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-4}


class UsageError(ValueError):
    """Flags that cannot work together; the script's main() prints it and exits 2."""


def positive_ints(raw: str) -> tuple[int, ...]:
    """``"1,4,16"`` -> ``(1, 4, 16)``; anything else is an argparse error naming the value."""
    try:
        values = tuple(int(item) for item in raw.split(",") if item.strip())
    except ValueError:
        values = ()
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{raw!r}: expected comma-separated positive ints, e.g. 1,4,16")
    return values


def names_from(choices: Collection[str]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type for a comma list of names out of ``choices``."""
    def parse(raw: str) -> tuple[str, ...]:
        names = tuple(item.strip() for item in raw.split(",") if item.strip())
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown modes {unknown}; choose from {','.join(choices)}")
        return names
    return parse


def exit_status(results: Mapping[str, Any]) -> int:
    """1 (and the reasons on stderr) when a mode failed or disagreed with eager, else 0."""
    bad = {**results["failed"], **results["wrong"]}
    if bad:
        print("\nBENCH FAILED: " + "; ".join(f"{m}: {r}" for m, r in bad.items()), file=sys.stderr)
        return 1
    return 0


def git_commit(root: Path) -> str | None:
    """$BENCH_COMMIT if set, else HEAD's short hash in ``root`` (+'-dirty' when tracked files
    differ), or None without git. Set BENCH_COMMIT where the tree was copied with a stale .git."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def write_record(out: Path, kind: str, results: Mapping[str, Any], markdown: Callable[[Mapping[str, Any]], str],
                 quiet: bool = False) -> Path:
    """Write ``results`` as ``<date>-<device>-<kind>-<commit>.json`` and its Markdown beside it in
    ``out``; print the Markdown unless ``quiet``. ``results`` holds "device" (a GPU's name or
    "cpu") and "commit". Returns the JSON's path."""
    device = results["device"]
    device = "cpu" if device == "cpu" else device.lower().replace("nvidia ", "nvidia-").split()[0]
    stem = f"{datetime.date.today().isoformat()}-{device}-{kind}-{results['commit'] or 'nogit'}"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    (out / f"{stem}.md").write_text(text)
    if not quiet:
        print(text)
    return path
