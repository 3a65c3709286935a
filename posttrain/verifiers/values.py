"""A candidate's return value, from the sandbox's tagged JSON back to Python, with bounded work.

The candidate writes every byte of its reply, so this is where its data first meets trusted
code. The work stays linear in the reply by construction:

- caps on nesting, on the number of values, and on the size of numbers; big ints travel as
  hex (``int(s, 16)`` is linear; decimal parsing is quadratic and refused past 4300 digits);
- no container in which more than a few *distinct* values share a hash. Number hashes are
  public arithmetic (``hash(i * (2**61 - 1)) == 0``), and a set or dict of n such values
  costs n²/2 comparisons to build: 60k ints took 22 s. Lists and tuples are checked too,
  because a test may well write ``set(candidate(x))``.

What comes out is made here, of standard-library types only (int, float, complex, str,
bytes, containers, Fraction, Decimal, OrderedDict, Counter, defaultdict, and namedtuple
classes made by :func:`collections.namedtuple`), never an instance of a class the candidate
wrote: ``==`` in the tests is Python's own, as in the reference harness, but no subclass's
``__eq__`` can make a wrong answer pass.
"""

from __future__ import annotations

import collections
import decimal
import fractions
import re
from collections.abc import Callable
from typing import Any

MAX_DEPTH = 100  # nesting of containers; the runner's encoder refuses deeper values too
MAX_ITEMS = 4_000_000  # values in one reply: about what the 8 MiB reply cap can carry
MAX_SAME_HASH = 8  # distinct values of one container that may share a hash (honest data: ~never 2)
MAX_INT_BITS = 1 << 20  # ~315k decimal digits (2**20000 has 6k); arithmetic on them stays cheap
MAX_FRACTION_BITS = 1 << 16  # Fraction() normalises with gcd, quadratic in the size
MAX_DECIMAL_CHARS = 10_000
MAX_NAMEDTUPLE_TYPES = 32  # distinct namedtuple classes per reply: each costs ~50 µs to make
MAX_NAMEDTUPLE_FIELDS = 256  # more: a plain tuple (== is a tuple's either way)

_HEX = re.compile(r"-?[0-9a-f]+")
_NONFINITE = ("nan", "inf", "-inf")
_FACTORIES: dict[str, Callable[[], Any]] = {
    f.__name__: f for f in (int, float, complex, str, bytes, bool, list, tuple, dict, set, frozenset)}
_UNHASHABLE = (list, dict, set, bytearray)


class MalformedValue(ValueError):
    """The reply's value is not something an honest runner sends (or costs too much to decode)."""


def decode(obj: Any) -> Any:
    """Tagged JSON (as ``json.loads`` returns it) to fresh values; anything odd is MalformedValue."""
    try:
        return _Decoder().value(obj, 0)
    except MalformedValue:
        raise
    except (ValueError, TypeError, ArithmeticError, RecursionError, MemoryError) as exc:
        raise MalformedValue(f"malformed value from the sandbox: {type(exc).__name__}: {str(exc)[:200]}") from None


def _malformed(why: str) -> MalformedValue:
    return MalformedValue(f"malformed value from the sandbox: {why}")


class _Decoder:
    """One reply's decoding: counts values and namedtuple classes made, against the caps."""

    def __init__(self) -> None:
        self.items = 0
        self.namedtuples: dict[tuple[str, tuple[str, ...]], type | None] = {}

    def value(self, obj: Any, depth: int) -> Any:
        self.items += 1
        if self.items > MAX_ITEMS:
            raise _malformed(f"more than {MAX_ITEMS} values")
        if depth > MAX_DEPTH:
            raise _malformed(f"nested deeper than {MAX_DEPTH}")
        t = type(obj)
        if obj is None or t is bool or t is int or t is float or t is str:
            return obj  # a JSON int has at most 4300 digits: json.loads refuses more
        if t is list:
            return _distinct_hashes(self.elements(obj, depth))
        if t is dict and len(obj) == 1:
            ((tag, body),) = obj.items()
            decoder = _TAGS.get(tag)
            if decoder is not None:
                return decoder(self, body, depth)
            raise _malformed(f"unknown tag {str(tag)[:40]!r}")
        raise _malformed(f"unexpected {t.__name__}")

    def elements(self, body: Any, depth: int) -> list[Any]:
        if type(body) is not list:
            raise _malformed(f"expected a list, got {type(body).__name__}")
        return [self.value(x, depth + 1) for x in body]

    def pairs(self, body: Any, depth: int) -> dict[Any, Any]:
        if type(body) is not list or not all(type(p) is list and len(p) == 2 for p in body):
            raise _malformed("expected a list of [key, value] pairs")
        keys = _distinct_hashes([self.value(k, depth + 1) for k, _ in body])
        return dict(zip(keys, [self.value(v, depth + 1) for _, v in body]))

    def namedtuple(self, body: Any, depth: int) -> tuple[Any, ...]:
        if type(body) is not list or len(body) != 3:
            raise _malformed("$namedtuple needs [typename, fields, values]")
        name, fields, items = body
        if type(name) is not str or type(fields) is not list or not all(type(f) is str for f in fields):
            raise _malformed("$namedtuple typename and fields must be strings")
        elements = _distinct_hashes(self.elements(items, depth))
        if len(fields) != len(elements):
            raise _malformed(f"$namedtuple has {len(fields)} fields but {len(elements)} values")
        key = (name, tuple(fields))
        if key not in self.namedtuples:
            if len(self.namedtuples) >= MAX_NAMEDTUPLE_TYPES:
                raise _malformed(f"more than {MAX_NAMEDTUPLE_TYPES} namedtuple classes")
            self.namedtuples[key] = None  # a plain tuple when the class cannot be made: == is the same
            if len(fields) <= MAX_NAMEDTUPLE_FIELDS:
                try:  # namedtuple() accepts identifiers only: nothing of the candidate's is ever run
                    self.namedtuples[key] = collections.namedtuple(name, fields, module=__name__)
                except (ValueError, SyntaxError):  # rename=True's "_1" fields; names equal once normalised
                    pass
        cls = self.namedtuples[key]
        return tuple(elements) if cls is None else cls._make(elements)


