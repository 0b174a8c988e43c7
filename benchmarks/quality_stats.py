"""Statistics of the quality benchmark (benchmarks/quality.py): 95% percentile bootstraps over held-out prompts
and seeds, per row and, paired over the same prompts, for each paper's claim (row - baseline), with the verdict a
claim gets here."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

RESAMPLES = 2000
# The papers' claims, as (claim, row, baseline row): the row should score above the baseline.
CLAIMS = [
    ("AKL over FKL (AKL paper)", "akl", "fkl-tail"),
    ("AKL over RKL (AKL paper)", "akl", "rkl"),
    ("BiLD over KL (BiLD paper)", "bild", "fkl-live"),
    ("MGSR over on-policy GKD (MGSR paper)", "mgsr", "gkd-onpolicy"),
    ("DSKD over plain KD, same vocabulary (DSKD paper)", "dskd", "fkl-live"),
    ("DSKD-CMA over SFT across vocabularies (DSKD paper)", "dskd-cma", "sft"),
    ("on-policy GKD over off-policy GKD (GKD paper; off-policy from the cache)", "gkd-onpolicy", "jsd"),
    ("hf_kd jsd vs TRL GKDTrainer, same objective, both live (should agree)", "jsd-live", "trl-gkd"),
    ("teacher cache vs live teacher, jsd (should agree)", "jsd", "jsd-live"),
    ("teacher cache, flat tail vs live teacher, fkl (should agree)", "fkl", "fkl-live"),
    ("cache with a tail bucket vs live teacher, fkl (should agree)", "fkl-tail", "fkl-live"),
    ("top-128 cache with a tail bucket vs live teacher, fkl (should agree)", "fkl-tail-k128", "fkl-live"),
]

# Differences whose whole interval lies within these margins count as ties: a fifth of the spread between the live
# fkl row's seeds (KL 0.790-0.813), and half a Rouge-L point. Two exact implementations of one objective can
# differ by less (the 4th decimal of a loss) and still be "significantly" different over 40 identical answers.
EQUAL_KL = 0.005
EQUAL_ROUGE_L = 0.5

Interval = tuple[float, float, float]
"""(point estimate, 2.5th percentile, 97.5th percentile)."""


def finished(results: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The row's records that finished with per-prompt scores, one per seed."""
    return [r for r in results if r["method"] == name and "error" not in r and "per_sample" in r]


def _statistic(records: list[dict[str, Any]], metric: str, seeds: list[int], prompts: list[int]) -> float:
    """Mean over the chosen seeds of the metric over the chosen prompts (KL: token-weighted, as evaluated)."""
    values = []
    for s in seeds:
        sample = records[s]["per_sample"]
        if metric == "kl":
            tokens = sum(sample["kl_tokens"][i] for i in prompts)
            values.append(sum(sample["kl_sum"][i] for i in prompts) / max(tokens, 1))
        else:
            values.append(sum(sample[metric][i] for i in prompts) / len(prompts))
    return sum(values) / len(values)


def bootstrap(
    rows: list[list[dict[str, Any]]], metric: str, sign: tuple[int, ...] = (1,), seed: int = 0
) -> Interval | None:
    """(point estimate, 2.5th, 97.5th percentile) of sum_j sign[j] * statistic(rows[j]); every resample draws the
    held-out prompts once for all rows (paired) and each row's seeds independently."""
    key = "kl_sum" if metric == "kl" else metric
    if any(not records or key not in records[0]["per_sample"] for records in rows):
        return None
    rng = random.Random(seed)
    n_prompts = len(rows[0][0]["per_sample"]["rouge_l"])
    everything = list(range(n_prompts))
    point = sum(k * _statistic(r, metric, list(range(len(r))), everything) for k, r in zip(sign, rows))
    draws = []
    for _ in range(RESAMPLES):
        prompts = [rng.randrange(n_prompts) for _ in everything]
        draws.append(
            sum(k * _statistic(r, metric, [rng.randrange(len(r)) for _ in r], prompts) for k, r in zip(sign, rows))
        )
    draws.sort()
    return point, draws[int(0.025 * RESAMPLES)], draws[int(0.975 * RESAMPLES) - 1]


def row_intervals(results: list[dict[str, Any]], order: list[str]) -> dict[str, dict[str, Interval | None]]:
    """{row: {"rouge_l": interval, "kl": interval}} for every finished row in ``order`` (bootstrap over prompts and
    seeds), computed once for the table and the plot."""
    intervals = {}
    for name in order:
        ok = finished(results, name)
        if ok:
            intervals[name] = {metric: bootstrap([ok], metric) for metric in ("rouge_l", "kl")}
    return intervals


@dataclass
class ClaimResult:
    """One claim on this run's records: the paired differences (row - baseline) and what they say."""

    claim: str
    row: str
    baseline: str
    seeds: tuple[int, int]
    """Seeds finished by the row and by the baseline."""
    rouge_l: Interval | None
    kl: Interval | None
    verdict: str


def verdict(claim: str, rouge_l: Interval | None, kl: Interval | None) -> str:
    """What the differences say: a difference counts when its 95% interval excludes 0 and reaches past the margins
    above; "should agree" claims agree when neither counts, the others reproduce when one is better and none worse."""
    verdicts = []
    for diff, better, margin in ((rouge_l, 1, EQUAL_ROUGE_L), (kl, -1, EQUAL_KL)):  # higher Rouge-L, lower KL
        if diff is None:
            continue
        _, low, high = diff
        if (low > 0 or high < 0) and not (-margin <= low and high <= margin):
            verdicts.append("better" if (low > 0) == (better > 0) else "worse")
        else:
            verdicts.append("tie")
    if "should agree" in claim:
        return "agree" if set(verdicts) == {"tie"} else "differ"
    if "worse" not in verdicts and "better" in verdicts:
        return "reproduces"
    if "better" not in verdicts and "worse" in verdicts:
        return "reversed"
    return "cannot tell" if set(verdicts) == {"tie"} else "mixed"


def compare_claims(results: list[dict[str, Any]]) -> list[ClaimResult]:
    """Each claim whose two rows both finished, as paired bootstraps of the Rouge-L and KL differences."""
    compared = []
    for claim, row, baseline in CLAIMS:
        a, b = finished(results, row), finished(results, baseline)
        if not a or not b:
            continue
        rouge = bootstrap([a, b], "rouge_l", sign=(1, -1))
        kl = bootstrap([a, b], "kl", sign=(1, -1))
        compared.append(ClaimResult(claim, row, baseline, (len(a), len(b)), rouge, kl, verdict(claim, rouge, kl)))
    return compared


def on_general_set(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records scored on the general-assistant held-out set, with those scores in place of the first set's (so
    the table and claims code reads them); failed runs are kept."""
    return [
        r | r["heldout_general"] if "heldout_general" in r else r
        for r in results
        if "heldout_general" in r or "error" in r
    ]
