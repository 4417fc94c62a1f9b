# SPDX-License-Identifier: Apache-2.0
"""Documentation links resolve, and no file points at material users do not have.

Every ``docs/<page>.md#anchor`` written anywhere in the repository's text files, and every
``page.md#anchor`` or ``#anchor`` link inside ``docs/``, must name a heading of that page by
GitHub's anchor rules. The scan covers tracked files and new files git does not ignore.
"""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml"}
# Recorded data, kept byte-identical to what produced it.
EXEMPT = ("tests/golden/cases/",)
DOC_REF = re.compile(r"docs/([\w.-]+\.md)#([\w-]+)")
RELATIVE_LINK = re.compile(r"\]\(([\w.-]+\.md)#([\w-]+)\)")
IN_PAGE_LINK = re.compile(r"\]\(#([\w-]+)\)")
# Written so that this file does not match itself.
PRIVATE = (re.compile(r"\.\./shared"), re.compile(r"\bspec [A-E]\d", re.IGNORECASE))


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation dropped except ``-`` and ``_``,
    spaces become ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors_of(text: str) -> set[str]:
    """Every heading anchor of a markdown page; repeated headings get ``-1``, ``-2``..."""
    seen: dict[str, int] = {}
    anchors = set()
    in_code = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        match = None if in_code else re.match(r"#{1,6}\s+(.+?)\s*#*\s*$", line)
        if match:
            base = github_anchor(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            anchors.add(base if count == 0 else f"{base}-{count}")
    return anchors


@cache
def repo_text_files() -> tuple[str, ...]:
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return tuple(
        name
        for name in listed
        if Path(name).suffix in TEXT_SUFFIXES
        and not name.startswith(EXEMPT)
        and (ROOT / name).is_file()
    )


def _references(name: str, text: str):
    for match in DOC_REF.finditer(text):
        yield f"docs/{match.group(1)}", match.group(2)
    if name.startswith("docs/"):
        for match in RELATIVE_LINK.finditer(text):
            yield str(Path(name).parent / match.group(1)), match.group(2)
        for match in IN_PAGE_LINK.finditer(text):
            yield name, match.group(1)


def test_anchor_rules():
    assert github_anchor("MS-DETR: implementation (a)") == "ms-detr-implementation-a"
    assert github_anchor("H-DETR: results") == "h-detr-results"
    assert anchors_of("## A b\n```\n## not a heading\n```\n### A b\n") == {"a-b", "a-b-1"}


def test_doc_anchors_resolve():
    broken = []
    checked = 0
    for name in repo_text_files():
        text = (ROOT / name).read_text(encoding="utf-8", errors="replace")
        for page, anchor in _references(name, text):
            path = ROOT / page
            if not path.is_file():
                broken.append(f"{name}: {page} does not exist")
            elif anchor not in anchors_of(path.read_text(encoding="utf-8")):
                broken.append(f"{name}: {page}#{anchor} matches no heading")
            checked += 1
    assert checked > 0, "no docs/<page>.md#anchor reference found"
    assert not broken, "\n".join(sorted(set(broken)))


def test_no_private_references():
    found = []
    for name in repo_text_files():
        text = (ROOT / name).read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if any(pattern.search(line) for pattern in PRIVATE):
                found.append(f"{name}:{number}: {line.strip()[:100]}")
    assert not found, "references to material users do not have:\n" + "\n".join(found)
