"""README.md stays a short front page (it is the PyPI long description) and docs/ holds the rest:
the README's marked commands are intact for .ci/run, every relative link resolves, every docs page
is linked from the README."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

#: ``[text](target)`` and ``![alt](target)``; the target up to whitespace or ``)``.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+).+?\1")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def links(path: Path) -> list[str]:
    """Every link target in ``path``'s prose (not in code blocks or code spans)."""
    return [m.group(1) for line in prose_lines(path.read_text()) for m in LINK.finditer(CODE_SPAN.sub("", line))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercased, punctuation other than '-' and '_'
    dropped, each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of ``path``'s headings, with GitHub's ``-1``, ``-2`` ... for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(path.read_text()):
        m = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_slug_follows_githubs_rules() -> None:
    assert slug("Azure set-up, step by step") == "azure-set-up-step-by-step"
    assert slug("`localhost` (alias `local`)") == "localhost-alias-local"
    assert slug("Batching: `chunksize`") == "batching-chunksize"
    assert slug("Large data: `inline_limit`, 413") == "large-data-inline_limit-413"
    assert slug("The 230 s limit without Blob storage") == "the-230-s-limit-without-blob-storage"


def test_readme_is_under_300_lines() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) < 300, f"README.md has {len(lines)} lines; move detail into docs/"


@pytest.mark.parametrize("marker", ["<!-- main-command -->", "<!-- test-command -->"])
def test_readme_marked_commands_are_one_line_fenced_blocks(marker: str) -> None:
    """What .ci/run's awk reads: the first fenced block after the marker, of one command line."""
    lines = README.read_text().splitlines()
    assert lines.count(marker) == 1, f"README.md must hold {marker} exactly once"
    rest = lines[lines.index(marker) + 1 :]
    while rest and not rest[0].strip():
        rest = rest[1:]
    assert rest and rest[0].startswith("```"), f"{marker} must be followed by a fenced block"
    body = []
    for line in rest[1:]:
        if line.startswith("```"):
            break
        body.append(line)
    else:
        pytest.fail(f"the fenced block after {marker} is not closed")
    assert len(body) == 1 and body[0].strip(), f"the block after {marker} must hold one command line, not {body}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto: ...
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / unquote(path_part)).resolve() if path_part else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and unquote(anchor) not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)


def test_every_docs_page_is_linked_from_readme() -> None:
    assert DOCS, "docs/ holds no pages"
    linked = {(ROOT / unquote(t.partition("#")[0])).resolve() for t in links(README) if not re.match(r"^[a-z]+:", t)}
    missing = [p.relative_to(ROOT).as_posix() for p in DOCS if p.resolve() not in linked]
    assert not missing, f"README.md does not link to {missing}; add them to its Documentation list"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_docs_pages_open_with_a_title_and_a_summary(page: Path) -> None:
    lines = page.read_text().splitlines()
    assert lines[0].startswith("# "), f"{page.name} must start with a '# ' title"
    assert len(lines) > 2 and not lines[1].strip() and lines[2].strip() and not lines[2].startswith("#"), (
        f"{page.name} must open with a one-paragraph summary under its title"
    )
