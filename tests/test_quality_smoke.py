"""Smoke test of benchmarks/quality.py and its modules: the per-method function trains tiny random models for 2 steps
and reports its fields; the page renders from the records. Only presence and range of the fields are checked, never
quality."""

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from tiny import load_script, make_conversations, make_model, make_tokenizer

TINY_METHODS = [
    "teacher",
    "student-init",
    "sft",
    "fkl-live",
    "trl-gkd",
    "jsd",
    "akl",
    "bild",
    "mgsr",
    "dskd",
    "dskd-cma",
]


@pytest.fixture(scope="module")
def quality():
    """The benchmark's modules, loaded in import order (each then imports the one loaded before it): quality.rows,
    .stats, .runs, .render, and .cli (the command line)."""
    names = {"rows": "quality_rows", "stats": "quality_stats", "runs": "quality_runs", "render": "quality_render"}
    modules = {key: load_script(f"benchmarks/{name}.py") for key, name in names.items()}
    return SimpleNamespace(**modules, cli=load_script("benchmarks/quality.py"))


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_budget(quality):
    return quality.rows.Budget(
        steps=2,
        batch=2,
        learning_rate=1e-3,
        max_length=64,
        eval_samples=4,
        max_new_tokens=4,
        lmbda=0.0,
        mgsr_lmbda=1.0,  # every MGSR step generates, so SCRG runs
        seeds=1,
        eval_batch=2,
        cache_top_k=8,
    )


def tiny_pair(quality, method: str):
    """Fresh tiny models; the dskd-cma row's teacher gets a tokenizer with a different vocabulary."""
    tokenizer = make_tokenizer()
    student = make_model(len(tokenizer), hidden=32, layers=1, seed=1)
    kl_teacher = make_model(len(tokenizer), hidden=48, layers=2, seed=2)
    if quality.rows.METHODS[method].teacher == quality.rows.SMOLLM2:
        return quality.runs.Pair(student, tokenizer, kl_teacher, kl_teacher)
    teacher_tokenizer = make_tokenizer(extra_words=["sun", "moon", "sky"])
    teacher = make_model(len(teacher_tokenizer), hidden=48, layers=2, seed=3)
    return quality.runs.Pair(student, tokenizer, teacher, kl_teacher, teacher_tokenizer)


@pytest.mark.parametrize("method", TINY_METHODS)
def test_run_method_fields(quality, method, tmp_path):
    spec = quality.rows.RunSpec(
        method=method,
        seed=0,
        budget=tiny_budget(quality),
        output_dir=str(tmp_path / method),
        config_overrides={"loss_kwargs": {"dac_kl_hidden": 8}} if method == "mgsr" else {},
        cache_dir=str(tmp_path / "teacher-cache"),
    )
    assert quality.rows.RunSpec.from_dict(json.loads(json.dumps(dataclasses.asdict(spec)))) == spec
    train = Dataset.from_list(make_conversations(8, seed=0))
    heldout = Dataset.from_list(make_conversations(6, seed=1))
    general = Dataset.from_list(make_conversations(3, seed=2))
    record = quality.runs.run_method(spec, tiny_pair(quality, method), train, heldout, general)

    assert record["method"] == method and record["seed"] == 0
    assert 0 <= record["rouge_l"] <= 100 and 0 <= record["exact_match"] <= 100
    assert record["num_samples"] == 4 and record["eval_s"] > 0 and record["eval_cpu_s"] > 0
    assert record["answer_words"] >= 0 and 0 <= record["empty_answers_pct"] <= 100
    assert 0 <= record["short_answer_rate"] <= 100
    on_general = record["heldout_general"]
    assert on_general["num_samples"] == 3 and len(on_general["per_sample"]["words"]) == 3  # its own prompts
    assert len(record["predictions"]) == 4 and all(isinstance(x, str) for x in record["predictions"])
    assert len(record["per_sample"]["rouge_l"]) == 4 and 0 <= record["loop_rate"] <= 100
    trained = quality.rows.METHODS[method].trainer is not None
    evaluates_teacher = quality.rows.METHODS[method].evaluates == "teacher"
    assert record["teacher_cache"] == (method in ("sft", "fkl", "rkl", "jsd", "akl"))
    assert record["teacher_cache"] == (tmp_path / "teacher-cache" / "teacher_cache.json").is_file()
    assert ("kl" in record) == (not evaluates_teacher) == ("kl_sum" in record["per_sample"])
    if "kl" in record:
        assert record["kl"] >= 0
    assert ("train_s" in record) == trained
    if trained:
        assert record["global_step"] == 2 and record["train_s"] > 0 and record["train_cpu_s"] > 0
        assert torch.isfinite(torch.tensor(record["train_loss"]))
        assert record["lmbda"] == (1.0 if method == "mgsr" else 0.0)
    if method == "mgsr":
        assert {"loss/ce", "loss/dac_kl", "loss/span"} <= set(record["last_logged"])
        assert any(key.startswith("scrg/") for key in record["last_logged"])


