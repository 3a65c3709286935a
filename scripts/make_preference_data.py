"""Generate the shipped synthetic preference set ``posttrain/data/preferences/{train,test}.jsonl``.

Deterministic (seeded); rerun with ``python scripts/make_preference_data.py [OUT_DIR]`` and the
files come out byte for byte the same. Rows are in HelpSteer3's shape (``context``,
``response1``, ``response2``, ``overall_preference``, ``individual_preference``) plus the
per-response ``helpfulness_1``/``helpfulness_2`` the GenRM is also trained to give.

Every pair differs by a property a program can check (a correct vs a wrong sum, an instruction
followed or not, an answer vs a refusal...), and its labels follow one rubric (README.md), the
judge prompt's own scale (``posttrain.genrm.judge_format``): helpfulness 5 = correct, complete,
follows every instruction, polite; 4 = correct and compliant but less complete; 3 = right content
that breaks an explicit format instruction, or is rude; 2 = the requested JSON is invalid or not
JSON but carries the right facts (usable in a small way); 1 = wrong final answer, refusal of a
harmless request, off-topic, or no answer. The preference magnitude is the score gap
(1 -> slightly better, 2 -> better, >= 3 -> much better); its sign says which side is better.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

Row = dict[str, Any]
Draft = tuple[list[dict[str, str]], str, str, int, int, str]  # context, better, worse, s_better, s_worse, reason

FACTS = [  # (question, answer sentence)
    ("What color is the sky on a clear day?", "The sky is blue on a clear day."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth."),
    ("At what temperature does water freeze in Celsius?", "Water freezes at 0 degrees Celsius."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What gas do plants take in from the air?", "Plants take in carbon dioxide from the air."),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun."),
    ("How many continents are there?", "There are seven continents."),
    ("What is the boiling point of water at sea level in Celsius?", "Water boils at 100 degrees Celsius at sea level."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("How many minutes are in an hour?", "There are sixty minutes in an hour."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("Which animal is known as the king of the jungle?", "The lion is known as the king of the jungle."),
    ("What do bees make?", "Bees make honey."),
    ("How many sides does a triangle have?", "A triangle has three sides."),
    ("What is frozen water called?", "Frozen water is called ice."),
    ("Which organ pumps blood through the body?", "The heart pumps blood through the body."),
    ("How many hours are in a day?", "There are twenty-four hours in a day."),
    ("What is the tallest mountain in the world?", "Mount Everest is the tallest mountain in the world."),
    ("Which season comes after winter?", "Spring comes after winter."),
]
ONE_WORD = [  # (question, answer, a wrong answer)
    ("What is the capital of France?", "Paris", "Lyon"), ("What is the capital of Japan?", "Tokyo", "Kyoto"),
    ("What is the opposite of hot?", "Cold", "Warm"), ("Which planet do we live on?", "Earth", "Mars"),
    ("What color are ripe bananas?", "Yellow", "Purple"), ("What is the capital of Spain?", "Madrid", "Seville"),
    ("What is the opposite of up?", "Down", "Left"), ("Which animal says moo?", "Cow", "Sheep"),
    ("What is the capital of Germany?", "Berlin", "Munich"), ("What do we call a baby cat?", "Kitten", "Puppy"),
    ("Which metal is liquid at room temperature?", "Mercury", "Iron"),
    ("What is the largest planet in our solar system?", "Jupiter", "Saturn"),
    ("What is the capital of Canada?", "Ottawa", "Toronto"), ("What color is grass?", "Green", "Blue"),
    ("Which month comes after June?", "July", "August"), ("What is the opposite of day?", "Night", "Noon"),
]
HOW_TO = [  # (question, full answer, shorter but correct answer)
    ("How do I boil an egg?", ("Place the egg in a pot of cold water, bring it to a boil, then simmer for 9 to 12 "
     "minutes for a hard-boiled egg. Cool it in cold water before peeling."), "Boil it in water for about 10 minutes."),
    ("How can I fall asleep faster?", ("Keep a regular bedtime, avoid screens and caffeine in the evening, keep your "
     "room dark and cool, and try slow, deep breathing once you lie down."), "Avoid screens before bed."),
    ("How do I water a cactus?", ("Water it deeply only when the soil is completely dry, usually every two to three "
     "weeks, and use a pot with a drainage hole so the roots never sit in water."), "Water it when the soil is dry."),
    ("How can I save money on groceries?", ("Plan meals for the week, shop with a list, compare unit prices, buy "
     "store brands, and avoid shopping when you are hungry."), "Shop with a list."),
    ("How do I make a cup of tea?", ("Boil fresh water, pour it over a tea bag in a cup, let it steep for three to "
     "five minutes, remove the bag, and add milk or sugar if you like."), "Put a tea bag in hot water."),
    ("How do I remember new words in a language?", ("Review them in short daily sessions with flashcards, use each "
     "word in your own sentences, and revisit them after growing gaps of time."), "Use flashcards."),
    ("How do I clean a cast iron pan?", ("Rinse it with hot water while it is warm, scrub with a brush or coarse "
     "salt, dry it fully on the stove, and rub in a thin layer of oil."), "Rinse it and dry it well."),
    ("How can I stay focused while studying?", ("Put your phone in another room, work in 25-minute blocks with "
     "short breaks, and set one clear goal for each session."), "Put your phone away."),
    ("How do I tie a basic knot in a shoelace?", ("Cross the laces, tuck one under and pull tight, make a loop "
     "with each lace, cross the loops, push one through the gap, and pull both loops tight."),
     "Make two loops and tie them together."),
    ("How do I keep cut flowers fresh longer?", ("Trim the stems at an angle, remove leaves below the water line, "
     "change the water every two days, and keep the vase away from direct sun."), "Change the water often."),
    ("How do I start running as a beginner?", ("Start with walk-run intervals three times a week, for example one "
     "minute running and two minutes walking, and add a little running time each week."), "Run a little every week."),
    ("How can I reduce stress after work?", ("Take a short walk, do something you enjoy, limit work messages in the "
     "evening, and spend a few minutes breathing slowly."), "Take a short walk."),
    ("How do I defrost chicken safely?", ("Thaw it in the fridge overnight, or in cold water changed every 30 "
     "minutes. Never leave it out on the counter at room temperature."), "Thaw it in the fridge."),
    ("How do I write a good email subject line?", ("Keep it short, say what the email is about, and put the key "
     "request or deadline first, like 'Report due Friday: please review'."), "Keep it short and clear."),
]
REFUSALS = ["I'm sorry, but I can't help with that.", "I cannot assist with this request.",
            "As an AI, I am unable to answer that question.", "Sorry, that is not something I can discuss.",
            "I won't be able to help you with this one.", "Unfortunately, I can't provide that information."]
NON_ANSWERS = ["I don't know.", "Maybe.", "Good question!", "Hmm, hard to say.", "It depends.", "Not sure, sorry."]
RUDE = [("Ugh, obviously. {a}", "Everyone knows that."), ("Seriously? {a}", "Try using your brain next time."),
        ("That's a silly question. {a}", "Look it up yourself next time."), ("Fine. {a}", "Don't waste my time.")]
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jo", "Kofi", "Lena", "Mateo", "Nia"]
CITIES = ["Lisbon", "Nairobi", "Oslo", "Lima", "Hanoi", "Denver", "Porto", "Accra", "Quito", "Perth"]
THINGS = {"fruits": ["apple", "banana", "cherry", "mango", "pear", "grape", "plum"],
          "colors": ["red", "blue", "green", "yellow", "purple", "orange", "black"],
          "animals": ["dog", "cat", "horse", "rabbit", "owl", "whale", "tiger"],
          "vegetables": ["carrot", "potato", "onion", "pepper", "spinach", "leek", "pea"],
          "sports": ["soccer", "tennis", "swimming", "cycling", "rowing", "hockey", "golf"]}
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "x": lambda a, b: a * b}


def arithmetic(rng: random.Random) -> Draft:
    op = rng.choice("+-x")
    a, b = (rng.randint(3, 19), rng.randint(2, 9)) if op == "x" else (rng.randint(12, 99), rng.randint(11, 89))
    a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)
    c = OPS[op](a, b)
    wrong = c + rng.choice([-10, -2, -1, 1, 2, 10])
    q = rng.choice(["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "How much is {a} {op} {b}?"])
    t = rng.choice(["{a} {op} {b} = {c}.", "The answer is {c}.", "{a} {op} {b} is {c}."])
    return ([_user(q.format(a=a, op=op, b=b))], t.format(a=a, op=op, b=b, c=c), t.format(a=a, op=op, b=b, c=wrong),
            5, 1, f"its answer {c} is correct, while the other says {wrong}")


def uppercase(rng: random.Random) -> Draft:
    q, a = rng.choice(FACTS)
    prompt = rng.choice(["Answer in uppercase letters only: {q}", "{q} Reply using only capital letters.",
                         "Write your answer in ALL CAPS: {q}", "{q} Use only uppercase letters in your reply."])
    return ([_user(prompt.format(q=q))], a.upper(), a, 5, 3, "it is all in capital letters as asked; the other is not")


def bullets(rng: random.Random) -> Draft:
    kind = rng.choice(sorted(THINGS))
    n = rng.randint(2, 5)
    items = rng.sample(THINGS[kind], n + 1)
    good = "\n".join(f"- {x.capitalize()}" for x in items[:n])
    if rng.random() < 0.5:
        bad, why = "\n".join(f"- {x.capitalize()}" for x in items[: n + rng.choice([-1, 1])]), "the wrong number of"
    else:
        bad, why = ", ".join(items[:n]).capitalize() + ".", "no"
    prompt = rng.choice(["List {n} {k} as bullet points.", "Give me exactly {n} {k}, one bullet point each."])
    return ([_user(prompt.format(n=n, k=kind))], good, bad, 5, 3,
            f"it gives exactly {n} bullet points; the other has {why} bullet points")


def one_word(rng: random.Random) -> Draft:
    q, a, wrong = rng.choice(ONE_WORD)
    prompt = rng.choice(["Answer with one word only: {q}", "{q} Reply with a single word.",
                         "In one word: {q}", "{q} Answer in exactly one word."]).format(q=q)
    if rng.random() < 0.5:
        return ([_user(prompt)], a, f"{a}. That is the answer to your question, as most people know.", 5, 3,
                "it answers in one word as asked; the other uses a whole sentence")
    return [_user(prompt)], a, wrong, 5, 1, f"its answer {a} is correct; {wrong} is wrong"


def json_object(rng: random.Random) -> Draft:
    name, age = rng.choice(NAMES), rng.randint(18, 80)
    prompt = rng.choice(['Reply with only a JSON object with keys "name" and "age" for {n}, who is {a}.',
                         'Give a JSON object with the keys "name" and "age" describing {n}, aged {a}.'])
    good = json.dumps({"name": name, "age": age})
    bad, score, why = rng.choice([(f"{name} is {age} years old.", 2, "the other is not JSON"),
                                  (f"{{name: {name}, age: {age}}}", 2, "the other is invalid JSON"),
                                  (json.dumps({"name": name, "age": age + rng.choice([-1, 1])}), 1,
                                   "the other has the wrong age")])
    return [_user(prompt.format(n=name, a=age))], good, bad, 5, score, f"it is valid JSON with the right values; {why}"


def refusal(rng: random.Random) -> Draft:
    q, full, _ = rng.choice(HOW_TO)
    return [_user(q)], full, rng.choice(REFUSALS), 5, 1, "it answers a harmless question the other refuses"


def off_topic(rng: random.Random) -> Draft:
    (q, full, _), (_, other, _) = rng.sample(HOW_TO, 2)
    return [_user(q)], full, other, 5, 1, "it answers the question; the other is about something else"


def non_answer(rng: random.Random) -> Draft:
    q, a = rng.choice(FACTS) if rng.random() < 0.5 else rng.choice(HOW_TO)[:2]
    return [_user(q)], a, rng.choice(NON_ANSWERS), 5, 1, "it answers; the other gives no answer"


def rude(rng: random.Random) -> Draft:
    q, a = rng.choice(FACTS)
    head, tail = rng.choice(RUDE)
    return [_user(q)], a, f"{head.format(a=a)} {tail}", 5, 3, "both are correct but the other is rude"


def near_tie(rng: random.Random) -> Draft:
    if rng.random() < 0.5:
        q, full, short = rng.choice(HOW_TO)
        return [_user(q)], full, short, 5, 4, "both are correct but it is more complete"
    a, b = rng.randint(12, 99), rng.randint(11, 89)
    tens, ones = b // 10 * 10, b % 10
    shown = f"{a} + {b} = {a + b}: first {a} + {tens} = {a + tens}, then {a + tens} + {ones} = {a + b}."
    return ([_user(f"What is {a} + {b}? Show your steps.")], shown, f"{a} + {b} = {a + b}.", 5, 4,
            "both are correct but it shows the steps as asked")


def multi_turn(rng: random.Random) -> Draft:
    name, city = rng.choice(NAMES), rng.choice(CITIES)
    context = [_user(f"Hi, my name is {name} and I live in {city}."),
               {"role": "assistant", "content": f"Nice to meet you, {name}! How can I help you today?"}]
    if rng.random() < 0.5:
        other = rng.choice([n for n in NAMES if n != name])
        return (context + [_user("What is my name?")], f"Your name is {name}.", f"Your name is {other}.", 5, 1,
                "it remembers the name the user gave")
    other = rng.choice([c for c in CITIES if c != city])
    return (context + [_user("Which city do I live in?")], f"You live in {city}.", f"You live in {other}.", 5, 1,
            "it remembers the city the user gave")


CATEGORIES: dict[str, tuple[float, Callable[[random.Random], Draft]]] = {
    "arithmetic": (0.18, arithmetic), "uppercase": (0.08, uppercase), "bullets": (0.08, bullets),
    "one_word": (0.08, one_word), "json": (0.08, json_object), "refusal": (0.08, refusal),
    "off_topic": (0.08, off_topic), "non_answer": (0.06, non_answer), "rude": (0.08, rude),
    "near_tie": (0.12, near_tie), "multi_turn": (0.08, multi_turn),
}
DEGREE = {1: "slightly better", 2: "better", 3: "much better"}


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def to_row(row_id: str, category: str, draft: Draft, better_first: bool) -> Row:
    context, better, worse, s_better, s_worse, reason = draft
    magnitude = min(3, s_better - s_worse)
    b, w = (1, 2) if better_first else (2, 1)
    preference = -magnitude if better_first else magnitude
    return {"id": row_id, "domain": "general", "language": "english", "category": category, "context": context,
            "response1": better if better_first else worse, "response2": worse if better_first else better,
            "overall_preference": preference,
            "individual_preference": [{"score": preference, "reasoning":
                                       f"@Response {b} is {DEGREE[magnitude]} than @Response {w} because {reason}."}],
            "helpfulness_1": s_better if better_first else s_worse,
            "helpfulness_2": s_worse if better_first else s_better}


def generate(split: str, n: int, seed: int, seen: set[str]) -> list[Row]:
    """``n`` rows: categories in fixed shares, better response first in exactly half of each."""
    rng = random.Random(f"preferences/{split}/{seed}")
    counts = {c: round(share * n) for c, (share, _) in CATEGORIES.items()}
    counts["arithmetic"] += n - sum(counts.values())
    rows: list[Row] = []
    for category, count in counts.items():
        make = CATEGORIES[category][1]
        order = [i % 2 == 0 for i in range(count)]
        rng.shuffle(order)
        for better_first in order:
            for _ in range(1000):  # draw until the pair is new (in this and earlier splits)
                draft = make(rng)
                key = json.dumps([draft[0], sorted(draft[1:3])])
                if key not in seen:
                    break
            else:
                raise RuntimeError(f"{category}: ran out of distinct pairs; widen its word lists")
            seen.add(key)
            rows.append(to_row("", category, draft, better_first))
    rng.shuffle(rows)
    for i, row in enumerate(rows):
        row["id"] = f"{split}-{i:04d}"
    return rows


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else Path(__file__).resolve().parents[1] / "posttrain/data/preferences")
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    for split, n, seed in (("train", 600, 0), ("test", 200, 1)):
        rows = generate(split, n, seed, seen)
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"wrote {len(rows)} rows to {out / f'{split}.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
