"""A small HumanEval-shaped set written for these tests: problems plus right and wrong completions."""

from __future__ import annotations

PROBLEMS = [
    {
        "task_id": "Mini/0",
        "prompt": "from typing import List\n\n\ndef running_max(xs: List[int]) -> List[int]:\n"
                  "    \"\"\"Running maximum of a list.\"\"\"\n",
        "entry_point": "running_max",
        "test": "METADATA = {}\n\n\ndef check(candidate):\n    assert candidate([]) == []\n"
                "    assert candidate([1, 3, 2]) == [1, 3, 3]\n    assert candidate([-5, -7]) == [-5, -5]\n",
    },
    {
        "task_id": "Mini/1",
        "prompt": "def encode_shift(s: str) -> str:\n"
                  "    return ''.join(chr((ord(c) - 97 + 5) % 26 + 97) for c in s)\n\n\n"
                  "def decode_shift(s: str) -> str:\n    \"\"\"Inverse of encode_shift.\"\"\"\n",
        "entry_point": "decode_shift",
        "test": "import random\n\n\ndef check(candidate):\n"
                "    rng = random.Random(0)\n    for _ in range(20):\n"
                "        s = ''.join(rng.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(rng.randint(1, 12)))\n"
                "        assert candidate(encode_shift(s)) == s\n",
    },
    {
        "task_id": "Mini/2",
        "prompt": "def min_max(xs):\n    \"\"\"(min, max) of a non-empty list as a tuple.\"\"\"\n",
        "entry_point": "min_max",
        "test": "def check(candidate):\n    assert candidate([3, 1, 2]) == (1, 3)\n"
                "    assert candidate([7]) == (7, 7)\n"
                "    assert abs(candidate([0.5, 0.25])[0] - 0.25) < 1e-9\n",
    },
    {
        "task_id": "Mini/3",
        "prompt": "def safe_div(a, b):\n    \"\"\"a / b; raise ZeroDivisionError when b == 0.\"\"\"\n",
        "entry_point": "safe_div",
        "test": "def check(candidate):\n    assert candidate(6, 3) == 2\n    try:\n        candidate(1, 0)\n"
                "    except Exception:\n        pass\n    else:\n        assert False, 'no error raised'\n",
    },
]

# (task_id, completion, passes under the reference harness)
COMPLETIONS = [
    ("Mini/0", "    out, best = [], None\n    for x in xs:\n        best = x if best is None else max(best, x)\n"
               "        out.append(best)\n    return out\n", True),
    ("Mini/0", "    return sorted(xs)\n", False),
    ("Mini/0", "    return [max(xs[: i + 1]) for i in range(len(xs))]\n", True),
    ("Mini/0", "    return xs[\n", False),  # syntax error
    ("Mini/1", "    return ''.join(chr((ord(c) - 97 - 5) % 26 + 97) for c in s)\n", True),
    ("Mini/1", "    return encode_shift(s)\n", False),  # the helper runs in the sandbox too (prompt + completion)
    ("Mini/1", "    return s\n", False),
    ("Mini/2", "    return (min(xs), max(xs))\n", True),
    ("Mini/2", "    return [min(xs), max(xs)]\n", False),  # a list is not the tuple the test compares with
    ("Mini/2", "    while True:\n        pass\n", False),
    ("Mini/3", "    return a / b\n", True),
    ("Mini/3", "    return a / b if b else 0\n", False),
    ("Mini/3", "    return 1 / 0\n", False),
]