@pytest.mark.parametrize("method", ["sft", "fkl-live", "trl-gkd", "dskd-cma"])
def test_group_by_length_budget_trains_every_kind_of_row(quality, method, tmp_path):
    """The cpu-demo budget batches by length: from the cache, with a live teacher, in TRL's trainer, across
    vocabularies."""
    budget = dataclasses.replace(tiny_budget(quality), train_sampling_strategy="group_by_length")
    spec = quality.rows.RunSpec(method=method, seed=0, budget=budget, output_dir=str(tmp_path / method),
                           cache_dir=str(tmp_path / "teacher-cache"))  # fmt: skip
    train = Dataset.from_list(make_conversations(24, seed=0))
    heldout = Dataset.from_list(make_conversations(6, seed=1))
    assert quality.runs.run_method(spec, tiny_pair(quality, method), train, heldout)["global_step"] == 2


def _record(method: str, seed: int, rouge: list[float], kl: list[float] | None = None, **more) -> dict:
    """A finished run's record with per-prompt scores (each prompt's KL over 2 answer tokens)."""
    sample = {"rouge_l": rouge, "exact_match": [0] * len(rouge), "loop": [0] * len(rouge)}
    record = {"method": method, "seed": seed, "lmbda": 0.0, "num_samples": len(rouge), "per_sample": sample}
    record |= {"rouge_l": sum(rouge) / len(rouge), "exact_match": 0.0, "loop_rate": 0.0}
    if kl is not None:
        sample |= {"kl_sum": [2 * x for x in kl], "kl_tokens": [2] * len(kl)}
        record["kl"] = sum(kl) / len(kl)
    return record | more


def test_bootstrap_intervals_contain_the_point_and_shrink_to_it_without_spread(quality):
    same = [_record("fkl", s, [10.0, 20.0, 30.0, 40.0], [1.0, 1.0, 1.0, 1.0]) for s in range(2)]
    point, low, high = quality.stats.bootstrap([same], "rouge_l")
    assert point == 25.0 and 10.0 <= low < point < high <= 40.0
    assert quality.stats.bootstrap([same], "kl") == (1.0, 1.0, 1.0)  # no spread over prompts or seeds
    shifted = [_record("akl", s, [15.0, 25.0, 35.0, 45.0], [0.5] * 4) for s in range(2)]
    assert quality.stats.bootstrap([shifted, same], "rouge_l", sign=(1, -1)) == (5.0, 5.0, 5.0)  # paired over prompts


def test_claims_count_differences_inside_the_margins_as_ties(quality):
    """Two rows whose KL differs by 1e-4 nats on every prompt (two exact implementations of one objective): the
    interval excludes 0 but lies inside the margin, so they agree; 0.05 nats apart they differ."""
    rouge = [10.0, 20.0, 30.0, 40.0]
    trl = [_record("trl-gkd", 0, rouge, [1.0, 1.2, 0.8, 1.1])]
    close = [_record("jsd-live", 0, rouge, [1.0001, 1.2001, 0.8001, 1.1001])]
    far = [_record("jsd-live", 0, rouge, [1.05, 1.25, 0.85, 1.15])]
    for rows, verdict in ((close, "agree"), (far, "differ")):
        table = quality.render.claims_table(trl + rows)
        line = next(x for x in table.splitlines() if "jsd-live - trl-gkd" in x)
        assert line.endswith(f"| {verdict} |"), line