def _distinct_hashes(items: list[Any]) -> list[Any]:
    """``items``, unless more than MAX_SAME_HASH distinct hashable ones share a hash.

    Sorting the hashes costs n log n whatever they are; only a run of equal hashes is then
    compared value by value, against at most MAX_SAME_HASH representatives.
    """
    if len(items) <= MAX_SAME_HASH:
        return items
    try:
        kept, hashes = items, list(map(hash, items))
    except TypeError:  # some elements are lists, dicts...: only the hashable ones can collide
        kept, hashes = [], []
        for item in items:
            if not isinstance(item, _UNHASHABLE):
                try:
                    hashes.append(hash(item))
                except TypeError:
                    continue
                kept.append(item)
    ordered = sorted(hashes)
    if not any(a == b for a, b in zip(ordered, ordered[MAX_SAME_HASH:])):
        return items
    order = sorted(range(len(hashes)), key=hashes.__getitem__)
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and hashes[order[end]] == hashes[order[start]]:
            end += 1
        if end - start > MAX_SAME_HASH:
            distinct: list[Any] = []
            for i in order[start:end]:
                if not any(kept[i] is d or kept[i] == d for d in distinct):  # identity first, as a set
                    distinct.append(kept[i])
                    if len(distinct) > MAX_SAME_HASH:
                        raise _malformed(f"more than {MAX_SAME_HASH} distinct values share the hash "
                                         f"{hashes[order[start]]} (a hash-collision attack)")
        start = end
    return items


def _int(body: Any, bits: int = MAX_INT_BITS) -> int:
    if type(body) is int:
        return body
    if type(body) is dict and len(body) == 1 and type(body.get("$int")) is str:
        text = body["$int"]
        if len(text) - text.startswith("-") > bits // 4 or not _HEX.fullmatch(text):
            raise _malformed(f"$int must be at most {bits // 4} lowercase hex digits")
        return int(text, 16)
    raise _malformed(f"expected an int, got {type(body).__name__}")


def _float(body: Any) -> float:
    if type(body) is float:
        return body
    text = body.get("$float") if type(body) is dict and len(body) == 1 else None
    if type(text) is str and text in _NONFINITE:
        return float(text)  # a fresh nan each time: a nan's hash is its identity
    raise _malformed("expected a float")


def _string(body: Any, tag: str, limit: int | None = None) -> str:
    if type(body) is not str or (limit is not None and len(body) > limit):
        raise _malformed(f"{tag} needs a string" + (f" of at most {limit} characters" if limit else ""))
    return body


def _fraction(d: _Decoder, body: Any, depth: int) -> fractions.Fraction:
    if type(body) is not list or len(body) != 2:
        raise _malformed("$fraction needs [numerator, denominator]")
    num, den = (_int(x, MAX_FRACTION_BITS) for x in body)
    if max(num.bit_length(), den.bit_length()) > MAX_FRACTION_BITS:
        raise _malformed(f"$fraction parts over {MAX_FRACTION_BITS} bits")
    return fractions.Fraction(num, den)


def _defaultdict(d: _Decoder, body: Any, depth: int) -> collections.defaultdict[Any, Any]:
    if type(body) is not list or len(body) != 2 or not (body[0] is None or body[0] in _FACTORIES):
        raise _malformed(f"$defaultdict needs [factory, pairs], factory null or one of {sorted(_FACTORIES)}")
    return collections.defaultdict(None if body[0] is None else _FACTORIES[body[0]], d.pairs(body[1], depth))


# tag -> decoder(decoder, body, depth); each mirrors one branch of _runner.encode
_TAGS: dict[str, Callable[[_Decoder, Any, int], Any]] = {
    "$int": lambda d, body, depth: _int({"$int": body}),
    "$float": lambda d, body, depth: _float({"$float": body}),
    "$complex": lambda d, body, depth: complex(*(_float(x) for x in _two(body, "$complex"))),
    "$bytes": lambda d, body, depth: bytes.fromhex(_string(body, "$bytes")),
    "$bytearray": lambda d, body, depth: bytearray.fromhex(_string(body, "$bytearray")),
    "$decimal": lambda d, body, depth: decimal.Decimal(_string(body, "$decimal", MAX_DECIMAL_CHARS)),
    "$fraction": _fraction,
    "$tuple": lambda d, body, depth: tuple(_distinct_hashes(d.elements(body, depth))),
    "$set": lambda d, body, depth: set(_distinct_hashes(d.elements(body, depth))),
    "$frozenset": lambda d, body, depth: frozenset(_distinct_hashes(d.elements(body, depth))),
    "$dict": lambda d, body, depth: d.pairs(body, depth),
    "$odict": lambda d, body, depth: collections.OrderedDict(d.pairs(body, depth)),
    "$counter": lambda d, body, depth: collections.Counter(d.pairs(body, depth)),
    "$defaultdict": _defaultdict,
    "$namedtuple": lambda d, body, depth: d.namedtuple(body, depth),
}


def _two(body: Any, tag: str) -> list[Any]:
    if type(body) is not list or len(body) != 2:
        raise _malformed(f"{tag} needs two parts")
    return body
