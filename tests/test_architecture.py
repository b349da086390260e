"""The house rules, checked on the code itself: consumers stay light, layers import downward only and
without cycles, no module reaches into another's private names, no class grows into a hall."""

from __future__ import annotations

import ast
import functools
import gc
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("encoder_service", "llm_worker", "epd_demo")
ENCODER_INTERNALS = ("encoder_service.engine", "encoder_service.models", "encoder_service.attention",
                     "encoder_service.preprocess", "encoder_service.serving", "encoder_service.batching",
                     "encoder_service.video")
# A module under the key may not import (at any depth of its file) a module under any of these.
FORBIDDEN = {
    "encoder_service.contract": ("encoder_service.client", "encoder_service.config", "encoder_service.fingerprint",
                                 "encoder_service.transfer", *ENCODER_INTERNALS, "encoder_service.integrations",
                                 "llm_worker", "epd_demo"),
    "encoder_service.transfer": ("encoder_service.client", "encoder_service.config", *ENCODER_INTERNALS,
                                 "encoder_service.integrations", "llm_worker", "epd_demo"),
    "encoder_service.client": (*ENCODER_INTERNALS, "encoder_service.config", "encoder_service.integrations",
                               "llm_worker", "epd_demo"),
    "encoder_service.integrations": (*ENCODER_INTERNALS, "llm_worker", "epd_demo"),
    "llm_worker": (*ENCODER_INTERNALS, "encoder_service.integrations", "epd_demo"),
    "encoder_service.serving.host": ("encoder_service.serving.api", "encoder_service.integrations", "llm_worker",
                                     "epd_demo"),
    "encoder_service": ("llm_worker", "epd_demo"),
}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


@functools.lru_cache(maxsize=None)
def _parse(path: Path) -> ast.Module:
    """A module's AST (parsed once), with the garbage collector held off: CPython 3.11's parser raises
    SystemError ("AST constructor recursion depth mismatch") when a collection during the parse runs
    finalizers of other tests' objects."""
    gc.disable()
    try:
        return ast.parse(path.read_text())
    finally:
        gc.enable()


def _imports(name: str, path: Path, top_level_only: bool) -> set[str]:
    """Project modules `name` imports (resolved to modules, not names inside them)."""
    tree = _parse(path)
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    modules = _modules()
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
    return {m for m in found if m.split(".")[0] in PACKAGES}


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_consumers_load_no_encoder_internals():
    """The client, the pool client and the LLM worker import none of the encoder's model or serving code."""
    code = ("import sys, encoder_service.client.endpoint, encoder_service.client.pool, encoder_service.client.checks, "
            "encoder_service.transfer.reader, llm_worker.engine, llm_worker.actor, llm_worker.codec; "
            "print('\\n'.join(m for m in sys.modules if m.startswith('encoder_service')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=ROOT).stdout.split()
    leaked = sorted(m for m in loaded if any(_under(m, p) for p in ENCODER_INTERNALS))
    assert not leaked, f"consumers loaded encoder internals: {leaked}"
    assert "encoder_service.contract.wire.responses" in loaded  # the check sees real imports


def test_layers_import_downward_only():
    violations = []
    for name, path in _modules().items():
        for rule, forbidden in FORBIDDEN.items():
            if not _under(name, rule):
                continue
            for target in _imports(name, path, top_level_only=False):
                if any(_under(target, f) for f in forbidden) and not _under(target, rule):
                    violations.append(f"{name} imports {target}")
    assert not violations, "\n".join(sorted(set(violations)))


def test_no_import_cycles():
    modules = _modules()
    graph = {name: {m for m in _imports(name, path, top_level_only=True) if m in modules and m != name}
             for name, path in modules.items()}
    graph = {name: {m for m in deps if not _under(name, m)} for name, deps in graph.items()}  # a package's own init
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [node, nxt]))
            if not state.get(nxt):
                visit(nxt, trail + [node])
        state[node] = 2

    for name in sorted(graph):
        if not state.get(name):
            visit(name, [])


def test_no_module_uses_another_modules_private_names():
    modules = _modules()
    violations = []
    for name, path in modules.items():
        tree = _parse(path)
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        violations.append(f"{name}: from {node.module} import {a.name}")
                    if f"{node.module}.{a.name}" in modules:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] in PACKAGES:
                        aliases[a.asname or a.name] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                violations.append(f"{name}: {aliases[node.value.id]}.{node.attr}")
    assert not violations, "\n".join(violations)


def test_no_class_over_300_lines():
    long = [f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
            for name, path in _modules().items() for node in ast.walk(_parse(path))
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 300]
    assert not long, "\n".join(long)
