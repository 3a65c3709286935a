"""The only code of ours that runs inside the sandbox, next to the candidate program.

It is passed to ``python3 -I -S -c`` (standard library only, no project imports) and speaks
one JSON object per line: requests arrive on fd ``argv[1]``, replies leave on fd
``argv[2]``. The candidate shares this process, so it can tamper with anything here: that
is fine, because only *values* leave (tagged JSON of plain types), the expected values are
never inside, and the comparison runs on the trusted side. At worst tampering makes its own
answers wrong. stdin is /dev/null; stdout/stderr go to a capped log pipe.

Requests: ``{"source": str, "entry_point": str | null}`` first (compile + exec), then
``{"args": [...], "kwargs": {...}}`` (call the entry point) or ``{"stdin": str}`` (run the
program as a script on that input, reply with what it printed).
"""

import os
import sys

try:  # the C parts of json: importing the json package costs ~12 ms (re, enum...) per run
    import _json

    class _Ctx:
        strict, object_hook, object_pairs_hook, parse_float, parse_int, memo = True, None, None, float, int, {}

        def parse_constant(name):
            raise ValueError("JSON constant " + name)

    _scan = _json.make_scanner(_Ctx)
    _quote = _json.encode_basestring_ascii

    def loads(text):
        obj, end = _scan(text.strip(), 0)
        return obj

    def dumps(obj):
        if obj is None:
            return "null"
        if obj is True or obj is False:
            return "true" if obj else "false"
        t = type(obj)
        if t is str:
            return _quote(obj)
        if t is int:
            return int.__repr__(obj)
        if t is float:
            return float.__repr__(obj)
        if t is list:
            return "[" + ", ".join([dumps(v) for v in obj]) + "]"
        if t is dict:
            return "{" + ", ".join([_quote(k) + ": " + dumps(v) for k, v in obj.items()]) + "}"
        raise TypeError("cannot write " + t.__name__)
except ImportError:  # pragma: no cover - an interpreter without the C accelerator
    from json import dumps, loads


