"""The configuration table of docs/operations.md, rendered from `ServerConfig` itself.

Each row is one field: its name, type, default, environment variable and meaning, the meaning read from the
comment on the field's line or the comment block just above it (a block above a run of fields without comments
of their own, such as `tls_cert`, `tls_key`, `tls_client_ca`, describes them all). The table sits between two
marker comments in the page, and `tests/test_docs.py` fails when it is stale. Regenerate it with:

    python -m serving.server.config_table --write docs/operations.md
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import sys
import tokenize
from collections.abc import Sequence
from pathlib import Path

from serving.server import config
from serving.server.config import ENV_PREFIX, ServerConfig

START = "<!-- config-table:start -->"
END = "<!-- config-table:end -->"


def field_comments() -> dict[str, str]:
    """Each field's meaning, from the comments around its definition in the class body."""
    source = inspect.getsource(config)
    comments: dict[int, str] = {}  # line -> comment text
    code_lines: set[int] = set()  # lines holding something other than a comment
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
        elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.update(range(token.start[0], token.end[0] + 1))
    (cls,) = (
        node
        for node in ast.parse(source).body
        if isinstance(node, ast.ClassDef) and node.name == ServerConfig.__name__
    )
    meanings: dict[str, str] = {}
    block = ""  # the comment block above the current run of fields
    block_owner = ""  # the first field of that run, which the others refer to
    previous_end = 0
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        line, end = node.lineno, node.end_lineno or node.lineno
        above = []
        cursor = line - 1
        while cursor in comments and cursor not in code_lines:
            above.append(comments[cursor])
            cursor -= 1
        name = node.target.id
        trailing = comments.get(end) if end in code_lines else None
        if above:
            block, block_owner = " ".join(reversed(above)), name
        elif trailing or previous_end != line - 1:
            block = ""  # a field's own comment, a blank line or other code ends a run sharing a block
        if trailing:
            meanings[name] = trailing
        elif block:
            meanings[name] = block if block_owner == name else f"See `{block_owner}`."
        previous_end = end
    return meanings


def _default(field: dataclasses.Field[object]) -> str:
    if field.default is dataclasses.MISSING:
        return "(required)"
    value = field.default
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value!r}`"


def _cell(text: str) -> str:
    """A meaning as a table cell: a sentence's capital (not a name's, such as gRPC), pipes escaped."""
    if text[:1].islower() and not text[1:2].isupper():
        text = text[:1].upper() + text[1:]
    return text.replace("|", "\\|")


def render() -> str:
    """The Markdown table of every `ServerConfig` field, one row each, in definition order."""
    meanings = field_comments()
    with_env = callable(getattr(ServerConfig, "from_env", None))
    header = ["field", "type", "default", *(["environment variable"] if with_env else []), "meaning"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for field in dataclasses.fields(ServerConfig):
        cells = [f"`{field.name}`", f"`{field.type}`", _default(field)]
        if with_env:
            cells.append(f"`{ENV_PREFIX}{field.name.upper()}`")
        cells.append(_cell(meanings.get(field.name, "")))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def table_in(text: str) -> str:
    """The text between the markers in `text` (without the newlines next to them)."""
    start, end = text.index(START) + len(START), text.index(END)
    return text[start:end].strip("\n") + "\n"


def splice(text: str, table: str) -> str:
    """`text` with the part between the markers replaced by `table`."""
    start, end = text.index(START) + len(START), text.index(END)
    return text[:start] + "\n" + table + text[end:]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serving.server.config_table", description="The ServerConfig table, in Markdown."
    )
    parser.add_argument("--write", type=Path, help="replace the table between the markers in this file")
    parser.add_argument("--check", type=Path, help="exit 1 when the table in this file is stale")
    args = parser.parse_args(argv)
    table = render()
    if args.write is not None:
        args.write.write_text(splice(args.write.read_text(), table))
    elif args.check is not None:
        if table_in(args.check.read_text()) != table:
            print(f"{args.check}: the configuration table is stale: run {parser.prog} --write {args.check}")
            return 1
    else:
        sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
