"""Quality of the distillation methods side by side, on a real teacher, a real student and real data.

SmolLM2-135M-Instruct teaches a student made of 10 of its 30 decoder layers (hf_kd.assets) on the bundled
conversations (hf_kd/data). Every method trains the same student initialisation for the same steps, batch,
learning-rate schedule and seed; then the student is scored on held-out conversations with
hf_kd.evaluation.evaluate_student: Rouge-L of greedy answers against the references, first-sentence exact match,
and the token-level KL(SmolLM2 teacher || student) on the references (every row, the cross-vocabulary run included:
its student keeps SmolLM2's tokenizer). The teacher and the untrained student are scored for scale.

Rows: SFT on the references, FKL, RKL, TRL's own GKDTrainer (the external baseline), hf_kd's jsd, AKL, BiLD,
MGSR (ce+dac_kl+span with SCRG on student generations), DSKD with the same vocabulary, and DSKD-CMA with
Gemma-3-270m as the teacher (different vocabulary). Each run is a fresh subprocess with freshly loaded models; its
record is appended to the JSON file as soon as it finishes, and the markdown table is rewritten from the JSON.

Usage::

    python benchmarks/quality.py --budget cpu                     # all rows, 1 seed, about 30-40 min on 2 free cores
    python benchmarks/quality.py --budget gpu                     # more steps, every held-out prompt, 3 seeds
    python benchmarks/quality.py --budget cpu --methods sft akl   # a subset
    python benchmarks/quality.py --budget cpu --resume            # run only the rows missing from the JSON
    python benchmarks/quality.py --render benchmarks/results/quality_cpu.json --commentary notes.md

Results: ``benchmarks/results/quality_<budget>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment, run_in_fresh_process  # noqa: E402  (offline defaults, shared with speed_memory.py)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SMOLLM2 = "smollm2-135m-instruct"
GEMMA = "gemma-3-270m"


# ---------------------------------------------------------------------------------------------- what runs
@dataclass(frozen=True)
class Budget:
    """Training and evaluation sizes shared by every row of one table."""

    steps: int
    batch: int
    learning_rate: float
    max_length: int
    eval_samples: int | None
    """Held-out conversations scored, evenly spread over the held-out file (None = all)."""
    max_new_tokens: int
    """Greedy tokens per held-out answer, and the length of on-policy generations during training."""
    lmbda: float
    """Share of on-policy (student-generated) steps for every distillation method except MGSR; SFT always 0."""
    mgsr_lmbda: float
    """MGSR's share of on-policy steps: SCRG corrects student generations, so it needs lmbda > 0."""
    seeds: int
    student_layers: int = 10
    eval_batch: int = 8


# The cpu budget was scaled from single-thread CPU times measured on this benchmark's own runs: an off-policy
# step costs about 6 CPU-s, an MGSR step with student generation and SCRG about 5 times that, and scoring 10
# held-out prompts about 18 CPU-s; that puts the 13 rows at roughly 40 minutes on two free cores (an estimate:
# the measurements were taken on shared cores, where one thread per run was the fastest setting).
BUDGETS: dict[str, Budget] = {
    "cpu": Budget(
        steps=40,
        batch=4,
        learning_rate=2e-4,
        max_length=256,
        eval_samples=40,
        max_new_tokens=48,
        lmbda=0.0,
        mgsr_lmbda=0.25,
        seeds=1,
        eval_batch=10,
    ),
    "gpu": Budget(
        steps=200,
        batch=8,
        learning_rate=1e-4,
        max_length=512,
        eval_samples=None,
        max_new_tokens=96,
        lmbda=0.5,
        mgsr_lmbda=0.5,
        seeds=3,
        eval_batch=32,
    ),
}


@dataclass(frozen=True)
class Method:
    """One row of the table: how the student is trained (or which model is only evaluated)."""

    recipe: str
    """What the row trains with, as shown in the table."""
    trainer: Literal["hf_kd", "trl"] | None = "hf_kd"
    """None: an evaluation-only row."""
    kd_loss: str | None = None
    teacher: str = SMOLLM2
    """Real-model name (hf_kd.assets) of the teacher that trains the student."""
    lmbda: Literal["none", "shared", "mgsr"] = "shared"
    """Which Budget field sets the on-policy share ("none": 0)."""
    config: dict[str, Any] = field(default_factory=dict)
    """Further DistillationConfig fields."""
    evaluates: Literal["student", "teacher"] = "student"


