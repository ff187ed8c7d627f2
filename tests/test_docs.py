"""The README and docs/: links resolve, the runnable blocks are the tested ones, the plugin guide's reference
is the code's, and the README stays a front door."""

import re
from pathlib import Path

from tokenbench.reduce.reference import surface_reference

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Every marked block, and the test that executes it as written.
TESTED_BLOCKS = {"api-example": "tests/test_api.py", "plugin-example:pyproject": "tests/methods/test_plugin.py",
                 "plugin-example:module": "tests/methods/test_plugin.py"}
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_the_readme_is_a_front_door():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+://|mailto:|#", target):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    unlinked = [p.name for p in PAGES[1:] if f"docs/{p.name}" not in readme]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_every_runnable_block_is_executed_by_a_test():
    markers = {m for page in PAGES for m in re.findall(r"<!-- ([\w:-]+) -->\s*```", page.read_text())}
    assert markers == set(TESTED_BLOCKS), f"marked blocks without a test, or tests without their block: {markers}"
    for marker, test in TESTED_BLOCKS.items():
        assert marker.split(":")[0] in (ROOT / test).read_text(), f"{test} does not read the {marker} block"


def test_the_plugin_guide_s_reference_is_generated_from_the_code():
    text = (ROOT / "docs" / "writing-a-method.md").read_text()
    embedded = re.search(r"<!-- surface-reference:start -->\n(.*)<!-- surface-reference:end -->", text, re.S).group(1)
    assert embedded == surface_reference(), (
        "docs/writing-a-method.md's reference is out of date: paste `python -m tokenbench.reduce.reference` "
        "between its surface-reference markers")
