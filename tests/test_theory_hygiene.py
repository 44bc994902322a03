"""theory/ stays pure: it imports nothing from sim, and every public function documents itself;
the package import graph keeps its direction (DESIGN.md §1): theory <- sim <- paper_figs, with
sim.cli the one composition root that reaches into paper_figs (for `sim figures`) and sim.llm."""

import ast
import inspect
from pathlib import Path

import theory

THEORY = Path(theory.__file__).parent
ROOT = THEORY.parent


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
    return names


def _under(names: set[str], package: str) -> set[str]:
    return {n for n in names if n == package or n.startswith(package + ".")}


def test_theory_imports_nothing_from_sim():
    for path in THEORY.glob("*.py"):
        assert not _under(_imports(path), "sim") | _under(_imports(path), "paper_figs"), path.name


def test_sim_never_imports_paper_figs_and_only_the_cli_imports_sim_llm():
    for path in (ROOT / "sim").rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        names = _imports(path)
        if rel != "sim/cli.py":
            assert not _under(names, "paper_figs"), f"{rel} imports paper_figs"
            if not rel.startswith("sim/llm/"):
                assert not _under(names, "sim.llm"), f"{rel} imports sim.llm"


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


def test_theory_entry_points_check_shapes():
    import pytest
    import torch

    z = torch.zeros(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"prompt_stats: rbar has K = 5"):
        theory.prompt_stats(z, torch.zeros(3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"gradient_orthogonality: gram has P = 3 .* P = 2"):
        theory.gradient_orthogonality(torch.eye(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"label_phases|raw_phases"):
        theory.label_phases([0.1, 0.2], [0.9], [1.0, 1.0])
