"""benchmarks/demo_frontier.py renders its page, plot, README section and docs page from recorded points (the demo runs
themselves are measured by the script, not here)."""

import json

import pytest
from tiny import load_script


@pytest.fixture(scope="module")
def frontier():
    return load_script("benchmarks/demo_frontier.py")


REPEATING = "I am not so cruel, and I am not so cruel. I am not so cruel, and I am not so cruel."


def _scores(rouge_l: float, loops: float, kl: float, answers: list[str]) -> dict:
    return {"rouge_l": rouge_l, "exact_match": 25.0, "loop_rate": loops, "kl": kl, "num_samples": len(answers),
            "predictions": answers}  # fmt: skip


def _point(
    steps: int, wall_s: float, cache_s: float, rouge_l: float, seed: int = 0, kl: float = 1.0, repeating: int = 1
) -> dict:
    answers = [REPEATING] * repeating + ["The sea is calm tonight."] * (4 - repeating)
    return {
        "steps": steps,
        "seed": seed,
        "extra": [],
        "threads": 2,
        "wall_s": wall_s,
        "teacher_cache_s": cache_s,
        "stage_starts_s": {},
        "settings": {},
        "results": {"student after": _scores(rouge_l, 12.5, kl, answers)},
    }


def test_page_plot_and_readme_section_come_from_the_points(frontier, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    settings = {
        "kd_loss": "fkl", "max_steps": 80, "batch_size": 4, "learning_rate": 5e-4, "max_length": 256,
        "cache_top_k": 64, "eval_samples": 40, "max_new_tokens": 64, "seed": 0,
    }  # fmt: skip
    (results / "demo_results.json").write_text(json.dumps({"settings": settings, "student_layers": [0] * 20,
                                                           "wall_s": 600.0}))  # fmt: skip
    (results / "demo_results.md").write_text("| model | Rouge-L |\n|---|---|\n| student after | 31.00 |\n\n![x](y)\n")
    payload = {
        "environment": {"torch": "2.x", "cpu_count": 2},
        "points": [_point(120, 900.0, 240.0, 33.5), _point(40, 420.0, 0.0, 24.25)],
        "commentary": "Findings go here.",
    }
    json_path = results / "frontier_cpu.json"
    page = frontier.render(payload, json_path)
    assert (results / "frontier_cpu.png").stat().st_size > 0
    rows = [line for line in page.splitlines() if line.startswith("| 40 ") or line.startswith("| 120 ")]
    # sorted by steps; 40 found its cache built; one answer of four says a sentence twice
    assert rows[0].startswith("| 40 | 0 | 7.0 | 0.0 | 7.0 | 24.25 | 25.0 | 12.5 | 25.0 |")
    assert rows[1].startswith("| 120 | 0 | 11.0 | 4.0 | 15.0 | 33.50 |")  # 120 built its cache in 4 minutes
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n### Demo results\n\nold text\n\n### Benchmarks\n\nkept\n\n## Development\n")
    docs_page = tmp_path / "docs" / "results" / "demo.md"
    docs_page.parent.mkdir(parents=True)
    docs_page.write_text(f"{frontier.PAGE_SECTION}\n\nold frontier\n")
    frontier.update_readme(readme, payload, json_path, docs_page)
    frontier.update_page(docs_page, payload, json_path, readme)
    text = readme.read_text()
    assert "old text" not in text and "kept" in text and text.endswith("## Development\n")
    assert "| student after | 31.00 |" in text and "![demo training curves](results/training_curves.png)" in text
    assert "[docs/results/demo.md](docs/results/demo.md)" in text and "Findings go here." not in text
    page_text = docs_page.read_text()
    assert "old frontier" not in page_text and "Findings go here." in page_text and rows[0] in page_text
    assert "![Rouge-L against minutes](../../results/frontier_cpu.png)" in page_text
    assert "(../../README.md#demo-results)" in page_text


def test_the_committed_demo_section_and_page_show_the_committed_results(frontier):
    """README's demo table is the default run's, and the docs page's frontier table is the recorded points' (rerun
    `demo_frontier.py --render ... --readme README.md` after a demo run)."""
    results = frontier.ROOT / "benchmarks" / "results" / "demo"
    readme = (frontier.ROOT / "README.md").read_text()
    assert (results / "demo_results.md").read_text().split("\n\n")[0] in readme
    points = json.loads((results / "frontier_cpu.json").read_text())["points"]
    assert frontier.markdown_table(points) in frontier.PAGE.read_text()


def test_seeds_of_a_step_budget_share_a_row_with_their_mean_and_range(frontier):
    points = [
        _point(80, 600.0, 0.0, 31.0, seed=1, kl=0.5, repeating=0),
        _point(80, 540.0, 180.0, 27.0, seed=0, kl=0.7, repeating=2),
        _point(40, 300.0, 0.0, 20.0, seed=0),
    ]
    rows = frontier.markdown_table(points).splitlines()[2:]
    assert rows[0] == "| 40 | 0 | 5.0 | 0.0 | 5.0 | 20.00 | 25.0 | 12.5 | 25.0 | 1.000 |"
    # warm minutes: (360 + 600) / 2 s; the first run adds the 3 minutes the seed-0 run spent building the cache
    assert rows[1] == (
        "| 80 | 0, 1 | 8.0 | 3.0 | 11.0 | 29.00 [27.00, 31.00] | 25.0 [25.0, 25.0] | 12.5 [12.5, 12.5] | "
        "25.0 [0.0, 50.0] | 0.600 [0.500, 0.700] |"
    )


def test_the_general_held_out_set_gets_its_columns_when_every_point_scored_it(frontier):
    points = [_point(80, 600.0, 0.0, 31.0, seed=0), _point(80, 600.0, 0.0, 29.0, seed=1)]
    assert "general Rouge-L" not in frontier.markdown_table(points)
    for point, rouge, words in zip(points, (24.0, 26.0), (30.0, 40.0)):
        after = _scores(rouge, 5.0, 0.6, ["An answer."]) | {"answer_words": words, "short_answer_rate": 10.0}
        teacher = _scores(90.0, 2.5, 0.0, ["An answer."]) | {"answer_words": 59.0, "short_answer_rate": 0.0}
        point["results_general"] = {"teacher": teacher, "student after": after}
    head, rule, row = frontier.markdown_table(points).splitlines()
    assert head.count("|") == rule.count("|") == row.count("|") == 15
    assert row.endswith(
        "| 25.00 [24.00, 26.00] | 5.0 [5.0, 5.0] | 35.0 [30.0, 40.0] (59.0 [59.0, 59.0]) | 10.0 [10.0, 10.0] |"
    )


def test_a_point_keeps_every_held_out_set_the_demo_scored(frontier):
    """A demo run's results on the general-assistant set reach its point (they were dropped, so the frontier could
    never show its general columns)."""
    record = {
        "wall_s": 650.0,
        "stage_starts_s": {"teacher": 10.0, "evaluate_before": 110.0},
        "settings": {"seed": 2},
        "results": {"student after": _scores(30.0, 10.0, 0.6, ["An answer."])},
    }
    point = frontier.point_record(80, 2, [], 2, record)
    assert "results_general" not in point and point["teacher_cache_s"] == 100.0
    general = {"student after": _scores(27.0, 8.0, 0.7, ["Another answer."])}
    assert frontier.point_record(80, 2, [], 2, record | {"results_general": general})["results_general"] == general
