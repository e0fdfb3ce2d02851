"""The README and docs/ as a manual: the README stays short, every relative link and anchor resolves, every
page is reachable from the README, the configuration table is the one `ServerConfig` renders, and the text
speaks of the product (no issue numbers, no accounts of one run or work session)."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from serving.server import config_table
from serving.server.config import ServerConfig

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
# design.md keeps its own history of the design; the manual's other pages speak of the product as it is.
PRODUCT_PAGES = [page for page in PAGES if page.name != "design.md"]
MAX_README_LINES = 300

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.DOTALL | re.MULTILINE)
_CODE_SPAN = re.compile(r"`[^`]*`")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^()\s]+)\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.MULTILINE)
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)
_NOT_PRODUCT = {
    "an issue number": re.compile(r"#\d+\b|\bissues?\s+\d+\b", re.IGNORECASE),
    "a work session": re.compile(
        r"\b(?:this|previous|earlier|last|next) session\b|\bsession \d+\b|\(session\b", re.IGNORECASE
    ),
    "a run told as a story": re.compile(r"\b(?:previous|last|this) run\b|\bthis round\b", re.IGNORECASE),
}


def _prose(text: str) -> str:
    """The text without fenced code blocks, each blanked to its newlines (so line numbers stay)."""
    return _FENCE.sub(lambda match: "\n" * match.group(0).count("\n"), text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor in `page`, repeated headings numbered as GitHub numbers them."""
    seen: Counter[str] = Counter()
    found = set()
    for match in _HEADING.finditer(_prose(page.read_text())):
        base = slug(match.group(2))
        found.add(base if not seen[base] else f"{base}-{seen[base]}")
        seen[base] += 1
    return found


def relative_links(page: Path) -> Iterator[tuple[str, int]]:
    """(target, line) of every link and image in `page` that is not a URL, outside code."""
    text = _CODE_SPAN.sub(lambda match: re.sub(r"[^\n]", " ", match.group(0)), _prose(page.read_text()))
    for match in _LINK.finditer(text):
        target = match.group(1)
        if not _SCHEME.match(target):
            yield target, text.count("\n", 0, match.start()) + 1


def test_the_readme_is_a_short_manual() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, (
        f"README.md has {lines} lines (at most {MAX_README_LINES}): move detail to docs/"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_points_to_a_file_and_heading_that_exist(page: Path) -> None:
    broken = []
    for target, line in relative_links(page):
        path, _, anchor = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        if not destination.exists():
            broken.append(f"line {line}: {target}: no file {destination.relative_to(ROOT)}")
        elif anchor and (destination.suffix != ".md" or anchor not in anchors(destination)):
            broken.append(f"line {line}: {target}: no heading #{anchor} in {destination.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}:\n" + "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {(ROOT / target.partition("#")[0]).resolve() for target, _ in relative_links(README)}
    missing = [page.name for page in sorted(DOCS.glob("*.md")) if page.resolve() not in linked]
    assert not missing, f"README.md links to no page {missing}: add them to its Documentation list"


@pytest.mark.parametrize("page", PRODUCT_PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_the_text_speaks_of_the_product(page: Path) -> None:
    found = [
        f"line {page.read_text().count(chr(10), 0, match.start()) + 1}: {what}: {match.group(0)!r}"
        for what, pattern in _NOT_PRODUCT.items()
        for match in pattern.finditer(page.read_text())
    ]
    assert not found, f"{page.relative_to(ROOT)}:\n" + "\n".join(found)


def test_the_configuration_table_is_the_one_server_config_renders() -> None:
    page = DOCS / "operations.md"
    assert config_table.table_in(page.read_text()) == config_table.render(), (
        "docs/operations.md's configuration table is stale: run "
        "python -m serving.server.config_table --write docs/operations.md"
    )


def test_the_table_has_a_row_with_a_meaning_for_every_field() -> None:
    table = config_table.render()
    meanings = config_table.field_comments()
    for field in dataclasses.fields(ServerConfig):
        assert meanings.get(field.name), f"ServerConfig.{field.name} has no comment to say what it means"
        assert f"| `{field.name}` | `{field.type}` |" in table
        assert f"`CONVEYOR_{field.name.upper()}`" in table


def test_a_block_comment_describes_the_run_of_fields_below_it() -> None:
    meanings = config_table.field_comments()
    assert meanings["tls_cert"].startswith("TLS on the gRPC port")
    assert meanings["tls_key"] == meanings["tls_client_ca"] == "See `tls_cert`."
    # A field with a comment of its own ends the run: its meaning is its comment, not the block above.
    assert meanings["max_chunk_steps"] == "longest accepted chunk, in timesteps"


def test_the_table_is_written_between_its_markers(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(f"before\n{config_table.START}\nstale\n{config_table.END}\nafter\n")
    assert config_table.main(["--check", str(page)]) == 1
    assert config_table.main(["--write", str(page)]) == 0
    text = page.read_text()
    assert text.startswith(f"before\n{config_table.START}\n| field |")
    assert text.endswith(f"{config_table.END}\nafter\n")
    assert config_table.table_in(text) == config_table.render()
    assert config_table.main(["--check", str(page)]) == 0


def test_the_link_checker_sees_what_it_must() -> None:
    assert slug("The demo (`make demo`), real output") == "the-demo-make-demo-real-output"
    assert slug("The cost of durability (`bench --store`)") == "the-cost-of-durability-bench---store"
    assert slug("Your own PyTorch module: `export_module`") == "your-own-pytorch-module-export_module"
