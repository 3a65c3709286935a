"""Return values crossing the sandbox boundary: hostile replies cost bounded work, honest values
are scored as OpenAI's reference human-eval harness scores them (plain Python ``==``)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from posttrain.verifiers import _runner, values
from posttrain.verifiers.code import INFRA, WRONG, check_function, decode_value
from posttrain.verifiers.sandbox import Limits

LIMITS = Limits(wall_s=5)
P = 2**61 - 1  # hash(i * P) == 0 for every int i: the modulus of Python's numeric hash
BOUND_S = 30.0  # generous: the unbounded decoder takes minutes on these replies
N = 200_000  # colliding values in one reply (~5 MB: under the 8 MiB reply cap)


def _wire(value: object) -> object:
    """As the trusted side receives a reply's value: through JSON."""
    return json.loads(json.dumps(value))


def _colliding(n: int = N) -> list[int]:
    return [i * P for i in range(n)]


# Forged replies (the candidate writes its own reply bytes; here: it swaps the runner's encoder),
# made when their test runs: each is a few hundred thousand values.
HOSTILE_WIRE: dict[str, Callable[[], object]] = {
    "set_of_ints": lambda: {"$set": _colliding()},
    "set_of_negative_ints": lambda: {"$set": [-i * P - 1 for i in range(N)]},  # hash -1 is -2, as is -2's
    "dict_int_keys": lambda: {"$dict": [[k, 0] for k in _colliding()]},
    "set_of_tuples": lambda: {"$set": [{"$tuple": [k, 1]} for k in _colliding()]},
    "set_of_frozensets": lambda: {"$set": [{"$frozenset": [k]} for k in _colliding()]},
    "frozenset_in_list": lambda: [{"$frozenset": _colliding()}],
    "set_of_big_ints": lambda: {"$set": [{"$int": format(k * P, "x")} for k in range(1, N // 4)]},
    "list_for_set_in_test": lambda: _colliding(),  # the test itself may build set(candidate())
    "tuple_for_set_in_test": lambda: {"$tuple": _colliding()},
    "counter_keys": lambda: {"$counter": [[k, 1] for k in _colliding()]},
    "namedtuple_values": lambda: {"$namedtuple": ["P", ["x"], [{"$frozenset": _colliding()}]]},
    # hash(complex(re, im)) == hash(re) + 1000003 * hash(im)
    "complex_in_set": lambda: {"$set": [{"$complex": [1000003.0 * (N - j), float(j)]} for j in range(N)]},
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(HOSTILE_WIRE))
def test_colliding_hashes_are_refused_with_bounded_work(name):
    wire = _wire(HOSTILE_WIRE[name]())
    start = time.monotonic()
    with pytest.raises(ValueError, match="malformed"):
        decode_value(wire)
    assert time.monotonic() - start < BOUND_S


def test_honest_values_that_share_hashes_still_decode():
    assert decode_value(_wire([-1, -2] * 5000)) == [-1, -2] * 5000  # hash(-1) == hash(-2)
    assert decode_value(_wire({"$set": [-1, -2, 0, P]})) == {-1, -2, 0, P}
    assert decode_value(_wire(_runner.encode(set(range(100_000))))) == set(range(100_000))
    same = [(i % 3) * P for i in range(10_000)]  # many copies of 3 distinct values, all hash 0
    assert decode_value(_wire(same)) == same


def _nested(depth: int) -> object:
    value: object = 0
    for _ in range(depth):
        value = [value]
    return value


def test_nesting_is_capped_like_the_encoder():
    assert decode_value(_wire(_runner.encode(_nested(values.MAX_DEPTH)))) == _nested(values.MAX_DEPTH)
    with pytest.raises(ValueError):
        _runner.encode(_nested(values.MAX_DEPTH + 1))
    for wire in (_nested(values.MAX_DEPTH + 1), _nested(900)):
        with pytest.raises(ValueError, match="deeper"):
            decode_value(_wire(wire))
    deep_dict: object = 0
    for _ in range(values.MAX_DEPTH + 1):
        deep_dict = {"$dict": [["k", deep_dict]]}
    with pytest.raises(ValueError, match="deeper"):
        decode_value(_wire(deep_dict))


def test_element_count_is_capped(monkeypatch):
    monkeypatch.setattr(values, "MAX_ITEMS", 1000)
    assert len(decode_value([0] * 999)) == 999
    with pytest.raises(ValueError, match="values"):
        decode_value([0] * 1000)
    with pytest.raises(ValueError, match="values"):
        decode_value([[0] * 600, {"$tuple": [1] * 600}])


def test_numbers_are_size_capped_and_parsed_in_linear_time():
    big = 7**200_000  # ~560k bits: far over the 4300 decimal digits int(str) accepts
    assert decode_value(_wire(_runner.encode(big))) == big
    assert decode_value(_wire(_runner.encode(-big))) == -big
    too_big = {"$int": "f" * (values.MAX_INT_BITS // 4 + 1)}
    for bad in (too_big, {"$int": "12g"}, {"$int": " 12"}, {"$int": "0x12"}, {"$int": ""}, {"$int": 12},
                {"$float": "1.5"}, {"$fraction": [1, 0]}, {"$fraction": [{"$int": "f" * 20_000}, 3]},
                {"$decimal": "1" * (values.MAX_DECIMAL_CHARS + 1)}, {"$decimal": "one"},
                {"$complex": ["1", 2.0]}, {"$bytes": "zz"}, {"$defaultdict": ["os.system", []]}):
        with pytest.raises(ValueError, match="malformed"):
            decode_value(_wire(bad))


def test_namedtuple_classes_made_per_reply_are_capped():
    many = [{"$namedtuple": [f"T{i}", ["a"], [i]]} for i in range(values.MAX_NAMEDTUPLE_TYPES + 1)]
    with pytest.raises(ValueError, match="namedtuple"):
        decode_value(_wire(many))
    same = [{"$namedtuple": ["T", ["a"], [i]]} for i in range(1000)]
    assert decode_value(_wire(same)) == [(i,) for i in range(1000)]
    for odd in (["_x", "y"], ["class", "y"], ["x", "x"], ["\ufb01", "fi"]):  # the last two: equal once normalised
        back = decode_value(_wire({"$namedtuple": ["T", odd, [1, 2]]}))  # no class made: a plain tuple
        assert back == (1, 2) and type(back) is tuple
    wide = [f"f{i}" for i in range(values.MAX_NAMEDTUPLE_FIELDS + 1)]
    assert type(decode_value(_wire({"$namedtuple": ["T", wide, list(range(len(wide)))]}))) is tuple


def test_decoded_values_are_standard_types_only():
    import collections
    import decimal
    import fractions

    allowed = {type(None), bool, int, float, complex, str, bytes, bytearray, list, tuple, set, frozenset, dict,
               fractions.Fraction, decimal.Decimal, collections.OrderedDict, collections.Counter,
               collections.defaultdict}

    class Hostile(int):
        def __eq__(self, other):
            return True

        __hash__ = int.__hash__

    value = [Hostile(3), collections.Counter("ab"), collections.OrderedDict(a=1), b"x", 2**9000,
             collections.namedtuple("Pt", "x y")(1, 2), collections.defaultdict(list, a=[1]),
             fractions.Fraction(1, 3), decimal.Decimal("0.1"), 1j, frozenset({(1, 2)})]
    back = decode_value(_wire(_runner.encode(value)))
    assert back == value

    def types(v):
        yield type(v)
        if isinstance(v, (list, tuple, set, frozenset)):
            for x in v:
                yield from types(x)
        if isinstance(v, dict):
            for k, x in v.items():
                yield from types(k)
                yield from types(x)

    seen = set(types(back))
    made_here = {t for t in seen if t not in allowed}
    assert all(issubclass(t, tuple) and t.__eq__ is tuple.__eq__ and t.__module__ == values.__name__
               for t in made_here), made_here  # only the namedtuple classes the decoder made
    assert back[0] == 3 and back[0] != 4 and type(back[0]) is int


# --- end to end: a hostile program forges its reply ------------------------------------------

FORGE = "import __main__\n__main__.encode = lambda value, depth=0: {wire}\ndef f():\n    return 0\n"
HOSTILE_PROGRAMS = {
    "set_of_ints": "{{'$set': [i * (2**61 - 1) for i in range({n})]}}",
    "dict_int_keys": "{{'$dict': [[i * (2**61 - 1), 0] for i in range({n})]}}",
    "set_of_tuples": "{{'$set': [{{'$tuple': [i * (2**61 - 1)]}} for i in range({n})]}}",
    "list_for_set_in_test": "[i * (2**61 - 1) for i in range({n})]",
    "deep_nesting": "eval('[' * 900 + ']' * 900)",
    "many_values": "[0] * 4_000_000",
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(HOSTILE_PROGRAMS))
def test_hostile_reply_gets_a_non_pass_verdict_with_bounded_work(name):
    program = FORGE.format(wire=HOSTILE_PROGRAMS[name].format(n=N))
    start = time.monotonic()
    result = check_function(program, "f", "assert set(f()) == {1}\n", limits=LIMITS)
    assert time.monotonic() - start < BOUND_S, result
    assert not result.passed and result.kind != INFRA, result
    follow_up = check_function("def f():\n    return [1]\n", "f", "assert set(f()) == {1}\n", limits=LIMITS)
    assert follow_up.passed, follow_up


# --- honest answers: same verdict as the reference harness -----------------------------------

def _check(*lines: str, imports: str = "") -> str:
    return imports + "def check(candidate):\n" + "".join(f"    {line}\n" for line in lines)


def _expects(exception: str) -> str:
    return _check("try:", "    candidate()", f"except {exception}:", "    pass", "else:", "    assert False")


COUNTING = ("import collections\ndef f(s):\n    d = collections.defaultdict(int)\n    for c in s:\n        d[c] += 1\n"
            "    return d\n")
POINT = "import collections\nPt = collections.namedtuple('Pt', 'x y')\ndef f():\n    return Pt(1, 2)\n"
# (name, program defining f, HumanEval-style test, verdict of the reference harness)
AGREE: list[tuple[str, str, str, bool]] = [
    ("big_int", "def f():\n    return 2**20000\n", _check("assert candidate() == 2**20000"), True),
    ("big_int_wrong", "def f():\n    return 2**20000 + 1\n", _check("assert candidate() == 2**20000"), False),
    ("negative_big_int", "def f(n):\n    return -(3**n)\n", _check("assert candidate(9000) == -(3**9000)"), True),
    ("big_int_str_in_test", "def f():\n    return 10**5000\n", _check("assert str(candidate()) == '1' + '0' * 5000"),
     False),  # str() of over 4300 digits raises on both sides
    ("bytes", "def f(s):\n    return s.encode()\n", _check("assert candidate('héllo') == b'h\\xc3\\xa9llo'"), True),
    ("bytes_wrong", "def f():\n    return b'hello'\n", _check("assert candidate() == b'hellO'"), False),
    ("bytes_is_not_str", "def f():\n    return b'abc'\n", _check("assert candidate() == 'abc'"), False),
    ("bytearray_equals_bytes", "def f():\n    return bytearray(b'ab')\n", _check("assert candidate() == b'ab'"), True),
    ("complex", "def f():\n    return complex(1, -2)\n", _check("assert candidate() == 1 - 2j"), True),
    ("complex_wrong", "def f():\n    return complex(1, 2)\n", _check("assert candidate() == 1 - 2j"), False),
    ("counter", "import collections\ndef f(s):\n    return collections.Counter(s)\n",
     _check("assert candidate('aab') == {'a': 2, 'b': 1}"), True),
    ("counter_zero_counts", "import collections\ndef f():\n    return collections.Counter(a=1, b=0)\n",
     _check("assert candidate() == collections.Counter(a=1)", imports="import collections\n"), True),
    ("counter_vs_dict", "import collections\ndef f():\n    return collections.Counter(a=1, b=0)\n",
     _check("assert candidate() == {'a': 1}"), False),
    ("counter_missing_key", "import collections\ndef f():\n    return collections.Counter('ab')\n",
     _check("assert candidate()['z'] == 0"), True),
    ("defaultdict", COUNTING, _check("d = candidate('aab')", "assert d == {'a': 2, 'b': 1}", "assert d['z'] == 0"),
     True),
    ("defaultdict_wrong", COUNTING, _check("assert candidate('aab') == {'a': 2, 'b': 2}"), False),
    ("ordereddict_vs_dict", "import collections\ndef f():\n    return collections.OrderedDict([('b', 2), ('a', 1)])\n",
     _check("assert candidate() == {'a': 1, 'b': 2}"), True),
    ("ordereddict_order_matters",
     "import collections\ndef f():\n    return collections.OrderedDict([('b', 2), ('a', 1)])\n",
     _check("assert candidate() == collections.OrderedDict(a=1, b=2)", imports="import collections\n"), False),
    ("namedtuple", POINT, _check("p = candidate()", "assert p == (1, 2) and p.x == 1 and p.y == 2"), True),
    ("namedtuple_wrong", POINT, _check("assert candidate() == (2, 1)"), False),
    ("typing_namedtuple", "from typing import NamedTuple\nclass Pt(NamedTuple):\n    x: int\n    y: str\n"
     "def f():\n    return Pt(1, 'a')\n", _check("assert candidate().y == 'a' and candidate() == (1, 'a')"), True),
    ("int_enum", "import enum\nclass C(enum.IntEnum):\n    RED = 1\ndef f():\n    return C.RED\n",
     _check("assert candidate() == 1"), True),
    ("int_enum_wrong", "import enum\nclass C(enum.IntEnum):\n    RED = 1\ndef f():\n    return C.RED\n",
     _check("assert candidate() == 2"), False),
    ("str_enum", "import enum\nclass C(str, enum.Enum):\n    RED = 'red'\ndef f():\n    return C.RED\n",
     _check("assert candidate() == 'red'"), True),
    ("fraction", "from fractions import Fraction\ndef f():\n    return Fraction(1, 3)\n",
     _check("assert candidate() == Fraction(2, 6)", imports="from fractions import Fraction\n"), True),
    ("fraction_is_not_float", "from fractions import Fraction\ndef f():\n    return Fraction(1, 3)\n",
     _check("assert candidate() == 1 / 3"), False),
    ("decimal", "from decimal import Decimal\ndef f():\n    return Decimal('0.10')\n",
     _check("assert candidate() == Decimal('0.1')", imports="from decimal import Decimal\n"), True),
    ("decimal_is_not_float", "from decimal import Decimal\ndef f():\n    return Decimal('0.1')\n",
     _check("assert candidate() == 0.1"), False),
    ("set_of_frozensets", "def f():\n    return {frozenset({1, 2}), frozenset()}\n",
     _check("assert candidate() == {frozenset({2, 1}), frozenset()}"), True),
    ("dict_subclass", "class D(dict):\n    pass\ndef f():\n    return D(a=1)\n",
     _check("assert candidate() == {'a': 1}"), True),
    ("list_subclass", "class L(list):\n    pass\ndef f():\n    return L([1, 2])\n",
     _check("assert candidate() == [1, 2]"), True),
    ("float_subclass", "class F(float):\n    pass\ndef f():\n    return F(0.5)\n", _check("assert candidate() == 0.5"),
     True),
    ("str_subclass", "class S(str):\n    pass\ndef f():\n    return S('ab')\n", _check("assert candidate() == 'ab'"),
     True),
    ("nan_is_never_equal", "def f():\n    return float('nan')\n", _check("assert candidate() == float('nan')"), False),
    ("negative_zero", "def f():\n    return -0.0\n", _check("assert str(candidate()) == '-0.0'"), True),
    ("int_equals_float", "def f():\n    return 2\n", _check("assert candidate() == 2.0"), True),
    ("bool_equals_int", "def f():\n    return True\n", _check("assert candidate() == 1"), True),
    ("tuple_is_not_list", "def f():\n    return (1, 2)\n", _check("assert candidate() == [1, 2]"), False),
    ("hash_sharing_ints_in_set", "def f():\n    return [-1, -2] * 50\n", _check("assert set(candidate()) == {-1, -2}"),
     True),
    ("big_keys", "def f():\n    return {2**5000: b'x', (1, 2**7000): None}\n",
     _check("assert candidate() == {2**5000: b'x', (1, 2**7000): None}"), True),
    ("raises_builtin_type", "def f():\n    raise ValueError('x')\n", _expects("ValueError"), True),
    ("raises_own_subclass", "class E(KeyError):\n    pass\ndef f():\n    raise E(1)\n", _expects("LookupError"), True),
    ("raises_other_type", "def f():\n    raise TypeError('x')\n", _expects("ValueError"), False),
    ("raises_unprintable", "def f():\n    raise ValueError(10**5000)\n", _expects("ValueError"), True),
    ("plain_enum_is_not_carried", "import enum\nclass C(enum.Enum):\n    RED = 1\ndef f():\n    return 1\n",
     _check("assert candidate() == 1"), True),
]

# A wrong answer whose own __eq__ says "equal": the reference harness passes it, we must not.
HOSTILE_EQ = [
    ("int", "class X(int):\n    def __eq__(self, o):\n        return True\n    __hash__ = int.__hash__\n"
     "def f():\n    return X(0)\n"),
    ("str", "class X(str):\n    def __eq__(self, o):\n        return True\n    __hash__ = str.__hash__\n"
     "def f():\n    return X('')\n"),
    ("float", "class X(float):\n    def __eq__(self, o):\n        return True\n    __hash__ = float.__hash__\n"
     "def f():\n    return X(0)\n"),
    ("list", "class X(list):\n    def __eq__(self, o):\n        return True\ndef f():\n    return X()\n"),
    ("tuple", "class X(tuple):\n    def __eq__(self, o):\n        return True\n    __hash__ = tuple.__hash__\n"
     "def f():\n    return X()\n"),
    ("namedtuple", "import collections\nclass X(collections.namedtuple('X', 'a')):\n    def __eq__(self, o):\n"
     "        return True\n    __hash__ = tuple.__hash__\ndef f():\n    return X(0)\n"),
    ("dict", "class X(dict):\n    def __eq__(self, o):\n        return True\ndef f():\n    return X()\n"),
    ("counter", "import collections\nclass X(collections.Counter):\n    def __eq__(self, o):\n        return True\n"
     "def f():\n    return X()\n"),
    ("ordereddict", "import collections\nclass X(collections.OrderedDict):\n    def __eq__(self, o):\n"
     "        return True\ndef f():\n    return X()\n"),
    ("set", "class X(set):\n    def __eq__(self, o):\n        return True\ndef f():\n    return X()\n"),
    ("bytes", "class X(bytes):\n    def __eq__(self, o):\n        return True\n    __hash__ = bytes.__hash__\n"
     "def f():\n    return X()\n"),
    ("fraction", "import fractions\nclass X(fractions.Fraction):\n    def __eq__(self, o):\n        return True\n"
     "    __hash__ = fractions.Fraction.__hash__\ndef f():\n    return X(0)\n"),
    ("int_enum", "import enum\nclass X(enum.IntEnum):\n    A = 0\n    def __eq__(self, o):\n        return True\n"
     "    __hash__ = int.__hash__\ndef f():\n    return X.A\n"),
]


def reference_harness(program: str, test: str, entry_point: str = "f") -> bool:
    """human-eval's execution.py, minus its sandboxing: one process, pass = no exception."""
    source = program + "\n" + test + f"\ncheck({entry_point})\n"
    try:
        return subprocess.run([sys.executable, "-c", source], capture_output=True, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.mark.parametrize("name,program,test,verdict", AGREE, ids=[c[0] for c in AGREE])
def test_verdict_matches_reference_harness(name, program, test, verdict):
    assert reference_harness(program, test) == verdict  # the table itself is right
    result = check_function(program, "f", test, limits=LIMITS)
    assert result.passed == verdict, result
    assert result.kind != INFRA


@pytest.mark.parametrize("name,program", HOSTILE_EQ, ids=[c[0] for c in HOSTILE_EQ])
def test_own_eq_never_makes_a_wrong_answer_pass(name, program):
    test = _check("assert candidate() == 12345")
    assert reference_harness(program, test)  # the reference harness is fooled: that is the point
    result = check_function(program, "f", test, limits=LIMITS)
    assert not result.passed and result.kind == WRONG, result
