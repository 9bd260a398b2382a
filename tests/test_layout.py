"""The code layout's rules (docs/ARCHITECTURE.md, "Where the code is"): small modules, and imports that
only point down the pipeline — plan → build → serve, analysis beside them, the packer root (the shard
contract and shared infrastructure) under all of them, and a trainer/model that run without Ray.

Imports are read with ``ast``, so lazy (function-level) imports count too unless a rule says otherwise.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 450
STAGES = ("plan", "build", "serve", "analysis")
# stage → the stages it must never import (higher stages use lower ones, never the reverse)
FORBIDDEN = {
    "plan": {"build", "serve", "analysis"},
    "build": {"serve", "analysis"},
    "serve": {"analysis"},
    "analysis": {"build", "serve"},
}
# What trainer/ may import from packer at module level: the shard contract and its config/errors.
# (Lazy imports inside functions may reach packer.build: live mode and `navit eval` decode images.)
TRAINER_PACKER_MODULES = {"packer.schema", "packer.errors", "packer.config", "packer.dirlock"}


def modules(*packages: str) -> list[Path]:
    return sorted(p for pkg in packages for p in (ROOT / pkg).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, module_level_only: bool = False) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file; ``from a import b`` yields ``a.b`` too
    (b may be a module). ``module_level_only``: only what runs at import time (not function bodies)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = list(_import_time_nodes(tree)) if module_level_only else list(ast.walk(tree))
    out = []
    for n in nodes:
        if isinstance(n, ast.Import):
            out += [(n.lineno, a.name) for a in n.names]
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            out.append((n.lineno, n.module))
            out += [(n.lineno, f"{n.module}.{a.name}") for a in n.names]
    return out


def _import_time_nodes(node: ast.AST):
    """Every node that runs when the module is imported: all but function bodies."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        yield child
        yield from _import_time_nodes(child)


def stage_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "packer" and parts[1] in STAGES else None


def test_no_module_is_over_the_size_limit():
    big = {
        str(p.relative_to(ROOT)): n
        for p in modules("packer", "trainer", "model")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not big, f"modules over {MAX_LINES} lines (split them along their jobs): {big}"


def test_every_stage_is_a_package_that_says_what_it_may_import():
    for stage in STAGES:
        init = ROOT / "packer" / stage / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "May import" in doc, f"{init}: the docstring says the stage's job and what it may import"
        # an __init__ imports nothing eagerly (no Ray, no heavy modules when a sibling is imported)
        assert not imports(init), f"{init} imports something"


@pytest.mark.parametrize("stage", STAGES)
def test_stages_import_only_downwards(stage):
    bad = [
        f"{p.relative_to(ROOT)}:{line} imports {name}"
        for p in modules(f"packer/{stage}")
        for line, name in imports(p)
        if stage_of(name) in FORBIDDEN[stage]
    ]
    assert not bad, "\n".join(bad)


def test_packer_root_modules_import_no_stage():
    bad = [
        f"{p.relative_to(ROOT)}:{line} imports {name}"
        for p in sorted((ROOT / "packer").glob("*.py"))
        for line, name in imports(p)
        if stage_of(name)
    ]
    assert not bad, "\n".join(bad)


def test_trainer_and_model_import_neither_ray_nor_packer_stages_at_import_time():
    bad = []
    for p in modules("trainer", "model"):
        for line, name in imports(p, module_level_only=True):
            where = f"{p.relative_to(ROOT)}:{line} imports {name} at module level"
            if name == "ray" or name.startswith("ray."):
                bad.append(where)
            elif p.parts[-2] == "model" and name.split(".")[0] in ("packer", "trainer", "cli"):
                bad.append(where)  # the model stands alone
            elif name.startswith("packer.") and not any(
                name == m or name.startswith(m + ".") for m in TRAINER_PACKER_MODULES
            ):
                bad.append(where)
    assert not bad, "\n".join(bad)


def test_trainer_and_model_import_without_ray_installed():
    """Behaviour, not just the text: with `import ray` made to fail, every trainer/model module
    (and the packer contract they use) still imports."""
    names = [module_name(p) for p in modules("trainer", "model")] + sorted(TRAINER_PACKER_MODULES)
    code = textwrap.dedent(
        f"""
        import importlib, sys
        class NoRay:
            def find_spec(self, name, path=None, target=None):
                if name == "ray" or name.startswith("ray."):
                    raise ImportError("ray is not installed (test)")
        sys.meta_path.insert(0, NoRay())
        for name in {names!r}:
            importlib.import_module(name)
        assert not any(m == "ray" or m.startswith("ray.") for m in sys.modules)
        """
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_the_rules_catch_a_violation(tmp_path):
    """The checks above find what they look for (an upward import, a module-level Ray import)."""
    f = tmp_path / "x.py"
    f.write_text(
        "import ray\nfrom packer.build import pipeline\n\ndef g():\n    from packer.serve import epochs\n"
    )
    assert [n for _, n in imports(f, module_level_only=True)] == [
        "ray",
        "packer.build",
        "packer.build.pipeline",
    ]
    names = [n for _, n in imports(f)]
    assert "packer.serve.epochs" in names and stage_of("packer.serve.epochs") == "serve"