def test_page_renders_from_records(quality, tmp_path):
    budget = tiny_budget(quality)
    records = [
        _record("teacher", 0, [80.0, 70.0, 90.0, 60.0]),
        _record("fkl", 0, [10.0, 20.0, 30.0, 20.0], [1.0, 1.2, 0.8, 1.0], teacher_cache=True, train_s=3.0),
        _record("fkl", 1, [12.0, 18.0, 30.0, 20.0], [1.1, 1.2, 0.9, 1.0], teacher_cache=True, train_s=3.2),
        _record("fkl-live", 0, [11.0, 20.0, 29.0, 20.0], [1.0, 1.2, 0.8, 1.1], train_s=5.0),
        _record("fkl-tail", 0, [10.0, 21.0, 30.0, 20.0], [1.0, 1.1, 0.8, 1.0], teacher_cache=True, train_s=3.0),
        _record("akl", 0, [30.0, 40.0, 50.0, 40.0], [0.5, 0.6, 0.4, 0.5], teacher_cache=True, train_s=3.0),
        {"method": "bild", "seed": 0, "error": "exit 1: boom"},
    ]
    # The general-assistant set: AKL below FKL there.
    records[4]["heldout_general"] = _record("fkl-tail", 0, [40.0, 50.0, 45.0], [0.9, 0.8, 1.0])
    records[5]["heldout_general"] = _record("akl", 0, [5.0, 7.0, 6.0], [2.0, 2.5, 3.0])
    payload = {
        "budget_name": "tiny",
        "budget": dataclasses.asdict(budget),
        "threads": 1,
        "environment": {"cpu": "x86_64", "cpu_count": 2, "python": "3", "torch": "t", "transformers": "x", "trl": "y"},
        "methods": list(quality.rows.METHODS),
        "commands": ["python benchmarks/quality.py --budget tiny"],
        "wall_s": 60.0,
        "results": records,
        "commentary": "Observed on this run only.",
    }
    page = quality.render.write_outputs(payload, tmp_path / "quality_tiny.json")
    assert (tmp_path / "quality_tiny.md").read_text() == page
    assert (tmp_path / "quality_tiny.png").stat().st_size > 0 and "![Rouge-L and KL" in page
    fkl_row = next(line for line in page.splitlines() if line.startswith("| fkl |"))
    assert "| cache | 0 | 2 | 20.00 [" in fkl_row and "| 3 |" in fkl_row
    assert "| teacher |" in page and "error: exit 1: boom" in page
    first_set = page[: page.index("## General-assistant held-out set")]
    claims = {
        line.split(" | ")[0]: line
        for line in first_set.splitlines()
        if "over FKL" in line or "vs live teacher" in line
    }
    assert claims["| AKL over FKL (AKL paper)"].endswith("| reproduces |")
    assert claims["| teacher cache, flat tail vs live teacher, fkl (should agree)"].endswith("| agree |")
    assert "Observed on this run only." in page
    general = page[page.index("## General-assistant held-out set") :]
    assert "on 3 prompts of `heldout_general`" in general
    assert next(line for line in general.splitlines() if line.startswith("| akl |")).count("| 6.00 [") == 1
    assert "| fkl-live |" not in general  # only the rows scored on it
    akl_claim = next(line for line in general.splitlines() if line.startswith("| AKL over FKL (AKL paper)"))
    assert "| -39.00 [" in akl_claim and akl_claim.endswith("| reversed |")
    assert json.loads((tmp_path / "quality_tiny.json").read_text())["results"] == records
    docs_page = tmp_path / "docs" / "results" / "methods.md"
    docs_page.parent.mkdir(parents=True)
    docs_page.write_text("# Methods side by side\n\nold table\n\n## Findings (commentary)\n\nold findings\n")
    quality.render.update_section(docs_page, payload, page, tmp_path / "quality_tiny.json")
    text = docs_page.read_text()
    assert "old table" not in text and "old findings" not in text and text.startswith("# Methods side by side\n\n")
    assert fkl_row in text and "(../../quality_tiny.png)" in text and "Observed on this run only." in text
    assert "\n## Findings (commentary on this run, written after it)\n" in text
    planned = f"{budget.seeds} seeds per trained row are planned; rows or seeds still missing"
    assert planned in " ".join(text.split())  # most rows have no seed yet
    fewer_rows = {**payload, "methods": ["teacher", "fkl"]}
    quality.render.update_section(docs_page, fewer_rows, page, tmp_path / "quality_tiny.json")
    assert f"{budget.seeds} seeds per trained row." in " ".join(docs_page.read_text().split())  # fkl has them all
    readme = tmp_path / "README.md"  # the section's heading is a whole line: README's old one is not it
    readme.write_text("# T\n\n### Methods side by side\n\nold\n")
    with pytest.raises(SystemExit, match="has no '# Methods side by side' heading"):
        quality.render.update_section(readme, payload, page, tmp_path / "quality_tiny.json")
    assert readme.read_text() == "# T\n\n### Methods side by side\n\nold\n"


def test_the_committed_methods_page_shows_its_results_page(quality):
    """docs/results/methods.md holds the methods table of the committed results page (rerun `quality.py --render
    benchmarks/results/quality_cpu-demo.json --readme docs/results/methods.md` after a quality run)."""
    root = quality.cli.RESULTS_DIR.parents[1]
    results_page = (quality.cli.RESULTS_DIR / "quality_cpu-demo.md").read_text()
    table = results_page[results_page.index("| method | recipe |") :].split("\n\n")[0]
    assert table in (root / "docs" / "results" / "methods.md").read_text()


def test_resume_refuses_results_made_on_other_bundled_data(quality, tmp_path):
    """--resume keeps finished runs only if the bundled data is the data they were made on (its digest is stored)."""
    args = quality.cli.parse_args(["--budget", "cpu-demo"])
    stored = {
        "budget": dataclasses.asdict(quality.cli.build_budget(args)),
        "data": {**quality.cli.bundled_data_digest(), "train": "0" * 16},
        "results": [],
    }
    json_path = tmp_path / "quality.json"
    json_path.write_text(json.dumps(stored))
    with pytest.raises(SystemExit, match="other bundled data"):
        quality.cli.main(["--budget", "cpu-demo", "--resume", "--out", str(json_path), "--max-runs", "0"])
