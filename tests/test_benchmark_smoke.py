"""Smoke test of benchmarks/speed_memory.py's two benchmarks (trainer_steps.py, loss_side.py): each runs on a tiny
shape and reports its fields; --render rewrites either's table.

Only the presence and sign of the fields are checked, never timings.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from tiny import load_script


@pytest.fixture(scope="module")
def bench():
    """The command line and the modules it runs (loading it puts benchmarks/ on sys.path)."""
    cli = load_script("benchmarks/speed_memory.py")
    import loss_side
    import shapes
    import trainer_steps

    return SimpleNamespace(cli=cli, shapes=shapes, steps=trainer_steps, loss_side=loss_side)


def tiny_spec(bench, method: str, tmp_path: Path):
    student = bench.shapes.ModelShape(hidden=32, layers=1, heads=4, kv_heads=2, intermediate=64)
    teacher = bench.shapes.ModelShape(hidden=48, layers=1, heads=4, kv_heads=2, intermediate=96)
    return bench.steps.RunSpec(
        method=method,
        vocab=256,
        seq=16,
        batch=2,
        student=student,
        teacher=teacher,
        warmup=1,
        steps=1,
        threads=1,
        output_dir=str(tmp_path / method),
    )


@pytest.mark.parametrize("method", ["trl", "jsd", "student-fb", "teacher-f", "heads"])
def test_run_config_fields(bench, method, tmp_path):
    result = bench.steps.run_config(tiny_spec(bench, method, tmp_path))
    assert result["method"] == method and "error" not in result and "skipped" not in result
    for key in ("step_time_s", "cpu_time_s", "tokens_per_s", "peak_mem_mib", "baseline_mem_mib", "params_teacher"):
        assert result[key] > 0, key
    assert result["step_mem_mib"] >= 0
    assert len(result["step_times_s"]) == 1
    if method != "teacher-f":
        assert result["params_student"] > 0


def test_ratios_and_table(bench, tmp_path):
    results = [
        bench.steps.run_config(tiny_spec(bench, m, tmp_path))
        for m in ("trl", "akl", "student-fb", "teacher-f", "heads")
    ]
    results.append({"method": "trl-liger", "vocab": 256, "seq": 16, "batch": 2, "skipped": "needs a GPU"})
    bench.steps.add_ratios(results)
    akl = results[1]
    assert akl["step_time_x_trl"] > 0 and akl["peak_mem_x_trl"] > 0
    assert "loss_side_fraction" in akl and "engine_fraction" in akl
    table = bench.steps.markdown_table(results, cuda=False)
    assert table.count("\n") == len(results) + 2
    assert "skipped: needs a GPU" in table


def test_loss_side_rows_ratios_and_table(bench):
    """--loss-side: the floor, TRL's chunked kernel and hf_kd terms run on one tiny shape; TRL's generalized JSD
    (beta 0.5) and hf_kd's jsd agree on the same rows and heads; the merged records carry the ratios."""
    records = [
        bench.loss_side.run_loss_side(
            bench.loss_side.LossSideSpec(method=m, vocab=300, rows=12, student_hidden=8, teacher_hidden=12)
        )
        for m in ("floor", "trl-chunked", "jsd", "akl", "dskd")
    ]
    for r in records:
        assert r["step_times_s"][0] > 0 and r["peak_mem_mib"] > 0 and r["minor_faults"][0] >= 0, r["method"]
    trl, jsd = records[1]["loss"], records[2]["loss"]
    assert abs(trl - jsd) <= 1e-5 * abs(jsd)
    merged = bench.loss_side.merge_rounds(records + [dict(records[2], step_times_s=[1.0], cpu_times_s=[1.0])])
    by_method = {r["method"]: r for r in merged}
    assert len(by_method["jsd"]["step_times_s"]) == 2 and by_method["floor"]["x_floor"] == 1.0
    assert by_method["akl"]["x_trl-chunked"] > 0 and by_method["akl"]["x_jsd"] > 0
    assert by_method["dskd"]["x_jsd"] > 0 and by_method["dskd"]["loss"] > 0
    assert bench.loss_side.loss_side_table(merged).count("\n") == len(merged) + 2


def test_render_rewrites_either_benchmarks_table(bench, tmp_path):
    """--render reads the JSON a run wrote: the loss side's merged rounds (no per-sequence fields: it once failed with
    KeyError 'seq') and the trainer steps' records, each into its own table."""
    records = [
        bench.loss_side.run_loss_side(
            bench.loss_side.LossSideSpec(method=m, vocab=64, rows=4, student_hidden=8, teacher_hidden=8)
        )
        for m in ("floor", "jsd")
    ]
    merged = bench.loss_side.merge_rounds(records)
    loss_json = tmp_path / "speed_memory_loss-side.json"
    loss_json.write_text(json.dumps({"mode": "loss-side", "device": "cpu", "peak_tflops": None, "results": merged}))
    bench.cli.main(["--render", str(loss_json)])
    assert loss_json.with_suffix(".md").read_text() == bench.loss_side.loss_side_table(merged)

    skipped = {"method": "trl-liger", "vocab": 256, "seq": 16, "batch": 2, "skipped": "needs a GPU"}
    steps_json = tmp_path / "speed_memory_cpu-small.json"
    steps_json.write_text(json.dumps({"device": "cpu", "results": [skipped]}))
    bench.cli.main(["--render", str(steps_json)])
    assert "skipped: needs a GPU" in steps_json.with_suffix(".md").read_text()


def test_loss_side_bf16_rows_and_gpu_table(bench):
    """--bf16 (a GPU's default): both heads' matmuls run in bf16 under autocast; TRL's kernel and hf_kd's jsd
    still agree (to bf16 precision), and the GPU table reports tokens/s and the head matmuls' MFU."""
    spec = dict(vocab=300, rows=12, student_hidden=8, teacher_hidden=12, bf16=True)
    records = [
        bench.loss_side.run_loss_side(bench.loss_side.LossSideSpec(method=m, **spec))
        for m in ("floor", "trl-chunked", "jsd")
    ]
    trl, jsd = records[1]["loss"], records[2]["loss"]
    assert jsd > 0 and abs(trl - jsd) <= 2e-2 * jsd
    flops = bench.loss_side.LossSideSpec(method="jsd", **spec).head_flops
    assert flops == 2 * 12 * 300 * (3 * 8 + 12)
    merged = bench.loss_side.merge_rounds([r | {"head_flops": flops} for r in records], gpu=True)
    for r in merged:
        assert r["tokens_per_s"] == 12 / r["step_time_s"] and r["head_tflops_per_s"] > 0
    table = bench.loss_side.loss_side_table(merged, peak_tflops=989.0)
    assert "tokens/s" in table and "MFU" in table and table.count("\n") == len(merged) + 2


def test_chunk_buffers_counts_a_terms_live_buffers(capsys):
    """benchmarks/chunk_buffers.py on 40 MiB chunk buffers (above glibc's largest mmap threshold, so freed ones leave
    the resident set): jsd keeps 6 alive; more than 8 means a chunk's buffers outlive it (as they once did)."""
    load_script("benchmarks/chunk_buffers.py").main(
        ["--vocab", "65536", "--chunk-rows", "160", "--hidden", "64", "96", "--terms", "jsd"]
    )
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert 4.0 <= float(row.split("|")[2]) <= 8.0, row
