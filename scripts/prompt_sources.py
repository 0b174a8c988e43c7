"""Prompts of everyday assistant use for ``scripts/make_data.py``: training templates and the general held-out set.

Training: instruction templates written for hf_kd (short facts, explanations, lists, rewriting, simple maths, code,
creative and practical writing), expanded over fixed word lists, so the data is deterministic.

General held-out set, from sources that training never draws from: FreshQA's never-changing questions (short facts,
shipped in ``inspect-evals``), OpenAI evals' arithmetic word problems, proofreading sentences and fruit jokes
(``evals``), and prompts written for this held-out set (explanations, lists, code, creative writing, advice).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import random
from pathlib import Path


def package_dir(module: str) -> Path:
    """An installed package's folder, found without importing it (its own dependencies need not be installed)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{module} is not installed; run scripts/setup.sh")
    return Path(list(spec.submodule_search_locations)[0])


def stable_hash(text: str) -> int:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:16], 16)


def by_hash(prompts: list[str], count: int) -> list[str]:
    """``count`` distinct prompts picked by hash: a deterministic sample that does not depend on list order."""
    return sorted(set(prompts), key=stable_hash)[:count]


# ---------------------------------------------------------------------------------------------------- training

_FACTS = {
    "Who wrote {}?": [
        "Pride and Prejudice", "Don Quixote", "War and Peace", "The Odyssey", "Moby-Dick", "Frankenstein",
        "The Little Prince", "Nineteen Eighty-Four", "The Divine Comedy", "Hamlet", "Jane Eyre", "Dracula",
    ],
    "What is the chemical symbol for {}?": [
        "gold", "iron", "sodium", "potassium", "silver", "oxygen", "carbon", "helium", "copper", "lead",
    ],
    "What language is spoken in {}?": [
        "Brazil", "Austria", "Egypt", "Argentina", "Iran", "Quebec", "Kenya", "Vietnam", "Finland", "Portugal",
    ],
    "How many {}?": [
        "legs does a spider have", "days are there in a leap year", "continents are there", "sides does a hexagon "
        "have", "planets are in the solar system", "minutes are in a day", "bones are in the adult human body",
        "players are on a football team", "strings does a violin have", "hours are in a week",
    ],
    "What is the largest {}?": [
        "planet in the solar system", "ocean on Earth", "desert in the world", "country by area", "bird alive today",
        "organ of the human body", "moon of Saturn", "lake in Africa",
    ],
}  # fmt: skip

_EXPLAIN = {
    "How does {} work?": [
        "a refrigerator", "a bicycle's gears", "a solar panel", "a search engine", "a microwave oven", "a thermostat",
        "a GPS receiver", "a credit card", "a camera lens", "an electric motor", "a vaccine", "a password manager",
    ],
    "Why {}?": [
        "do we have seasons", "do cats purr", "does ice float on water", "do onions make people cry",
        "is the ocean salty", "do we dream", "do birds migrate", "does bread go stale", "do we get hiccups",
        "do stars twinkle", "does metal feel colder than wood", "do people yawn",
    ],
    "What is the difference between {}?": [
        "weather and climate", "a virus and a bacterium", "speed and velocity", "a list and a tuple in Python",
        "an alligator and a crocodile", "RAM and storage", "a simile and a metaphor", "baking soda and baking powder",
        "a lake and a pond", "interest and dividends", "HTTP and HTTPS", "a comet and an asteroid",
    ],
    "What does the word '{}' mean?": [
        "ephemeral", "ubiquitous", "pragmatic", "serendipity", "meticulous", "ambiguous", "resilient", "nostalgia",
        "candid", "frugal",
    ],
}  # fmt: skip

_LISTS = {
    "List five {}.": [
        "fruits rich in vitamin C", "animals that live in the ocean", "countries in South America",
        "popular programming languages", "musical instruments", "vegetables that grow underground",
        "board games for families", "renewable sources of energy", "famous painters", "kinds of clouds",
    ],
    "Name three {}.": [
        "primary colors", "planets closer to the Sun than Jupiter", "mammals that can fly or glide", "Greek gods",
        "ways to save energy at home", "sports played with a ball", "things to pack for a beach trip",
        "uses of a paper clip", "healthy breakfast foods", "birds that cannot fly",
    ],
    "Give me a short checklist for {}.": [
        "moving to a new apartment", "a camping trip", "the first day at a new job", "hosting a dinner party",
        "a long car drive", "starting a vegetable garden",
    ],
}  # fmt: skip

_SENTENCES = [
    "hey, can u send me the report by tomorrow?",
    "The meeting was long and nobody knew what the point of it was.",
    "I think that maybe we should probably try to leave a little bit earlier than usual.",
    "our product is good and people like it a lot.",
    "The cat knocked the glass off the table and ran away.",
    "We regret to inform you that your order has been delayed.",
    "It is raining heavily, so the football match has been postponed until next week.",
    "me and my friend goes to the park every sundays.",
    "Thanks for the help yesterday, it really made a difference.",
    "The new library opens on Monday and offers free coding classes for teenagers.",
]
_REWRITES = [
    "Rewrite this sentence to sound more formal: {}",
    "Make this sentence shorter: {}",
    "Fix the grammar and spelling in this sentence: {}",
    "Rewrite this sentence in a friendly tone: {}",
]

