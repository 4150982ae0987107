"""The package's import graph: data flows one way, Lightning only at the top.

Walks the source of every module of ``robop_lightning`` (no import is executed): module-level
imports of the package must form no cycle, no function imports the package (the usual way to dodge
a cycle), and the pruning chain (calibration, sets, solvers, masks, surgery, model) never imports
Lightning.
"""

from __future__ import annotations

import ast
from pathlib import Path

import robop_lightning

ROOT = Path(robop_lightning.__file__).parent
# Lightning's glue: the callback, the LightningModules and DataModules (and what imports them).
LIGHTNING_OK = ("robop_lightning", "robop_lightning.callback", "robop_lightning.models", "robop_lightning.data")
MAX_LINES = 520  # "no module over about 500 lines"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _resolve(node: ast.ImportFrom | ast.Import, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        pkg = module.split(".") if is_package else module.split(".")[:-1]
        pkg = pkg[: len(pkg) - node.level + 1]
        base = ".".join(pkg + ([base] if base else []))
    return [base] + [f"{base}.{a.name}" for a in node.names]


def _imports(modules: dict[str, Path]):
    """(module-level imports, imports inside functions or classes' methods) per module, package only."""
    top: dict[str, set[str]] = {}
    inner: dict[str, list[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        top[name], inner[name] = set(), []
        nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = _resolve(node, name, is_package)
            if id(node) in nested:
                inner[name] += [t for t in targets if t.split(".")[0] == "robop_lightning"]
            else:
                top[name] |= {t for t in targets if t in modules}
    return top, inner


def _all_imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Every import (any package) at module level, for the Lightning rule."""
    out: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        out[name] = set()
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                out[name] |= set(_resolve(node, name, path.name == "__init__.py"))
    return out


def test_the_walk_sees_the_package():
    modules = _modules()
    top, _ = _imports(modules)
    assert {"robop_lightning.pipeline.prune", "robop_lightning.engine.layer", "robop_lightning.pipeline.shrink_step"} <= set(modules)
    assert "robop_lightning.engine.layer" in top["robop_lightning.pipeline.mask_step"]
    assert "robop_lightning.pipeline.mask_step" in top["robop_lightning.pipeline.prune"]


def test_the_engine_knows_nothing_of_the_pipeline_or_lightning():
    """Data flows one way: the layer engine imports neither the model pipeline nor the front ends."""
    modules = _modules()
    top, _ = _imports(modules)
    above = ("robop_lightning.pipeline", "robop_lightning.callback", "robop_lightning.cli", "robop_lightning.export",
             "robop_lightning.config")
    bad = {m: sorted(t for t in deps if t.startswith(above)) for m, deps in top.items()
           if m.startswith(("robop_lightning.engine", "robop_lightning.utils"))}
    assert not {m: d for m, d in bad.items() if d}, bad


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` (module -> the modules it imports) as ``[a, b, ..., a]``, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (cycle := visit(t)) is not None:
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)) is not None:
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"y"}}) == ["y", "y"]


def test_no_import_cycle():
    modules = _modules()
    top, _ = _imports(modules)
    # a package's __init__ re-exports its children: importing a child implies the parent, not a cycle
    graph = {m: {t for t in deps if not m.startswith(t + ".") and t != m} for m, deps in top.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_function_level_imports_of_the_package():
    _, inner = _imports(_modules())
    offenders = {m: sorted(set(t)) for m, t in inner.items() if t}
    assert not offenders, f"imports of robop_lightning inside functions: {offenders}"


def test_lightning_only_at_the_top():
    modules = _modules()
    everything = _all_imports(modules)
    top, _ = _imports(modules)
    uses = {m for m, deps in everything.items() if any(d.split(".")[0] == "lightning" for d in deps)}

    def allowed(m: str) -> bool:
        return any(m == a or m.startswith(a + ".") for a in LIGHTNING_OK)

    # direct importers, and every module that reaches one through the package
    reach = set(uses)
    changed = True
    while changed:
        changed = False
        for m, deps in top.items():
            if m not in reach and deps & reach:
                reach.add(m)
                changed = True
    bad = sorted(m for m in reach if not allowed(m))
    assert not bad, f"modules of the pruning chain that import Lightning: {bad}"


def test_no_module_is_over_about_500_lines():
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


# third-party distributions the core (`pip install robop-lightning`, no extras) declares, by import name
_CORE_IMPORTS = {"torch", "lightning", "safetensors", "tqdm", "numpy", "typing_extensions", "jsonargparse"}
# the evaluation wing, imported on use: its subpackages may also import their extras at module level
_WING = ("robop_lightning.models", "robop_lightning.data", "robop_lightning.robustness", "robop_lightning.assets")
_WING_IMPORTS = {"torchvision", "timm", "torchmetrics", "matplotlib", "transformers"}


def _in_wing(module: str) -> bool:
    return any(module == w or module.startswith(w + ".") for w in _WING)


def test_module_level_imports_need_only_the_core_dependencies():
    """`import robop_lightning` needs torch and Lightning (and the small core below) only: an optional
    package is imported inside the function that needs it, under `try: ... except ImportError`, or
    by the evaluation wing (models, data, robustness, assets), which the core never imports."""
    import sys

    stdlib = set(sys.stdlib_module_names)
    found: dict[str, list[str]] = {}
    for name, path in _modules().items():
        allowed = _CORE_IMPORTS | (_WING_IMPORTS if _in_wing(name) else set())
        tree = ast.parse(path.read_text(), filename=str(path))
        guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try)
                   if any(isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                          for h in t.handlers)
                   for n in ast.walk(t)}
        for node in tree.body if isinstance(tree, ast.Module) else []:
            for sub in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) else []:
                if isinstance(sub, (ast.Import, ast.ImportFrom)) and id(sub) not in guarded:
                    if isinstance(sub, ast.ImportFrom) and sub.level:
                        continue
                    for target in _resolve(sub, name, path.name == "__init__.py")[:1] if isinstance(
                            sub, ast.ImportFrom) else _resolve(sub, name, False):
                        top = target.split(".")[0]
                        if top not in stdlib and top not in ("robop_lightning", "__future__") and top not in allowed:
                            found.setdefault(name, []).append(top)
    assert not found, f"module-level imports of optional packages: {found}"
    pyproject = (ROOT.parent / "pyproject.toml").read_text()
    core = pyproject.split("dependencies = [", 1)[1].split("]", 1)[0]
    for dist in ("torch", "lightning", "safetensors", "tqdm", "numpy", "jsonargparse"):
        assert f'"{dist}' in core, dist
    for dist in ("timm", "torchvision", "transformers", "matplotlib", "torchmetrics"):
        assert f'"{dist}' not in core, f"{dist} belongs to an extra (the evaluation wing), not the core"


def test_the_core_never_imports_the_evaluation_wing():
    """No module outside the wing imports it at module level (directly or through another module),
    except the command line (`robop-prune` loads text and Hugging Face models by design)."""
    modules = _modules()
    top, _ = _imports(modules)
    entry = {"robop_lightning.cli", "robop_lightning.__main__"}
    bad = {m: sorted(t for t in deps if _in_wing(t)) for m, deps in top.items() if not _in_wing(m) and m not in entry}
    bad = {m: d for m, d in bad.items() if d}
    assert not bad, f"core modules importing the evaluation wing: {bad}"


def test_import_robop_lightning_loads_no_wing_subpackage():
    import subprocess
    import sys

    code = ("import sys, robop_lightning; print(sorted(m for m in sys.modules if m.startswith(("
            "'robop_lightning.models', 'robop_lightning.data', 'robop_lightning.robustness', "
            "'robop_lightning.assets', 'timm'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out


# single numerical kernels that read best whole (body lines without the docstring), with why
_LONG_KERNELS: dict[str, str] = {
    "robop_lightning.engine.solvers.alps.alps": "the ADMM iteration (penalty schedule, support tracking, restart) "
                                                "as one loop, step for step with the authors' procedure",
}
MAX_FUNCTION_LINES = 80


def test_no_function_over_about_80_lines():
    """Functions do one thing: no body (docstring excluded) over 80 lines unless it is a listed kernel."""
    long = {}
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body = node.body
            docstring = (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                         and isinstance(body[0].value.value, str) and len(body) > 1)
            start = body[1].lineno if docstring else body[0].lineno
            lines = node.end_lineno - start + 1
            if lines > MAX_FUNCTION_LINES and f"{name}.{node.name}" not in _LONG_KERNELS:
                long[f"{name}.{node.name}"] = lines
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
