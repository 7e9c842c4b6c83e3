"""The user-facing text: README, docs/ and the model card.

They describe the package, not how it was made: no paths of the machines it was built on and
no words about the development process. The README stays a short page, and every relative
link in it and in docs/ leads to a file that exists.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MODEL_CARD = ROOT / "tome_jax" / "assets" / "cifar10_vit" / "MODEL_CARD.md"
README_MAX_LINES = 230


def _pages() -> list[Path]:
    pages = [README, MODEL_CARD, *sorted((ROOT / "docs").rglob("*.md"))]
    pages += sorted((ROOT / "models").rglob("*.md"))
    pages += sorted((ROOT / "tome_jax" / "assets").rglob("README.md"))
    return pages


PAGES = _pages()

# An absolute path of a particular machine (a URL path such as https://x/home/ is not one).
MACHINE_PATH = re.compile(r"(?<![\w.:/~-])/(?:work|root|home|tmp)/")
# How the code was developed is not the user's concern. Each pattern is narrow enough that
# ordinary technical prose does not hit it.
PROCESS_WORDS = {
    "session": re.compile(r"\bsessions?\b", re.IGNORECASE),
    "work period": re.compile(r"\bwork[- ]periods?\b", re.IGNORECASE),
    "dev machine": re.compile(r"\bdev(?:elopment)? machines?\b", re.IGNORECASE),
    "lent": re.compile(r"\blent\b", re.IGNORECASE),
    "borrowed": re.compile(r"\bborrowed\b", re.IGNORECASE),
}
# [text](target) and ![alt](target), target up to the first space or closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _offending_lines(path: Path, pattern: re.Pattern) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [f"{_rel(path)}:{n}: {line.strip()}"
            for n, line in enumerate(text.splitlines(), 1) if pattern.search(line)]


def test_the_pages_exist():
    assert README.is_file() and MODEL_CARD.is_file()
    assert len(PAGES) > 5


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_no_machine_paths(page):
    assert _offending_lines(page, MACHINE_PATH) == []


@pytest.mark.parametrize("page", PAGES, ids=_rel)
@pytest.mark.parametrize("word", sorted(PROCESS_WORDS))
def test_no_development_process_words(page, word):
    assert _offending_lines(page, PROCESS_WORDS[word]) == []


def test_patterns_catch_what_they_are_for():
    # The checks above pass vacuously if a pattern matches nothing: each must catch its case.
    assert MACHINE_PATH.search("see /work/runs/x") and MACHINE_PATH.search("(/tmp/a)")
    assert not MACHINE_PATH.search("https://example.org/home/x")
    assert not MACHINE_PATH.search("~/.cache/tome_jax and runs/tmp/x")
    cases = {"session": "trained in session 7", "work period": "in work period 3",
             "dev machine": "on the development machine", "lent": "a GPU we were lent",
             "borrowed": "a borrowed GPU"}
    for word, text in cases.items():
        assert PROCESS_WORDS[word].search(text), word
    assert not PROCESS_WORDS["lent"].search("an equivalent, excellent model")


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/"


def _links(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)  # code blocks hold no links
    return LINK.findall(text)


def _is_relative(target: str) -> bool:
    """A link inside the repository: no URL scheme (an in-page #anchor counts)."""
    return not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE)


def _anchors(path: Path) -> set[str]:
    """The heading anchors GitHub gives a Markdown page (lower case, punctuation dropped,
    spaces to hyphens, repeats numbered)."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_point_at_files(page):
    missing = []
    for target in filter(_is_relative, _links(page)):
        path, _, anchor = target.partition("#")
        dest = page.parent / path if path else page
        if not dest.exists():
            missing.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            missing.append(f"{target} (no such heading)")
    assert missing == [], f"{_rel(page)} links to missing files or headings: {missing}"


def test_anchors_follow_github():
    page = ROOT / "docs" / "workflows" / "evaluate.md"
    assert {"the-r-syntax", "datasets---data---data-dir---split"} <= _anchors(page)


def test_link_pattern_finds_links():
    page_text = "see [a](docs/x.md#y), ![img](fig.png) and [web](https://x.org/a)"
    assert LINK.findall(page_text) == ["docs/x.md#y", "fig.png", "https://x.org/a"]
    assert [t for t in LINK.findall(page_text) if _is_relative(t)] == ["docs/x.md#y", "fig.png"]
    assert _is_relative("#results") and not _is_relative("mailto:a@b.c")
