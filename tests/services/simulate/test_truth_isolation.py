"""Pipeline services must never see the simulator's hidden attributes.

Walks the source of services/ingest, refresh, embedder and serve with `ast`, follows their
imports of project modules (shared.*, services.*) transitively, and fails if any path
reaches shared.groundtruth or services.simulate. Packages that do not exist yet pass.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PIPELINE = ("services.ingest", "services.refresh", "services.embedder", "services.serve")
FORBIDDEN = ("shared.groundtruth", "services.simulate")
PROJECT_PACKAGES = ("shared", "services")


def _forbidden(module: str) -> str | None:
    """The forbidden package `module` belongs to, if any."""
    return next((f for f in FORBIDDEN if module == f or module.startswith(f + ".")), None)


def module_file(root: Path, module: str) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(source: str, module: str, is_package: bool) -> set[str]:
    """Absolute names of every module a source file may import (including `from x import y`
    as both x and x.y, relative imports, and importlib.import_module("...") literals)."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, package)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and _is_dynamic_import(node):
            argument = node.args[0] if node.args else None
            if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                found.add(argument.value)
    return {name for name in found if name}


def _resolve(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _is_dynamic_import(node: ast.Call) -> bool:
    name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(
        node.func, "id", "")
    return name in ("import_module", "__import__")


def violations(root: Path, packages=PIPELINE) -> list[str]:
    """'a -> b -> shared.groundtruth' for every forbidden module reachable from `packages`."""
    queue: list[tuple[str, tuple[str, ...]]] = []
    for package in packages:
        folder = root.joinpath(*package.split("."))
        for path in sorted(folder.rglob("*.py")) if folder.is_dir() else ():
            relative = path.relative_to(root).with_suffix("")
            parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
            queue.append((".".join(parts), ()))
    seen, found = set(), set()
    while queue:
        module, chain = queue.pop()
        if module in seen:
            continue
        seen.add(module)
        path = module_file(root, module)
        if path is None:
            continue
        for name in imported_modules(path.read_text(), module, path.name == "__init__.py"):
            if _forbidden(name):
                found.add(" -> ".join((*chain, module, _forbidden(name))))
            elif name.split(".")[0] in PROJECT_PACKAGES:
                queue.append((name, (*chain, module)))
    return sorted(found)


def test_pipeline_never_imports_ground_truth():
    assert violations(ROOT) == []


# -- the checker itself, on a synthetic tree --------------------------------------------------

def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def synthetic_tree(tmp_path: Path, ingest_source: str) -> Path:
    write(tmp_path, "shared/__init__.py", "")
    write(tmp_path, "shared/groundtruth.py", "SECRET = 1\n")
    write(tmp_path, "shared/clean.py", "import json\n")
    write(tmp_path, "shared/leaky.py", "from shared.groundtruth import SECRET\n")
    write(tmp_path, "services/__init__.py", "")
    write(tmp_path, "services/simulate/__init__.py", "")
    write(tmp_path, "services/simulate/world.py", "")
    write(tmp_path, "services/ingest/__init__.py", "")
    write(tmp_path, "services/ingest/consumer.py", ingest_source)
    return tmp_path


def test_checker_passes_clean_code(tmp_path):
    root = synthetic_tree(tmp_path, "import numpy\nfrom shared import clean\nfrom . import x\n")
    assert violations(root) == []


def test_checker_passes_missing_packages(tmp_path):
    assert violations(tmp_path) == []


def test_checker_catches_every_form(tmp_path):
    for source in ("import shared.groundtruth\n",
                   "from shared import groundtruth\n",
                   "from shared.groundtruth import read\n",
                   "import services.simulate.world as w\n",
                   "from services import simulate\n",
                   "from ..simulate import world\n",
                   "def f():\n    from shared import groundtruth\n",
                   "import importlib\nimportlib.import_module('shared.groundtruth')\n",
                   "from shared import leaky\n"):  # transitively, through shared.leaky
        root = synthetic_tree(tmp_path / str(abs(hash(source))), source)
        assert violations(root), source


def test_checker_reports_the_chain(tmp_path):
    root = synthetic_tree(tmp_path, "from shared import leaky\n")
    assert violations(root) == [
        "services.ingest.consumer -> shared.leaky -> shared.groundtruth"]
