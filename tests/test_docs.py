"""Documentation that must not rot: every public module, class and function of dfield has a docstring (methods
may inherit theirs from the class they override), and the examples in docstrings run."""

from __future__ import annotations

import dataclasses
import doctest
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import dfield


def _modules():
    return [importlib.import_module(m.name) for m in pkgutil.walk_packages(dfield.__path__, "dfield.")]


def _public(obj):
    return [(n, v) for n, v in vars(obj).items() if not n.startswith("_")]


def test_every_public_definition_has_a_docstring():
    missing = []
    for mod in [dfield, *_modules()]:
        if not inspect.getdoc(mod):
            missing.append(mod.__name__)
        for name, obj in _public(mod):
            if not (inspect.isfunction(obj) or inspect.isclass(obj)) or obj.__module__ != mod.__name__:
                continue  # imported from elsewhere: checked where it is defined
            doc = inspect.getdoc(obj) or ""
            if not doc or (dataclasses.is_dataclass(obj) and doc.startswith(f"{name}(")):  # the generated one
                missing.append(f"{mod.__name__}.{name}")
            if inspect.isclass(obj):
                for mname, member in _public(obj):
                    fn = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
                    if inspect.isfunction(fn) and not inspect.getdoc(getattr(obj, mname)):
                        missing.append(f"{mod.__name__}.{name}.{mname}")
    assert not missing, "public definitions without a docstring:\n" + "\n".join(missing)


@pytest.mark.parametrize("module", [m.__name__ for m in _modules()])
def test_docstring_examples_run(module):
    mod = importlib.import_module(module)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(mod, module, globs={**vars(mod)}):
        runner.run(test)
    assert runner.failures == 0, f"{runner.failures} docstring example(s) of {module} failed (run with -s to see them)"


def _readme_tree() -> set[str]:
    """Module paths (dfield/...py) listed in the README's package tree (the code block starting with 'dfield/')."""
    text = (Path(dfield.__file__).parent.parent / "README.md").read_text()
    block = text[text.index("```\ndfield/\n") + 4:]
    block = block[: block.index("```")]
    listed, package = set(), ""
    for line in block.splitlines()[1:]:
        entry = line.strip().split("  ")[0]  # the name column, before the description
        indent = len(line) - len(line.lstrip())
        if indent == 2:
            package = entry if entry.endswith("/") else ""
            if entry.endswith(".py"):
                listed.add(f"dfield/{entry}")
        elif indent == 4:
            names = [n.strip() for n in entry.split(",")]
            folder = names[0].rpartition("/")[0]
            for n in names:
                listed.add(f"dfield/{package}{n if '/' in n else (folder + '/' if folder else '') + n}")
    return listed


def test_readme_module_map_matches_the_tree():
    root = Path(dfield.__file__).parent
    actual = {str(p.relative_to(root.parent)) for p in root.rglob("*.py") if p.name != "__init__.py"}
    listed = _readme_tree()
    assert actual == listed, f"in the tree, not the README: {sorted(actual - listed)}; " \
                             f"in the README, not the tree: {sorted(listed - actual)}"