METHODS: dict[str, Method] = {
    "teacher": Method("SmolLM2-135M-Instruct, 30 layers (evaluated only)", trainer=None, evaluates="teacher"),
    "student-init": Method("layer-pruned student before training (evaluated only)", trainer=None),
    "sft": Method("kd_loss=ce (SFT on the references)", kd_loss="ce", lmbda="none"),
    "fkl": Method("kd_loss=fkl", kd_loss="fkl"),
    "rkl": Method("kd_loss=rkl", kd_loss="rkl"),
    "trl-gkd": Method("TRL GKDTrainer, beta 0.5", trainer="trl"),
    "jsd": Method("kd_loss=jsd, beta 0.5", kd_loss="jsd"),
    "akl": Method("kd_loss=akl, mu 0.5", kd_loss="akl"),
    "bild": Method("kd_loss=bild, top-k 8, T 3", kd_loss="bild"),
    "mgsr": Method(
        "kd_loss=ce+dac_kl+span, scrg_corrections=1",
        kd_loss="ce+dac_kl+span",
        lmbda="mgsr",
        config={"scrg_corrections": 1},
    ),
    "dskd": Method("bridge=dskd, kd_loss=fkl, kd_rate 0.5, T 2", kd_loss="fkl", config={"bridge": "dskd"}),
    "teacher-gemma": Method(
        "Gemma-3-270m base, plain chat format (evaluated only)", trainer=None, teacher=GEMMA, evaluates="teacher"
    ),
    "dskd-cma": Method(
        "Gemma-3-270m teacher, bridge=dskd (CMA), kd_loss=fkl, kd_rate 0.5, T 2",
        kd_loss="fkl",
        teacher=GEMMA,
        config={"bridge": "dskd"},
    ),
}


@dataclass
class RunSpec:
    """One row and seed, run in one process (JSON-serialisable so the parent can hand it to a child)."""

    method: str
    seed: int
    budget: Budget
    output_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="kd_quality_"))
    threads: int | None = None
    config_overrides: dict[str, Any] = field(default_factory=dict)
    """Last-word trainer config fields (tests shrink helper modules with it)."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        return cls(**{**data, "budget": Budget(**data["budget"])})

    def lmbda(self) -> float:
        """The on-policy share this row trains with."""
        source = METHODS[self.method].lmbda
        return {"none": 0.0, "shared": self.budget.lmbda, "mgsr": self.budget.mgsr_lmbda}[source]


@dataclass
class Pair:
    """The models of one run. ``kl_teacher`` shares the student's tokenizer and is the KL reference of every row;
    ``teacher`` trains the student (it is ``kl_teacher`` itself unless the vocabularies differ)."""

    student: Any
    tokenizer: Any
    teacher: Any
    kl_teacher: Any
    teacher_tokenizer: Any | None = None
    """Set when the teacher's vocabulary differs from the student's."""


# ---------------------------------------------------------------------------------------------- one run
def load_real_pair(spec: RunSpec) -> Pair:
    """Fresh real models for ``spec``: SmolLM2 (KL reference and, same-vocabulary, teacher), its layer-pruned
    student, and Gemma-3-270m with its tokenizer when the row's teacher is Gemma."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_kd.assets import load_real_model, prune_layers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    smollm = load_real_model(SMOLLM2)
    kl_teacher = AutoModelForCausalLM.from_pretrained(smollm, dtype=torch.float32).to(device)
    tokenizer = AutoTokenizer.from_pretrained(smollm)
    student = prune_layers(kl_teacher, spec.budget.student_layers).to(device)
    method = METHODS[spec.method]
    if method.teacher == SMOLLM2:
        return Pair(student, tokenizer, kl_teacher, kl_teacher)
    path = load_real_model(method.teacher)
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    return Pair(student, tokenizer, teacher, kl_teacher, AutoTokenizer.from_pretrained(path))


