"""Layering: the package's imports point one way (no cycles), and RL does not reach into SFT.

Imports are read with ``ast`` from every module under ``posttrain/``, function-level and
``TYPE_CHECKING`` ones included: a cycle hidden inside a function is still a cycle a reader
has to untangle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "posttrain"

# The GenRM warm-up is an SFT run on gold judgements (genrm train = SFT stage, then RL): it calls
# the SFT stage and configures its ``train`` section. Stage composition, not a shared piece;
# nothing else in genrm/ or rlvr/ may import from sft/.
GENRM_RUNS_SFT = {
    ("posttrain.genrm.config", "posttrain.sft.config"),
    ("posttrain.genrm.train", "posttrain.sft.config"),
    ("posttrain.genrm.train", "posttrain.sft.train"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports: ``from a import b`` is ``a.b`` when that is a module, else ``a``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([node.module] if node.module else []))
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names)
    out = set()
    for target in found:
        while target and target not in known:  # posttrain.models.load -> posttrain.models
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_detector_finds_a_cycle_through_a_function_level_import(tmp_path, monkeypatch):
    pkg = tmp_path / "posttrain"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from posttrain.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (pkg / "c.py").write_text("import posttrain.a\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    assert find_cycle(import_graph()) == ["posttrain.a", "posttrain.sub.b", "posttrain.c", "posttrain.a"]


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_rl_stages_do_not_import_from_sft():
    graph = import_graph()
    bad = sorted((src, dst) for src, targets in graph.items() for dst in targets
                 if src.startswith(("posttrain.rlvr", "posttrain.genrm")) and dst.startswith("posttrain.sft")
                 and (src, dst) not in GENRM_RUNS_SFT)
    assert not bad, f"shared training pieces belong in posttrain/training/, not sft/: {bad}"
    assert GENRM_RUNS_SFT <= {(s, d) for s, ts in graph.items() for d in ts}, "stale exception: drop it"


# Known second meanings not yet renamed: (name, why it waits).
SHARED_NAMES = {"Slot": "placement bundle vs cgroup lease; rename once verifiers/cgroups.py settles"}


def public_definitions() -> dict[str, list[str]]:
    """Module-level public classes and UPPER_CASE constants -> the modules that define them."""
    found: dict[str, list[str]] = {}
    for name, path in modules().items():
        for node in ast.parse(path.read_text(), str(path)).body:
            targets: list[ast.expr] = []
            if isinstance(node, ast.ClassDef):
                found.setdefault(node.name, []).append(name)
            elif isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AnnAssign):
                targets = [node.target]
            for target in targets:
                names = target.elts if isinstance(target, ast.Tuple) else [target]
                for n in names:
                    if isinstance(n, ast.Name) and n.id.startswith("THINK_"):
                        found.setdefault(n.id, []).append(name)
    return {k: v for k, v in found.items() if not k.startswith("_")}


def test_one_name_per_concept():
    """Two classes with one name (``Sample``, ``Completion``) make a reader guess which is meant;
    the reasoning tags are defined once, in ``posttrain.chat_template``."""
    twice = {k: v for k, v in public_definitions().items() if len(v) > 1 and k not in SHARED_NAMES}
    assert not twice, f"one name, several definitions: {twice}"
    assert all(len(public_definitions().get(k, [])) > 1 for k in SHARED_NAMES), "stale exception: drop it"