def encode(value, depth=0):
    """Values of standard types to tagged JSON; anything else is refused.

    Subclasses (IntEnum, str enums, OrderedDict, Counter, defaultdict, namedtuples...) travel
    as what their standard base holds, read through the base's own methods; the trusted side
    rebuilds standard types only (posttrain/verifiers/values.py), so none of the candidate's
    methods can take part in a comparison. Big ints are hex: linear both ways, no digit limit.
    """
    if depth > 100:
        raise ValueError("value nested deeper than 100")
    t = type(value)
    if value is None or t is bool or t is str:
        return value
    if t is int:
        return value if -(2**53) < value < 2**53 else {"$int": int.__format__(value, "x")}
    if t is float:
        return value if value == value and abs(value) != float("inf") else {"$float": repr(value)}
    if t is list:
        return [encode(v, depth + 1) for v in value]
    if t is tuple:
        return {"$tuple": [encode(v, depth + 1) for v in value]}
    if t is set:
        return {"$set": [encode(v, depth + 1) for v in value]}
    if t is frozenset:
        return {"$frozenset": [encode(v, depth + 1) for v in value]}
    if t is dict:
        return {"$dict": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    return _encode_other(value, depth)


def _encode_other(value, depth):
    """Subclasses of the plain types, bytes, complex, and a few standard-library value types."""
    if isinstance(value, int):  # IntEnum, IntFlag...
        return encode(int.__int__(value), depth)
    if isinstance(value, float):
        return encode(float.__float__(value), depth)
    if isinstance(value, str):  # str enums...
        return str.__str__(value)
    if isinstance(value, (bytes, bytearray)):
        if isinstance(value, bytearray):
            return {"$bytearray": bytearray.hex(value)}
        return {"$bytes": bytes.hex(value)}
    if isinstance(value, complex):
        parts = complex.real.__get__(value), complex.imag.__get__(value)
        return {"$complex": [encode(part, depth) for part in parts]}
    collections = sys.modules.get("collections")  # a value of these types means its module is loaded
    if isinstance(value, dict):
        if collections is not None and isinstance(value, collections.Counter):
            return {"$counter": _pairs(dict.items(value), depth)}
        if collections is not None and isinstance(value, collections.OrderedDict):
            return {"$odict": _pairs(collections.OrderedDict.items(value), depth)}  # its own order, not dict's
        if collections is not None and isinstance(value, collections.defaultdict):
            factory = value.default_factory
            name = factory.__name__ if factory in _FACTORIES else None  # anything else: plain dict lookups
            return {"$defaultdict": [name, _pairs(dict.items(value), depth)]}
        return {"$dict": _pairs(dict.items(value), depth)}
    if isinstance(value, tuple):
        fields = getattr(type(value), "_fields", None)
        elements = [encode(v, depth + 1) for v in tuple.__iter__(value)]
        if type(fields) is tuple and len(fields) == len(elements) and all(type(f) is str for f in fields):
            return {"$namedtuple": [type(value).__name__, list(fields), elements]}
        return {"$tuple": elements}
    if isinstance(value, list):
        return [encode(v, depth + 1) for v in list.__iter__(value)]
    if isinstance(value, (set, frozenset)):
        iterate = set.__iter__ if isinstance(value, set) else frozenset.__iter__
        tag = "$set" if isinstance(value, set) else "$frozenset"
        return {tag: [encode(v, depth + 1) for v in iterate(value)]}
    fractions, decimal = sys.modules.get("fractions"), sys.modules.get("decimal")
    if fractions is not None and isinstance(value, fractions.Fraction):
        return {"$fraction": [encode(int.__int__(part), depth) for part in (value.numerator, value.denominator)]}
    if decimal is not None and isinstance(value, decimal.Decimal):
        return {"$decimal": decimal.Decimal.__str__(value)}
    raise TypeError("cannot return a value of type " + type(value).__name__)


def _pairs(items, depth):
    return [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in items]


_FACTORIES = (int, float, complex, str, bytes, bool, list, tuple, dict, set, frozenset)  # defaultdict's


def decode(obj):
    """Inverse of encode, for arguments sent by the trusted side (no limits needed: it is trusted)."""
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    ((tag, v),) = obj.items()
    if tag == "$int":
        return int(v, 16)
    if tag == "$float":
        return float(v)
    if tag == "$tuple":
        return tuple(decode(x) for x in v)
    if tag == "$set":
        return set(decode(x) for x in v)
    if tag == "$frozenset":
        return frozenset(decode(x) for x in v)
    if tag == "$dict":
        return {decode(k): decode(x) for k, x in v}
    if tag in ("$bytes", "$bytearray"):
        return (bytes if tag == "$bytes" else bytearray).fromhex(v)
    if tag == "$complex":
        return complex(decode(v[0]), decode(v[1]))
    import collections

    if tag == "$odict":
        return collections.OrderedDict((decode(k), decode(x)) for k, x in v)
    if tag == "$counter":
        return collections.Counter({decode(k): decode(x) for k, x in v})
    if tag == "$defaultdict":
        factory = {f.__name__: f for f in _FACTORIES}.get(v[0])
        return collections.defaultdict(factory, {decode(k): decode(x) for k, x in v[1]})
    if tag == "$namedtuple":
        return collections.namedtuple(v[0], v[1])._make(decode(x) for x in v[2])
    if tag == "$fraction":
        import fractions

        return fractions.Fraction(decode(v[0]), decode(v[1]))
    if tag == "$decimal":
        import decimal

        return decimal.Decimal(v)
    raise ValueError("unknown tag " + tag)


def failure(exc):
    """A raised exception as a reply. Never raises itself: str() runs the exception's own code,
    and refuses e.g. ValueError(10**5000) (ints over 4300 digits)."""
    kind = "memory" if isinstance(exc, MemoryError) else "raised"
    if isinstance(exc, RecursionError):
        kind = "recursion"
    # the nearest built-in class, so a test's `except ValueError:` also catches the candidate's own subclass
    base = next((c.__name__ for c in type(exc).__mro__ if c.__module__ == "builtins"), "BaseException")
    return {"status": kind, "type": type(exc).__name__, "builtin": base, "message": message_of(exc)}


def message_of(exc):
    try:
        return str(exc)[:500]
    except BaseException:  # noqa: BLE001
        return "(the exception's message could not be read)"


def apply_limits(limits):
    """Set our rlimits again before any candidate code runs (hard limits: no way back up).

    The sandbox already set them with ``prlimit`` before ``exec bwrap``, so that every process
    of the run (bwrap's pid 1 included) has them; this second layer costs microseconds.
    """
    import resource

    for name, (soft, hard) in limits.items():
        resource.setrlimit(getattr(resource, name), (soft, hard))


def main():
    requests = os.fdopen(int(sys.argv[1]), "rb")
    reply_fd = int(sys.argv[2])
    apply_limits(loads(sys.argv[3]))
    del sys.argv[1:]

    def reply(obj):
        data = (dumps(obj) + "\n").encode()
        while data:
            data = data[os.write(reply_fd, data):]

    reply({"status": "hello"})  # before any candidate code: proves the sandbox itself started

    setup = loads(requests.readline().decode())
    try:
        code = compile(setup["source"], "<candidate>", "exec")
    except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError) as exc:
        reply({"status": "syntax_error", "type": type(exc).__name__, "message": str(exc)[:500]})
        return
    entry = setup.get("entry_point")
    if entry is not None:
        namespace = {"__name__": "__candidate__", "__builtins__": __builtins__}
        try:
            exec(code, namespace)
        except BaseException as exc:  # noqa: BLE001 - SystemExit included: it is the candidate's failure
            reply(dict(failure(exc), stage="setup"))
            return
        if not callable(namespace.get(entry)):
            reply({"status": "missing_entry_point", "message": "no callable named %r" % entry})
            return
    reply({"status": "ready"})
    for line in requests:
        request = loads(line.decode())
        if "stdin" in request:
            reply(run_script(code, request["stdin"]))
            continue
        try:
            kwargs = {k: decode(v) for k, v in request.get("kwargs", {}).items()}
            value = namespace[entry](*decode(request["args"]), **kwargs)
        except BaseException as exc:  # noqa: BLE001
            reply(failure(exc))
            continue
        try:
            data = {"status": "ok", "value": encode(value)}
        except MemoryError:
            data = {"status": "memory", "message": "out of memory while encoding the return value"}
        except Exception as exc:  # noqa: BLE001 - e.g. its own methods raising: the candidate's failure
            data = {"status": "unserializable", "message": type(exc).__name__ + ": " + message_of(exc)}
        reply(data)


def run_script(code, stdin):
    """Run the program as ``__main__`` with ``stdin`` and return what it wrote to sys.stdout."""
    import io

    out = io.StringIO()
    saved = sys.stdin, sys.stdout
    sys.stdin, sys.stdout = io.StringIO(stdin), out
    status = {"status": "ok"}
    try:
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit as exc:
        if exc.code not in (None, 0):
            status = {"status": "raised", "type": "SystemExit", "message": str(exc.code)[:200]}
    except BaseException as exc:  # noqa: BLE001
        status = failure(exc)
        import traceback

        traceback.print_exc(file=saved[1])
    finally:
        sys.stdin, sys.stdout = saved
    status["stdout"] = out.getvalue()
    return status


if __name__ == "__main__":
    main()
