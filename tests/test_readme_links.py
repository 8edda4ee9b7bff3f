"""The README's links land: every relative target exists and every #anchor is a heading of its page.

`mkdocs build --strict` (.ci/run) checks the links inside docs/; the README lives outside the site, so this checks
its links with the anchors mkdocs generates (Python-Markdown's toc slugify, mkdocs' default).
"""

from __future__ import annotations

import re
from pathlib import Path

from markdown.extensions.toc import slugify

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # '#' lines in code blocks are not headings
    headings = re.findall(r"^#+\s+(.*?)\s*$", text, flags=re.M)
    return {slugify(re.sub(r"[`*]", "", h), "-") for h in headings}


def test_every_readme_link_and_anchor_exists():
    links = LINK.findall((REPO / "README.md").read_text())
    assert len(links) >= 10
    broken = []
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        path, _, anchor = link.partition("#")
        target = REPO / path if path else REPO / "README.md"
        if not target.exists():
            broken.append(f"{link}: no file {target}")
        elif anchor and anchor not in _anchors(target):
            broken.append(f"{link}: no heading with anchor #{anchor} in {target.name}")
    assert broken == []


def test_readme_stays_short_and_keeps_its_commands_first():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 200
    assert lines[2:6] == [
        "```bash",
        'pip install -e ".[dev]" -c constraints/ci.txt   # install (CI\'s torch 2.14.1 / torchvision 0.29.1)',
        "python train.py --plans nnUNetResEncUNetLPlans   # train the embedded demo (1-3 min on 2 CPU cores)",
        "pytest                                           # test suite",
    ]