def build_trainer(spec: RunSpec, pair: Pair, train_dataset) -> Any:
    """TRL's GKDTrainer or hf_kd's DistillationTrainer for the row, with the settings every row shares."""
    import torch

    method = METHODS[spec.method]
    budget = spec.budget
    cuda = torch.cuda.is_available()
    shared = {
        "output_dir": spec.output_dir,
        "max_steps": budget.steps,
        "per_device_train_batch_size": budget.batch,
        "learning_rate": budget.learning_rate,
        "lr_scheduler_type": "cosine",
        "warmup_steps": max(1, budget.steps // 10),
        "max_length": budget.max_length,
        "max_new_tokens": budget.max_new_tokens,
        "lmbda": spec.lmbda(),
        "beta": 0.5,
        "seq_kd": False,
        "bf16": cuda,
        "use_cpu": not cuda,
        "gradient_checkpointing": False,
        "logging_steps": max(1, budget.steps // 10),
        "save_strategy": "no",
        "report_to": "none",
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "seed": spec.seed,
    }
    common = {
        "model": pair.student,
        "teacher_model": pair.teacher,
        "train_dataset": train_dataset,
        "processing_class": pair.tokenizer,
    }
    if method.trainer == "trl":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        return GKDTrainer(args=GKDConfig(**shared | spec.config_overrides), **common)
    from hf_kd import DistillationConfig, DistillationTrainer

    args = DistillationConfig(**shared | {"kd_loss": method.kd_loss} | method.config | spec.config_overrides)
    return DistillationTrainer(args=args, teacher_processing_class=pair.teacher_tokenizer, **common)


def _last_logged_terms(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """The per-term losses and SCRG statistics of the last logging step."""
    for entry in reversed(log_history):
        terms = {k: float(v) for k, v in entry.items() if k.startswith(("loss/", "scrg/"))}
        if terms:
            return terms
    return {}


def heldout_subset(heldout, count: int | None):
    """``count`` held-out rows evenly spread over the file (its sources come in blocks), or all of them."""
    from hf_kd.assets import evenly_spaced_layers

    if count is None or count >= len(heldout):
        return heldout
    return heldout.select(evenly_spaced_layers(count, len(heldout)))


def run_method(spec: RunSpec, pair: Pair, train_dataset, heldout) -> dict[str, Any]:
    """Trains (unless the row is evaluation-only) and scores one row; returns its record."""
    import torch
    from transformers import set_seed

    from hf_kd.evaluation import evaluate_student, rouge_l

    if spec.threads:
        torch.set_num_threads(spec.threads)
    method = METHODS[spec.method]
    budget = spec.budget
    set_seed(spec.seed)
    record: dict[str, Any] = {"method": spec.method, "seed": spec.seed, "lmbda": spec.lmbda()}
    model, tokenizer, kl_teacher = pair.student, pair.tokenizer, pair.kl_teacher
    if method.evaluates == "teacher":
        model, tokenizer = pair.teacher, pair.teacher_tokenizer or pair.tokenizer
        kl_teacher = None  # KL to itself is 0; a different vocabulary has no token-level KL
    if method.trainer is not None:
        trainer = build_trainer(spec, pair, train_dataset)
        started, cpu_started = time.perf_counter(), time.process_time()
        output = trainer.train()
        record["train_s"] = time.perf_counter() - started
        record["train_cpu_s"] = time.process_time() - cpu_started
        record["train_loss"] = float(output.training_loss)
        record["global_step"] = trainer.state.global_step
        record["last_logged"] = _last_logged_terms(trainer.state.log_history)
        model = trainer.accelerator.unwrap_model(trainer.model)
    scored = heldout_subset(heldout, budget.eval_samples)
    started, cpu_started = time.perf_counter(), time.process_time()
    scores = evaluate_student(
        model,
        tokenizer,
        scored,
        teacher=kl_teacher,
        max_new_tokens=budget.max_new_tokens,
        batch_size=budget.eval_batch,
        return_predictions=True,
    )
    record["eval_s"] = time.perf_counter() - started
    record["eval_cpu_s"] = time.process_time() - cpu_started
    predictions = scores.pop("predictions")
    per_prompt = [rouge_l(p, row["messages"][-1]["content"]) for p, row in zip(predictions, scored)]
    record["rouge_l_se"] = statistics.stdev(per_prompt) / len(per_prompt) ** 0.5 if len(per_prompt) > 1 else 0.0
    record["mean_answer_words"] = sum(len(p.split()) for p in predictions) / len(predictions)
    record["empty_answers_pct"] = 100.0 * sum(not p.strip() for p in predictions) / len(predictions)
    record["predictions"] = predictions
    return record | scores


def run_child(spec: RunSpec) -> dict[str, Any]:
    """One row on the real models and the bundled data (the body of a child process)."""
    from hf_kd.data import load_bundled_dataset

    started = time.perf_counter()
    pair = load_real_pair(spec)
    train, heldout = load_bundled_dataset("train"), load_bundled_dataset("heldout")
    load_s = time.perf_counter() - started
    record = run_method(spec, pair, train, heldout)
    record["load_s"] = load_s
    record["train_examples"] = len(train)
    return record


def run_in_subprocess(spec: RunSpec, timeout: float) -> dict[str, Any]:
    """Runs ``spec`` in a fresh Python process; a failure becomes a record with an ``error``."""
    started = time.perf_counter()
    record = run_in_fresh_process(Path(__file__).resolve(), spec, spec.threads, timeout)
    if "error" in record:
        return {"method": spec.method, "seed": spec.seed, **record}
    return record | {"wall_s": time.perf_counter() - started}


# ---------------------------------------------------------------------------------------------- the table
def _mean_spread(values: list[float], spec: str) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(statistics.mean(values), spec)} ± {format(statistics.stdev(values), spec)}"


def markdown_table(results: list[dict[str, Any]], order: list[str]) -> str:
    """One row per method (mean ± sample standard deviation over its seeds), in ``order``."""
    head = ["method", "recipe", "lmbda", "seeds", "Rouge-L", "Rouge-L SE", "first-sentence EM %"]
    head += ["KL(teacher‖student)"]
    head += ["answer words", "train s", "train CPU s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in order:
        records = [r for r in results if r["method"] == name]
        if not records:
            continue
        ok = [r for r in records if "error" not in r]
        cells = [name, METHODS[name].recipe if name in METHODS else "?"]
        if not ok:
            cells += [f"error: {records[-1]['error']}"] + ["-"] * (len(head) - 3)
        else:
            trained = METHODS[name].trainer is not None if name in METHODS else True
            cells += [
                f"{ok[0]['lmbda']:g}" if trained else "-",
                str(len(ok)),
                _mean_spread([r["rouge_l"] for r in ok], ".2f"),
                _mean_spread([r["rouge_l_se"] for r in ok if "rouge_l_se" in r][:1], ".2f"),
                _mean_spread([r["exact_match"] for r in ok], ".1f"),
                _mean_spread([r["kl"] for r in ok if "kl" in r], ".3f"),
                _mean_spread([r["mean_answer_words"] for r in ok if "mean_answer_words" in r], ".1f"),
                _mean_spread([r["train_s"] for r in ok if "train_s" in r], ".0f"),
                _mean_spread([r["train_cpu_s"] for r in ok if "train_cpu_s" in r], ".0f"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_markdown(payload: dict[str, Any]) -> str:
    """The whole results page: command, budget, machine, conditions, the table and any commentary."""
    budget = payload["budget"]
    env = payload["environment"]
    results = payload["results"]
    done = [r for r in results if "error" not in r]
    eval_n = next((r["num_samples"] for r in done), None)
    cpu_s = sum(r.get("train_cpu_s", 0.0) + r.get("eval_cpu_s", 0.0) for r in done)
    train_n = next((r["train_examples"] for r in done if "train_examples" in r), None)
    machine = (
        f"{env.get('gpu') or env['cpu']}, {env['cpu_count']} CPU cores, {payload['threads'] or 'default'} threads; "
        f"python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, trl {env['trl']}"
    )
    lines = [
        f"# Distillation quality, `{payload['budget_name']}` budget",
        "",
        "Generated by `benchmarks/quality.py` from `" + payload["json_name"] + "`; every number is measured.",
        "",
        "- Command: " + "; ".join(f"`{c}`" for c in payload["commands"]),
        f"- Machine: {machine}",
        f"- Budget: {budget['steps']} steps, batch {budget['batch']}, learning rate {budget['learning_rate']:g} "
        f"(cosine, {max(1, budget['steps'] // 10)} warm-up steps), max_length {budget['max_length']}, "
        f"{budget['max_new_tokens']} new tokens (evaluation and on-policy generation), seeds "
        f"{sorted({r['seed'] for r in done}) or '-'}; identical for every row.",
        f"- On-policy share: **lmbda = {budget['lmbda']:g} for every distillation row (TRL GKD and hf_kd jsd "
        f"included), {budget['mgsr_lmbda']:g} for MGSR** (SCRG corrects student generations), 0 for SFT.",
        f"- Pair: SmolLM2-135M-Instruct teacher, student = {budget['student_layers']} of its 30 decoder layers "
        "(evenly spaced, embeddings and head copied); dskd-cma trains the same student from Gemma-3-270m "
        "(vocabulary 262144 vs 49152).",
        f"- Data: {train_n if train_n is not None else '?'} bundled training conversations; "
        f"{eval_n if eval_n is not None else '?'} held-out conversations, evenly spread over the held-out file "
        "(all its sources), are scored. The references are greedy "
        "answers of the SmolLM2 teacher (at most 96 tokens), so its own row is near the ceiling but below 100 "
        "(shorter generation budget, trimmed references).",
        "- Metrics: Rouge-L F1 x 100 of greedy answers vs references; first-sentence exact match; KL(SmolLM2 "
        "teacher ‖ student) per reference answer token in nats (the SmolLM2 teacher for every row, dskd-cma's "
        "student included; teacher rows: not applicable); answer words: mean whitespace-separated words per greedy "
        "answer. Values are mean ± sample standard deviation over seeds; Rouge-L SE is the standard error of the "
        "mean over the scored prompts (first seed), the noise of one evaluation. Each record in the JSON keeps "
        "every greedy answer.",
        f"- Time: {payload.get('wall_s', 0) / 60:.1f} min of wall time for the runs in this file (subprocesses, "
        f"model loading and evaluation included); training and evaluation used {cpu_s / 60:.1f} min of process CPU "
        f"time, about {cpu_s / 60 / (payload['threads'] or 1):.0f} min of wall time with {payload['threads']} "
        "thread(s) on free cores. `train s` is training alone. The cores were shared with other work, so wall "
        "times are indicative; the quality numbers do not depend on it.",
        "",
        markdown_table(results, payload["methods"]),
    ]
    failed = [r for r in results if "error" in r]
    if failed:
        lines += ["Failed runs:", ""] + [f"- {r['method']} seed {r['seed']}: {r['error']}" for r in failed] + [""]
    if payload.get("commentary"):
        lines += ["## Findings (commentary on this run, written after it)", "", payload["commentary"].strip(), ""]
    return "\n".join(lines)


def write_outputs(payload: dict[str, Any], json_path: Path) -> str:
    """Writes the JSON (the record of truth) and the markdown page rendered from it; returns the page."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    payload["json_name"] = json_path.name
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    page = render_markdown(payload)
    json_path.with_suffix(".md").write_text(page)
    return page


# ---------------------------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", type=int, help="number of seeds (0, 1, ...); default: the budget's")
    parser.add_argument("--steps", type=int, help="override the budget's training steps")
    parser.add_argument("--eval-samples", type=int, help="override the budget's held-out prompts")
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 16), help="torch/OMP threads")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--out", type=Path, help="results JSON (default: benchmarks/results/quality_<budget>.json)")
    parser.add_argument("--resume", action="store_true", help="keep the JSON's finished runs, run only the rest")
    parser.add_argument("--render", type=Path, help="only rewrite the markdown page of this results JSON")
    parser.add_argument("--commentary", type=Path, help="with --render: store this text as the findings section")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def build_budget(args: argparse.Namespace) -> Budget:
    """The named budget with the command line's overrides."""
    overrides = {"seeds": args.seeds, "steps": args.steps, "eval_samples": args.eval_samples}
    return dataclasses.replace(BUDGETS[args.budget], **{k: v for k, v in overrides.items() if v is not None})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        record = run_child(RunSpec.from_dict(json.loads(args.child)))
        Path(args.child_out).write_text(json.dumps(record))
        return
    if args.render:
        payload = json.loads(args.render.read_text())
        if args.commentary:
            payload["commentary"] = args.commentary.read_text()
        print(write_outputs(payload, args.render))
        return
    budget = build_budget(args)
    json_path = args.out or RESULTS_DIR / f"quality_{args.budget}.json"
    command = " ".join(["python benchmarks/quality.py", *(sys.argv[1:] if argv is None else argv)])
    payload: dict[str, Any] = {
        "budget_name": args.budget,
        "budget": dataclasses.asdict(budget),
        "threads": args.threads,
        "environment": environment(),
        "methods": list(METHODS),
        "commands": [command],
        "wall_s": 0.0,
        "results": [],
    }
    if args.resume and json_path.is_file():
        previous = json.loads(json_path.read_text())
        if previous["budget"] != payload["budget"]:
            raise SystemExit(f"{json_path} was made with another budget; drop --resume or pass --out.")
        payload |= {k: previous[k] for k in ("commands", "wall_s", "results")}
        payload["results"] = [r for r in payload["results"] if "error" not in r]
        payload["commands"].append(command)
    done = {(r["method"], r["seed"]) for r in payload["results"]}
    for seed in range(budget.seeds):
        for name in args.methods:
            if (name, seed) in done or (METHODS[name].trainer is None and seed > 0):
                continue  # evaluation-only rows are deterministic: one seed suffices
            spec = RunSpec(method=name, seed=seed, budget=budget, threads=args.threads)
            started = time.perf_counter()
            record = run_in_subprocess(spec, args.timeout)
            payload["wall_s"] += time.perf_counter() - started
            payload["results"].append(record)
            status = record.get("error") or f"Rouge-L {record['rouge_l']:.2f}, KL {record.get('kl', float('nan')):.3f}"
            print(f"[{time.perf_counter() - started:6.0f} s] {name} seed {seed}: {status}", flush=True)
            write_outputs(payload, json_path)
    print(write_outputs(payload, json_path))


if __name__ == "__main__":
    main()
