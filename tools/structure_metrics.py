"""Structure figures of a checkout (docs/BENCHMARKS.md, "structure"): modules at the package root, the largest
modules and functions, and the import cycles between modules (grimp, function-level imports included).

    python tools/structure_metrics.py [CHECKOUT]      # default: this checkout
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def strongly_connected(graph) -> list[list[str]]:
    """Tarjan's components of more than one module in grimp's import graph."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def main() -> None:
    import grimp  # import-linter's graph library (the test extra)

    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]).resolve()
    package = root / "onnxprune"
    files = sorted(package.rglob("*.py"))
    sizes = sorted(((len(p.read_text().splitlines()), p.relative_to(root).as_posix()) for p in files), reverse=True)
    functions = sorted(((n.end_lineno - n.lineno + 1, f"{p.relative_to(root).as_posix()}:{n.name}")
                        for p in files for n in ast.walk(ast.parse(p.read_text()))
                        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), reverse=True)
    sys.path.insert(0, str(root))
    cycles = strongly_connected(grimp.build_graph("onnxprune"))
    print(f"modules: {len(files)}; at the package root: {len([p for p in package.glob('*.py') if p.name != '__init__.py'])}")
    print("largest modules:", ", ".join(f"{name} {n}" for n, name in sizes[:3]))
    print("largest functions:", ", ".join(f"{name} {n}" for n, name in functions[:3]))
    print("import cycles:", cycles or "none")


if __name__ == "__main__":
    main()
