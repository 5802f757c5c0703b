"""The README stays a front door and every link of the documentation leads somewhere.

README.md is at most 200 lines and indexes every page of docs/; every relative link (and image) in
README.md and docs/*.md names a file that exists, and a `#fragment` names a heading of that page
(GitHub's anchors). Text inside code blocks and code spans is not a link.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """The lines of a markdown file outside fenced code blocks, numbered from 1, code spans blanked."""
    lines, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced and not line.startswith("    "):
            lines.append((number, CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)))
    return lines


def links(path: Path) -> list[tuple[int, str]]:
    found = []
    for number, line in prose_lines(path):
        found += [(number, m.group(1)) for m in INLINE_LINK.finditer(line)]
        ref = REFERENCE_DEF.match(line)
        if ref:
            found.append((number, ref.group(1)))
    return found


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup dropped, lower case, punctuation removed, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").replace("*", "")  # code and emphasis marks; '_' is a word character
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        heading = None if fenced else HEADING.match(line)
        if heading:
            base = slug(heading.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            result.add(base if n == 0 else f"{base}-{n}")
    return result


def test_readme_is_a_front_door() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; the reference belongs in docs/"


def test_readme_indexes_every_page_of_docs() -> None:
    linked = {(README.parent / target.split("#")[0]).resolve() for _, target in links(README)}
    missing = [doc.name for doc in DOCS if doc.resolve() not in linked]
    assert not missing, f"README.md's index of docs/ lacks {missing}"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_code_block_is_closed(page: Path) -> None:
    """An unclosed fence turns the rest of a page into code, and its links out of sight of the check."""
    fences = [
        n for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1) if FENCE.match(line)
    ]
    assert len(fences) % 2 == 0, (
        f"{page.relative_to(ROOT)}: a code fence is not closed (fences at lines {fences})"
    )


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for number, target in links(page):
        if SCHEME.match(target) or target.startswith("//"):
            continue  # an absolute URL: not checked here (no network in the tests)
        file_part, _, fragment = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        where = f"{page.relative_to(ROOT)}:{number}: {target}"
        if not dest.exists():
            broken.append(f"{where} (no such file)")
        elif not dest.is_relative_to(ROOT):
            broken.append(f"{where} (outside the repository)")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{where} (no heading with that anchor)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_checker_sees_links_and_anchors(tmp_path: Path) -> None:
    """The parsing the tests above rely on: links outside code, GitHub's anchors."""
    page = tmp_path / "page.md"
    page.write_text(
        "# Results (`GET /v1/jobs/{id}/pairs.zip`, `/download`)\n"
        "## Three labels: left and right lung (multi-class)\n"
        "## Three labels: left and right lung (multi-class)\n"
        'See [a](a.md), ![b](img/b.png "title") and [c](https://example.org/x.md).\n'
        "`[not a link](nowhere.md)`\n"
        "```\n[not a link either](nowhere.md)\n```\n"
        "[ref]: ref.md#part\n",
        encoding="utf-8",
    )
    assert [t for _, t in links(page)] == ["a.md", "img/b.png", "https://example.org/x.md", "ref.md#part"]
    assert anchors(page) == {
        "results-get-v1jobsidpairszip-download",
        "three-labels-left-and-right-lung-multi-class",
        "three-labels-left-and-right-lung-multi-class-1",
    }


@pytest.mark.parametrize("page", sorted(p.name for p in (ROOT / "docs").glob("*.md")))
def test_no_paragraph_is_said_twice_on_a_page(page: str) -> None:
    """docs/results.md once repeated its 25 % paragraph and a table row, word for word."""
    text = (ROOT / "docs" / page).read_text()
    blocks = [b.strip() for b in text.split("\n\n") if len(b.strip()) > 120 and not b.strip().startswith("|")]
    lines = [
        ln for ln in text.splitlines() if ln.startswith("- **") or (ln.startswith("| (") and len(ln) > 40)
    ]
    assert len(blocks) == len(set(blocks)), [b[:80] for b in blocks if blocks.count(b) > 1][:1]
    assert len(lines) == len(set(lines)), [ln for ln in lines if lines.count(ln) > 1][:1]