_CREATIVE = {
    "Write a haiku about {}.": [
        "the first snow", "a quiet library", "morning coffee", "a thunderstorm", "a lost key", "the ocean at dawn",
        "a busy market", "an old tree",
    ],
    "Write a three-sentence story about {}.": [
        "a robot who learns to paint", "a dragon afraid of fire", "a lost dog finding its way home",
        "a girl who can talk to birds", "a time traveler stuck on a Tuesday", "a lighthouse keeper's last night",
        "a boy who finds a map in a library book", "two strangers sharing an umbrella",
    ],
    "Write a short birthday message for {}.": ["my grandmother", "a coworker", "my best friend", "my brother"],
    "Write a short email {}.": [
        "asking my manager for a day off next Friday", "thanking a teacher for their help this year",
        "inviting neighbours to a garden party", "apologising to a customer for a late delivery",
        "asking a landlord to fix a leaking tap", "reminding a team about tomorrow's meeting",
    ],
    "Write a slogan for {}.": ["a bakery", "a bike repair shop", "a recycling campaign", "a school library"],
}  # fmt: skip

_CODE = {
    "Write a Python function that {}.": [
        "checks whether two strings are anagrams", "returns the second largest number in a list",
        "counts how often each word appears in a text", "converts a binary string to an integer",
        "returns the greatest common divisor of two numbers", "checks whether a year is a leap year",
        "rotates a list by k positions", "returns the longest word in a sentence",
        "finds the missing number in a list from 1 to n", "computes the area of a circle from its radius",
    ],
    "Explain what {} is in Python, with a short example.": [
        "a list comprehension", "a dictionary", "a for loop", "a lambda function", "a class", "an f-string",
        "slicing", "a set",
    ],
}  # fmt: skip

_SNIPPETS = [
    "print(len('hello world'))",
    "x = [1, 2, 3]\nx.append(4)\nprint(sum(x))",
    "print('abc' * 3)",
    "for i in range(3):\n    print(i * i)",
    "d = {'a': 1, 'b': 2}\nprint(list(d.keys()))",
    "print(10 // 3, 10 % 3)",
    "words = ['pear', 'fig', 'apple']\nprint(sorted(words))",
    "print('Python'[::-1])",
]


