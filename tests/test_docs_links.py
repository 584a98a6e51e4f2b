"""The documentation stands on its own: every relative link in README.md, docs/ and bench/ resolves (file and,
for Markdown targets, heading), and nothing in the repository points outside it."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
SKIP_DIRS = {".git", ".venv", ".venv-peer", "build", "models", "__pycache__", ".pytest_cache"}


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
        return [ROOT / p for p in out.splitlines() if (ROOT / p).is_file()]
    except (OSError, subprocess.CalledProcessError):   # not a checkout: every file outside the skipped folders
        return [p for p in ROOT.rglob("*") if p.is_file() and not SKIP_DIRS & set(p.relative_to(ROOT).parts)]


def markdown_files() -> list[Path]:
    return sorted(p for p in tracked_files() if p.suffix == ".md")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|__", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*)$", text, flags=re.M)}


def links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)   # code blocks are not links
    return [m.group(1) for m in LINK.finditer(text)]


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):   # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if ROOT not in dest.parents and dest != ROOT:
            broken.append(f"{target} (outside the repository)")
        elif not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no such heading)")
    return broken


def test_the_docs_exist_and_the_readme_is_a_front_page():
    for page in ("api/triton-model.md", "api/openai.md", "serving.md", "architecture.md", "backends.md",
                 "reliability.md", "performance.md", "client.md"):
        assert (ROOT / "docs" / page).is_file(), page
    assert len((ROOT / "README.md").read_text().splitlines()) <= 220


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    assert broken_links(path) == []


def test_the_checker_sees_a_broken_link(tmp_path, monkeypatch):
    page = ROOT / "docs" / "client.md"
    assert links(page), "a page with links"
    fake = page.parent / "no-such-page-for-the-link-test.md"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (
        "[a](serving.md) [b](nowhere.md) [c](serving.md#no-such-heading) [d](../../outside.md) ```[e](x.md)```"))
    assert broken_links(fake) == ["nowhere.md (no such file)", "serving.md#no-such-heading (no such heading)",
                                  "../../outside.md (outside the repository)"]


def test_nothing_points_outside_the_repository():
    outside = re.compile(r"\.\./shared|CONTRACT\.md")
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in tracked_files() if p.suffix in {".md", ".py", ".sh", ".pbtxt",
                                                                                 ".toml", ".txt", ""}
            for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if outside.search(line)
            and p.name != Path(__file__).name]
    assert hits == []
