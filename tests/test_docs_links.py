"""README.md and docs/*.md: every relative link and picture points at a file that exists, and every
``#anchor`` at a heading of its page (GitHub's slugs), so the guide cannot silently rot when a file
moves. Links to the web are not followed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (hyphens kept), spaces to hyphens."""
    text = CODE_SPAN.sub(lambda m: m.group(0)[1:-1], heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(h) for h in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8")))}


def links(text: str) -> list[str]:
    """The targets of the Markdown links and pictures of ``text``, outside code (a link's text may be code)."""
    return LINK.findall(CODE_SPAN.sub("", FENCE.sub("", text)))


def _shown(file: Path) -> Path:
    return file.relative_to(REPO) if file.is_relative_to(REPO) else file


def broken_links(page: Path) -> list[str]:
    """Each relative link of ``page`` whose file, or whose anchor in that file, does not exist."""
    broken = []
    for target in links(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not followed
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {_shown(file)}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {_shown(file)}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_every_relative_link_and_picture_resolves(page):
    assert broken_links(page) == []


def test_the_readme_links_every_docs_page():
    linked = {(REPO / t.partition("#")[0]).resolve() for t in links((REPO / "README.md").read_text(encoding="utf-8"))}
    pages = {p.resolve() for p in (REPO / "docs").glob("*.md")}
    assert pages and pages <= linked, f"docs pages the README does not link: {sorted(p.name for p in pages - linked)}"


def test_the_checker_finds_a_broken_link_a_missing_anchor_and_ignores_code(tmp_path):
    (tmp_path / "there.png").write_bytes(b"")
    page = tmp_path / "page.md"
    page.write_text("# A `code` title\n\n![ok](there.png) [gone](missing.md) [self](#a-code-title)\n"
                    "[bad anchor](#nowhere) [web](https://example.org/x) `[in code](nothing.md)`\n"
                    "```\n[in a fence](nothing.md)\n```\n", encoding="utf-8")
    assert [b.split(":")[0] for b in broken_links(page)] == ["missing.md", "#nowhere"]