def _arithmetic(rng: random.Random) -> list[str]:
    """Simple maths with numbers drawn from ``rng``: sums, products, percentages and one-step word problems."""
    names = ["Anna", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hugo"]
    prompts = []
    for name in names:
        a, b, c = rng.randint(3, 40), rng.randint(2, 25), rng.randint(2, 9)
        price, percent = rng.choice([20, 40, 60, 80, 120, 150]), rng.choice([10, 20, 25, 50])
        speed, hours = rng.choice([40, 50, 60, 80, 90]), rng.randint(2, 5)
        prompts += [
            f"What is {a * 7 + b} + {a * 3 + c}?",
            f"What is {a} times {c}?",
            f"What is {percent}% of {price}?",
            f"{name} has {a} marbles and gives {b if b < a else a // 2} of them away. How many are left?",
            f"{name} buys {c} notebooks that cost {b} dollars each. How much does {name} pay in total?",
            f"A shirt costs {price} dollars and is on sale for {percent}% off. What is the sale price?",
            f"A car drives at {speed} km per hour for {hours} hours. How far does it travel?",
            f"{name} reads {c} pages a day. How many pages does {name} read in {b} days?",
        ]
    return prompts


def assistant_templates() -> list[str]:
    """Everyday assistant prompts written for hf_kd (the ``assistant`` source)."""
    prompts: list[str] = []
    for table in (_FACTS, _EXPLAIN, _LISTS, _CREATIVE, _CODE):
        prompts += [template.format(item) for template, items in table.items() for item in items]
    prompts += [template.format(sentence) for template in _REWRITES for sentence in _SENTENCES]
    prompts += [f"What does this Python code print?\n\n```python\n{code}\n```" for code in _SNIPPETS]
    prompts += _arithmetic(random.Random(0))
    return prompts


# ---------------------------------------------------------------------------------------------- general held-out


def freshqa_questions() -> list[str]:
    """FreshQA's never-changing questions without a false premise (Vu et al., 2023; shipped in inspect-evals)."""
    path = package_dir("inspect_evals") / "abstention_bench" / "data" / "freshqa" / "FreshQA_v12182024.csv"
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    header = next(i for i, row in enumerate(rows) if "question" in row and "fact_type" in row)
    records = [dict(zip(rows[header], row)) for row in rows[header + 1 :]]
    return [
        r["question"].strip()
        for r in records
        if r.get("fact_type") == "never-changing" and r.get("false_premise") == "FALSE" and r["question"].strip()
    ]


def _evals_user_turns(name: str) -> list[str]:
    """The last user turn of each sample of one OpenAI evals dataset (``evals/registry/data/<name>``)."""
    turns = []
    for path in sorted((package_dir("evals") / "registry" / "data" / name).glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            sample = json.loads(line)["input"]
            if isinstance(sample, str):
                turns.append(sample.strip())
            else:
                turns.append([t["content"] for t in sample if t["role"] == "user"][-1].strip())
    return turns


def evals_math_problems() -> list[str]:
    """Arithmetic word problems of OpenAI evals, asked without their answer-format system prompts."""
    names = ("math_for_5th-grader", "multistep-word-problems", "algebra_word_problems", "simple_math")
    return [p for name in names for p in _evals_user_turns(name) if len(p) <= 300]


_GERMAN = {"der", "die", "das", "und", "ein", "eine", "von", "zur", "war", "ist", "mit", "nicht", "als"}


def evals_proofreading() -> list[str]:
    """OpenAI evals' English proofreader sentences (spelling and grammar errors) of six words or more, as a request;
    the set's German sentences (non-ASCII letters or German function words) are left out."""
    sentences = [
        s
        for s in _evals_user_turns("proofreader")
        if len(s.split()) >= 6 and s.isascii() and not _GERMAN & set(s.lower().split())
    ]
    return [f"Correct the spelling and grammar in this text: {s}" for s in sentences]


def evals_jokes() -> list[str]:
    """OpenAI evals' model-graded joke prompts, the funny ones ("write a 1-2 funny lines about apple")."""
    return [p for p in _evals_user_turns("test_modelgraded") if p.startswith("write a 1-2 funny lines")]


WRITTEN_FOR_HELDOUT = [
    # explanations
    "Explain in two sentences why the sky looks blue.",
    "What does a compiler do?",
    "Why do we need sleep?",
    "How do airplanes stay in the air?",
    "What causes the tides?",
    "Explain what a budget is to a teenager.",
    "Why do some metals rust?",
    "What is the purpose of a database index?",
    "How does a rainbow form?",
    "Why is exercise good for the heart?",
    "What is an API, in simple words?",
    "Why does the Moon change shape during the month?",
    "What is compound interest?",
    "How do noise-cancelling headphones work?",
    "What happens when you boil water at high altitude?",
    # lists
    "Give three ideas for a rainy-day activity with children.",
    "List four ways to reduce food waste at home.",
    "What are five things to check before buying a used car?",
    "Suggest three vegetarian dinner ideas.",
    "Name four famous bridges.",
    "List three benefits of learning a musical instrument.",
    "What are some good habits for working from home?",
    "Give me five names for a pet goldfish.",
    "List the steps to make a cup of tea.",
    "What should I bring to a job interview?",
    "Name three inventions that changed the world.",
    "Give four tips for writing a clear email.",
    # code
    "Write a Python function that returns the sum of the even numbers in a list.",
    "How do I read a text file line by line in Python?",
    "Write a JavaScript function that reverses an array.",
    "What is the difference between a compiler error and a runtime error?",
    "Write a SQL query that selects all users older than 30 from a table called users.",
    "How do I remove the whitespace at the start and end of a string in Python?",
    "Write a Python function that checks whether a string contains only digits.",
    "What does the git commit command do?",
    "Write a bash command that counts the lines in a file.",
    "Explain what recursion is with a small example.",
    # creative writing
    "Write a four-line poem about a sleepy cat.",
    "Write a short story opening about a door that appears in a forest.",
    "Describe a sunset over the mountains in three sentences.",
    "Write a limerick about a clumsy penguin.",
    "Invent a name and a one-sentence description for a new ice cream flavour.",
    "Write a thank-you note to a friend who helped me move.",
    "Write a short dialogue between a tree and the wind.",
    "Write two sentences that describe the smell of fresh bread.",
    "Write a riddle whose answer is a shadow.",
    "Write a short motivational message for someone starting a new job.",
    # practical advice and everyday questions
    "How can I stop procrastinating?",
    "What is a good way to start learning to draw?",
    "How long should I boil an egg for a soft yolk?",
    "What should I do if I feel stressed before an exam?",
    "How can I make my small room feel bigger?",
    "How do I politely decline an invitation?",
    "Is it better to study in the morning or at night?",
    "What is a healthy snack I can take to work?",
]


def general_heldout_prompts() -> dict[str, list[str]]:
    """The general held-out prompts by source: 30 FreshQA questions, 20 word problems, 15 proofreading requests
    and the 5 jokes of the evals package, and the prompts written for this set."""
    return {
        "freshqa": by_hash(freshqa_questions(), 30),
        "evals_math": by_hash(evals_math_problems(), 20),
        "evals_proofreader": by_hash(evals_proofreading(), 15),
        "evals_jokes": evals_jokes(),
        "written": list(WRITTEN_FOR_HELDOUT),
    }
