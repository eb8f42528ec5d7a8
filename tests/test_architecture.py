"""Imports point the way docs/architecture.md allows: pipelines -> orchestrator -> bitmixer_core, and within
orchestrator only the listed arrows between sub-packages. Every module is parsed (ast), never imported, so
lazy imports inside functions count too."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("bitmixer_core", "orchestrator", "pipelines")

# Which project packages each package may import (besides itself). "orchestrator" = its top-level modules.
ALLOWED = {
    "pipelines": {"orchestrator", "orchestrator.pipeline", "orchestrator.engine", "orchestrator.deploy",
                  "orchestrator.data", "orchestrator.tracking", "bitmixer_core"},
    "orchestrator.pipeline": {"orchestrator", "orchestrator.engine", "orchestrator.deploy", "orchestrator.data",
                              "orchestrator.tracking", "bitmixer_core"},
    "orchestrator.deploy": {"orchestrator", "orchestrator.engine", "orchestrator.data", "orchestrator.tracking",
                            "bitmixer_core"},
    "orchestrator.engine": {"orchestrator", "orchestrator.data", "orchestrator.tracking", "bitmixer_core"},
    "orchestrator.data": {"orchestrator", "bitmixer_core"},
    "orchestrator.tracking": {"orchestrator", "bitmixer_core"},
    "orchestrator": {"bitmixer_core"},
    "bitmixer_core": set(),
}
CORE_THIRD_PARTY = {"torch", "numpy"}


def package_of(module: str) -> str:
    """'orchestrator.engine.worker' -> 'orchestrator.engine'; 'orchestrator.atomic' -> 'orchestrator'."""
    parts = module.split(".")
    if parts[0] != "orchestrator" or len(parts) == 1:
        return parts[0]
    candidate = f"orchestrator.{parts[1]}"
    return candidate if (ROOT / "orchestrator" / parts[1]).is_dir() else "orchestrator"


def imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved."""
    module = ".".join(path.relative_to(root).with_suffix("").parts)
    package = module.split(".")[:-1]  # the package the module is in (for __init__, the package itself)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return found


def test_imports_follow_the_allowed_arrows():
    """No module imports a project package that docs/architecture.md does not allow for its own package."""
    wrong = []
    for top in PROJECT:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            own = package_of(rel)
            for line, name in imports(path):
                if name.split(".")[0] not in PROJECT:
                    continue
                target = package_of(name)
                if target != own and target not in ALLOWED[own]:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name} ({own} -> {target})")
    assert not wrong, "imports against docs/architecture.md:\n" + "\n".join(wrong)


def test_core_imports_only_torch_numpy_and_the_standard_library():
    """bitmixer_core must work in a notebook with no Ray, DeepSpeed or MLflow installed."""
    wrong = []
    for path in sorted((ROOT / "bitmixer_core").rglob("*.py")):
        for line, name in imports(path):
            top = name.split(".")[0]
            if top not in CORE_THIRD_PARTY | {"bitmixer_core", "__future__"} | set(sys.stdlib_module_names):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_the_checker_resolves_relative_imports(tmp_path):
    """`from ..pipeline import app` inside orchestrator/engine is read as orchestrator.pipeline, an arrow the
    engine may not have: the checker would report it."""
    folder = tmp_path / "orchestrator" / "engine"
    folder.mkdir(parents=True)
    probe = folder / "probe.py"
    probe.write_text("from ..pipeline import app\nfrom . import stage\nimport orchestrator.deploy.plots\n")
    names = [name for _, name in imports(probe, root=tmp_path)]
    assert names == ["orchestrator.pipeline", "orchestrator.engine", "orchestrator.deploy.plots"]
    assert package_of("orchestrator.pipeline.app") == "orchestrator.pipeline"
    assert package_of("orchestrator.atomic") == "orchestrator"
    assert package_of(names[0]) not in ALLOWED["orchestrator.engine"]
