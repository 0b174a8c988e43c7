"""benchmarks/readme_tables.py: the docs' generated tables are excerpts of the results pages, and stay in step."""

from pathlib import Path

import pytest
from tiny import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tables():
    return load_script("benchmarks/readme_tables.py")


PAGE_A = """# Loss side

Some prose | with a pipe.

| vocab | method | ms | peak MiB |
|---|---|---|---|
| 100 | floor | 1.0 | 10 |
| 100 | jsd | 2.5 | 12 |
| 200 | floor | 3.0 | 20 |
| 200 | jsd | 7.5 | 22 |

| other | table |
|---|---|
| not | read |
"""

PAGE_B = """| vocab | method | ms | peak MiB |
|---|---|---|---|
| 100 | jsd | 1.5 | 40 |
"""


@pytest.fixture
def pages(tmp_path):
    (tmp_path / "a.md").write_text(PAGE_A)
    (tmp_path / "b.md").write_text(PAGE_B)
    return tmp_path


def test_rows_and_columns_are_selected_in_page_order(tables, pages):
    spec = tables.parse_spec(
        "from a.md; rows: vocab=100 and method=jsd or vocab=200 and method=floor; columns: method, ms"
    )
    assert tables.render_table(spec, pages) == "| method | ms |\n|---|---|\n| jsd | 2.5 |\n| floor | 3.0 |\n"


def test_labelled_pages_stack_with_a_label_column(tables, pages):
    spec = tables.parse_spec(
        "from a.md=110 (default), b.md=441; rows: method=jsd and vocab=100; columns: ms; label: rows"
    )
    assert tables.render_table(spec, pages) == "| rows | ms |\n|---|---|\n| 110 (default) | 2.5 |\n| 441 | 1.5 |\n"


def test_without_rows_every_row_is_kept(tables, pages):
    spec = tables.parse_spec("from b.md; columns: vocab, peak MiB")
    assert tables.render_table(spec, pages) == "| vocab | peak MiB |\n|---|---|\n| 100 | 40 |\n"


def test_regenerate_rewrites_a_stale_table_and_check_reports_it(tables, pages):
    readme = pages / "README.md"
    marker = "<!-- table from b.md; columns: method, ms -->"
    readme.write_text(f"Intro.\n\n{marker}\n| method | ms |\n|---|---|\n| jsd | 9.9 |\n<!-- end table -->\n\nAfter.\n")
    assert tables.main([str(readme), "--check"]) == 1
    assert tables.main([str(readme)]) == 0
    assert (
        readme.read_text()
        == f"Intro.\n\n{marker}\n| method | ms |\n|---|---|\n| jsd | 1.5 |\n<!-- end table -->\n\nAfter.\n"
    )
    assert tables.main([str(readme), "--check"]) == 0


def test_check_covers_every_page_given(tables, pages):
    """One command checks several pages; a drifted table on any of them fails the check."""
    marker = "<!-- table from b.md; columns: method, ms -->"
    fresh, stale = pages / "fresh.md", pages / "stale.md"
    fresh.write_text(f"{marker}\n| method | ms |\n|---|---|\n| jsd | 1.5 |\n<!-- end table -->\n")
    stale.write_text(f"{marker}\n| method | ms |\n|---|---|\n| jsd | 9.9 |\n<!-- end table -->\n")
    assert tables.main([str(fresh), "--check"]) == 0
    assert tables.main([str(fresh), str(stale), "--check"]) == 1
    assert tables.main([str(fresh), str(stale)]) == 0
    assert stale.read_text() == fresh.read_text()


@pytest.mark.parametrize(
    "marker, message",
    [
        ("rows: method=jsd; columns: ms", "needs 'from"),
        ("from a.md; rows: method; columns: ms", "is not 'column=value"),
        ("from a.md; colums: ms", "cannot read"),
        ("from a.md=441; columns: ms", "names no 'label:'"),
    ],
)
def test_malformed_markers_are_named(tables, marker, message):
    with pytest.raises(ValueError, match=message):
        tables.parse_spec(marker)


def test_an_unknown_column_names_the_page_and_its_columns(tables, pages):
    with pytest.raises(ValueError, match=r"b.md has no column\(s\) \['tokens/s'\]"):
        tables.render_table(tables.parse_spec("from b.md; columns: tokens/s"), pages)


@pytest.mark.parametrize(
    "readme, tables_marked",
    [
        ("README.md", 0),
        ("docs/results/speed_memory.md", 1),
        ("docs/results/loss_side.md", 1),
        ("docs/results/gpu.md", 2),
        ("docs/results/teacher_cache.md", 1),
        ("benchmarks/README.md", 1),
        ("docs/scaling.md", 1),
    ],
)
def test_readme_tables_match_their_results_pages(tables, readme, tables_marked):
    """The project's marked tables are what the results pages say (rerun the script after a benchmark); README keeps
    none, its results live under docs/results/."""
    text, changed = tables.regenerate(ROOT / readme)
    assert text.count("<!-- end table -->") == tables_marked
    assert changed == 0, f"{readme}'s tables drifted: run `python benchmarks/readme_tables.py {readme}`"
