"""theory/ stays pure: it imports nothing from sim, and every public function documents itself."""

import ast
import inspect
from pathlib import Path

import theory

THEORY = Path(theory.__file__).parent


def test_theory_imports_nothing_from_sim():
    for path in THEORY.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n == "sim" or n.startswith("sim.") for n in names), f"{path.name} imports {names}"


def test_every_public_function_has_a_docstring_with_an_equation_or_source():
    for path in THEORY.glob("*.py"):
        module = __import__(f"theory.{path.stem}", fromlist=["_"]) if path.stem != "__init__" else theory
        for name, fn in inspect.getmembers(module, inspect.isfunction):
            if name.startswith("_") or fn.__module__ != module.__name__:
                continue
            doc = inspect.getdoc(fn) or ""
            assert len(doc) > 30, f"{module.__name__}.{name} has no real docstring"
            assert any(ch in doc for ch in "=<>") or "DESIGN" in doc, f"{module.__name__}.{name}: no equation"
        assert "DESIGN.md" in (module.__doc__ or ""), f"{module.__name__}: module docstring names no source"
