"""What the quality benchmark runs (benchmarks/quality.py): the budgets (training and evaluation sizes shared by
every row of a table), the rows (how each student is trained, or which model is only evaluated) and the spec of one
row and seed, which the command line hands to a fresh process as JSON."""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field
from typing import Any, Literal

SMOLLM2 = "smollm2-135m-instruct"
GEMMA = "gemma-3-270m"


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
    """Share of on-policy (student-generated) steps of the "shared" rows; SFT always 0."""
    mgsr_lmbda: float
    """MGSR's share of on-policy steps: SCRG corrects student generations, so it needs lmbda > 0."""
    seeds: int
    student_layers: int = 20
    eval_batch: int = 8
    onpolicy_lmbda: float = 0.5
    """The on-policy GKD row's share (the GKD paper's lmbda)."""
    layer_selection: str = "influence"
    """How the student's layers are chosen (hf_kd.assets.student_layers)."""
    cache_top_k: int | None = 64
    """Top-k of the offline teacher cache the cache rows train from; None: every row runs the live teacher."""
    drop_looping_answers: bool = False
    """Leave out the training conversations whose teacher answer loops (hf_kd.demo.without_looping_answers)."""
    train_sampling_strategy: str = "random"
    """transformers' sampler: "group_by_length" batches conversations of similar length (less padding)."""
    general_eval: bool = True
    """Also score every row on the general-assistant held-out set (bundled ``heldout_general``), eval_samples of it."""


# The cpu budget is the demo's former recipe at half its steps: the 20-layer block-influence student starts at a
# held-out KL of about 2 and writes fluent but wrong answers, so 40 steps at lr 5e-4 separate what the methods teach.
# Measured on 2 cores: about 4-5 s per cached step, 7 s per live-teacher step, more with generation.
CPU = Budget(
    steps=40,
    batch=4,
    learning_rate=5e-4,
    max_length=256,
    eval_samples=40,
    max_new_tokens=48,
    lmbda=0.0,
    mgsr_lmbda=0.25,
    seeds=3,
)
BUDGETS: dict[str, Budget] = {
    "cpu": CPU,
    # The demo's recipe (hf_kd.demo): 24 layers, lr 2e-4, batches of similar length, training answers that loop left
    # out, 80 steps; the demo's student loops in 10-15% of its held-out answers over 3 seeds (the teacher in 17.5%).
    "cpu-demo": dataclasses.replace(
        CPU,
        steps=80,
        learning_rate=2e-4,
        student_layers=24,
        drop_looping_answers=True,
        train_sampling_strategy="group_by_length",
    ),
    "gpu": Budget(
        steps=200,
        batch=8,
        learning_rate=1e-4,
        max_length=512,
        eval_samples=None,
        max_new_tokens=96,
        lmbda=0.0,
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
    lmbda: Literal["none", "shared", "onpolicy", "mgsr"] = "shared"
    """Which Budget field sets the on-policy share ("none": 0)."""
    config: dict[str, Any] = field(default_factory=dict)
    """Further DistillationConfig fields."""
    evaluates: Literal["student", "teacher"] = "student"
    teacher_cache: bool = False
    """Train from the offline teacher cache (when the budget has one) instead of the live teacher."""
    cache_top_k: int | None = None
    """The cache's k for this row (None: the budget's ``cache_top_k``)."""


METHODS: dict[str, Method] = {
    "teacher": Method("SmolLM2-135M-Instruct, 30 layers (evaluated only)", trainer=None, evaluates="teacher"),
    "student-init": Method("layer-pruned student before training (evaluated only)", trainer=None),
    "sft": Method("kd_loss=ce (SFT on the references)", kd_loss="ce", lmbda="none", teacher_cache=True),
    "fkl": Method(
        "kd_loss=fkl, teacher cache, flat tail",
        kd_loss="fkl",
        teacher_cache=True,
        config={"teacher_cache_tail": "flat"},
    ),
    "fkl-live": Method("kd_loss=fkl, live teacher", kd_loss="fkl"),
    "fkl-tail": Method(
        "kd_loss=fkl, teacher cache, student-shaped tail (top-k + tail bucket; the default)",
        kd_loss="fkl",
        teacher_cache=True,
        config={"teacher_cache_tail": "student"},
    ),
    "fkl-tail-k128": Method(
        "kd_loss=fkl, teacher cache of top-128, student-shaped tail",
        kd_loss="fkl",
        teacher_cache=True,
        cache_top_k=128,
        config={"teacher_cache_tail": "student"},
    ),
    "rkl": Method("kd_loss=rkl, teacher cache", kd_loss="rkl", teacher_cache=True),
    "jsd": Method("kd_loss=jsd, beta 0.5, teacher cache", kd_loss="jsd", teacher_cache=True),
    "jsd-live": Method("kd_loss=jsd, beta 0.5, live teacher", kd_loss="jsd"),
    "trl-gkd": Method("TRL GKDTrainer, beta 0.5", trainer="trl"),
    "gkd-onpolicy": Method("kd_loss=jsd, beta 0.5, on-policy (GKD)", kd_loss="jsd", lmbda="onpolicy"),
    "akl": Method("kd_loss=akl, mu 0.5, teacher cache", kd_loss="akl", teacher_cache=True),
    "bild": Method("kd_loss=bild+prompt_fkl, top-k 8, T 3 (official trainer)", kd_loss="bild+prompt_fkl"),
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
    cache_dir: str | None = None
    """Where the teacher cache is built (None: the bundled data's shared cache under hf_kd's cache directory)."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        return cls(**{**data, "budget": Budget(**data["budget"])})

    def lmbda(self) -> float:
        """The on-policy share this row trains with."""
        source = METHODS[self.method].lmbda
        shares = {"none": 0.0, "shared": self.budget.lmbda, "onpolicy": self.budget.onpolicy_lmbda}
        return (shares | {"mgsr": self.budget.mgsr_lmbda})[source]

    def uses_cache(self) -> bool:
        """Whether this row trains from the offline teacher cache."""
        return METHODS[self.method].teacher_cache and self.budget.cache_top_k is not None

    def cache_top_k(self) -> int | None:
        """The k of the cache this row trains from (None: the live teacher)."""
        return (METHODS[self.method].cache_top_k or self.budget.cache_top_k) if self.uses_cache() else None
