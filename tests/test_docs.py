"""The Markdown documentation renders as written: code fences close and relative links and anchors resolve."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def github_anchor(heading: str) -> str:
    """GitHub's heading id: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"`", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@functools.cache  # README links into docs/benchmarks.md many times: read each file once
def prose_and_anchors(path: Path) -> tuple[tuple[tuple[int, str], ...], frozenset[str], bool]:
    """The lines outside code blocks, the file's heading anchors and whether every code fence was closed."""
    prose, anchors, seen, in_code = [], set(), {}, False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            continue
        prose.append((number, line))
        if heading := re.match(r"#{1,6} (.+)", line):
            anchor = github_anchor(heading.group(1))
            count = seen.get(anchor, 0)  # GitHub numbers repeated headings: x, x-1, x-2
            seen[anchor] = count + 1
            anchors.add(anchor if count == 0 else f"{anchor}-{count}")
    return tuple(prose), frozenset(anchors), not in_code


def test_github_anchor_matches_githubs_rule():
    assert github_anchor("1200 iterations: every trainer with two labeled cases (three seeds)") == \
        "1200-iterations-every-trainer-with-two-labeled-cases-three-seeds"
    assert github_anchor("Every run with DA5's augmentation: the bounds and POPCORN") == \
        "every-run-with-da5s-augmentation-the-bounds-and-popcorn"
    assert github_anchor("The cohort (`nnunet_ssl make-cohort`)") == "the-cohort-nnunet_ssl-make-cohort"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_markdown_fences_links_and_anchors(path: Path):
    prose, _, closed = prose_and_anchors(path)
    assert closed, f"{path.name}: a code fence is never closed"
    stray = [n for n, line in prose if line.startswith("# ") and n > 1]
    assert not stray, f"{path.name}: top-level headings outside code blocks at lines {stray} (a fence out of step?)"
    broken = []
    for number, line in prose:
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                broken.append(f"line {number}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in prose_and_anchors(linked)[1]:
                broken.append(f"line {number}: {target} (no such heading)")
    assert not broken, f"{path.name}: " + "; ".join(broken)
