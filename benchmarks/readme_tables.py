"""Regenerates the result tables of the docs (docs/results/, docs/scaling.md, benchmarks/README.md) from the
benchmarks' own results pages.

A table is generated when a marker comment precedes it and an end marker follows it::

    <!-- table from results/a.md, results/b.md; rows: method=floor,jsd and vocab=151936; columns: vocab, method, ms -->
    | vocab | method | ms |
    ...
    <!-- end table -->

- ``from``: results pages (paths relative to the file holding the marker); the first markdown table of each is
  read, and their rows are stacked in the order given. ``path=label`` adds the label as a first column named
  by ``label``;
- ``rows`` (optional): conditions ``column=value,value`` joined by ``and``, alternatives joined by ``or``; rows
  that meet one alternative are kept, in their page's order;
- ``columns``: the columns to keep, in order;
- ``label`` (with labelled sources): the heading of the label column.

Usage::

    python benchmarks/readme_tables.py docs/results/*.md           # rewrite every generated table of these pages
    python benchmarks/readme_tables.py docs/results/*.md --check   # exit 1 if a table differs from its results pages

The prose around the tables is commentary written after the runs, as in the quality and demo pages.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import format_table  # noqa: E402  (the table format every results page is written in)

MARKER = re.compile(r"<!-- table (?P<spec>.+?) -->\n(?P<table>.*?)<!-- end table -->", re.DOTALL)


@dataclass
class TableSpec:
    """One marker's request: which pages, which rows, which columns."""

    sources: list[tuple[str, str | None]]
    rows: list[list[tuple[str, set[str]]]]
    columns: list[str]
    label: str | None = None


def parse_spec(text: str) -> TableSpec:
    """Parses a marker's ``from ...; rows: ...; columns: ...; label: ...`` text; a malformed one raises ValueError."""
    fields: dict[str, str] = {}
    for part in (p.strip() for p in text.split(";")):
        key, sep, value = part.partition(" ") if part.startswith("from ") else part.partition(":")
        if not sep or key.strip() not in ("from", "rows", "columns", "label"):
            raise ValueError(f"cannot read '{part}' in table marker '{text}': expected from/rows:/columns:/label:")
        fields[key.strip()] = value.strip()
    if "from" not in fields or "columns" not in fields:
        raise ValueError(f"table marker '{text}' needs 'from <pages>' and 'columns: <names>'")
    sources = []
    for item in fields["from"].split(", "):
        path, _, label = item.partition("=")
        sources.append((path.strip(), label.strip() or None))
    rows = []
    for alternative in fields["rows"].split(" or ") if "rows" in fields else []:
        conditions = []
        for condition in alternative.split(" and "):
            column, sep, values = condition.partition("=")
            if not sep:
                raise ValueError(f"row condition '{condition}' in '{text}' is not 'column=value,value'")
            conditions.append((column.strip(), {v.strip() for v in values.split(",")}))
        rows.append(conditions)
    if any(label for _, label in sources) and "label" not in fields:
        raise ValueError(f"table marker '{text}' labels its pages but names no 'label:' column")
    return TableSpec(sources, rows, [c.strip() for c in fields["columns"].split(", ")], fields.get("label"))


def read_first_table(page: Path) -> list[dict[str, str]]:
    """The first markdown table of a results page, as one dict per row keyed by the header."""
    lines = page.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), None)
    if start is None:
        raise ValueError(f"{page} has no markdown table")
    header = _cells(lines[start])
    table = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        table.append(dict(zip(header, _cells(line))))
    return table


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _keep(row: dict[str, str], rows: list[list[tuple[str, set[str]]]]) -> bool:
    return not rows or any(all(row.get(column) in values for column, values in alt) for alt in rows)


def render_table(spec: TableSpec, base: Path) -> str:
    """The markdown table a marker asks for, read from its results pages under ``base``."""
    selected = []
    for path, label in spec.sources:
        prefix = [label or ""] if spec.label else []
        for row in read_first_table(base / path):
            if not _keep(row, spec.rows):
                continue
            missing = [c for c in spec.columns if c not in row]
            if missing:
                raise ValueError(f"{path} has no column(s) {missing}; its columns: {list(row)}")
            selected.append(prefix + [row[c] for c in spec.columns])
    return format_table(([spec.label] if spec.label else []) + spec.columns, selected)


def regenerate(readme: Path) -> tuple[str, int]:
    """The page's text with every generated table rewritten, and how many tables changed."""
    text = readme.read_text()
    changed = 0

    def replace(match: re.Match) -> str:
        nonlocal changed
        table = render_table(parse_spec(match["spec"]), readme.parent)
        changed += table != match["table"]
        return f"<!-- table {match['spec']} -->\n{table}<!-- end table -->"

    return MARKER.sub(replace, text), changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("readme", type=Path, nargs="+", help="the pages whose marked tables are regenerated")
    parser.add_argument("--check", action="store_true", help="only report tables that differ (exit 1 if any)")
    args = parser.parse_args(argv)
    drifted = 0
    for page in args.readme:
        text, changed = regenerate(page)
        drifted += changed
        if args.check:
            print(f"{changed} generated table(s) of {page} differ from their results pages")
        else:
            page.write_text(text)
            print(f"rewrote {changed} table(s) of {page}")
    return 1 if args.check and drifted else 0


if __name__ == "__main__":
    raise SystemExit(main())
