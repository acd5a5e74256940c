"""The package's layout: no import circles (function-local imports count), a top level of
commands, and no file over 450 lines. Read from the source with `ast`, nothing imported."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "tdlm_jax"
MAX_LINES = 450
NOT_COMMANDS = {"__init__.py", "errors.py"}  # the only top-level modules without a __main__ entry


def modules(package: pathlib.Path) -> dict[str, pathlib.Path]:
    """{dotted module name: path} of every module of the package directory."""
    def name(path: pathlib.Path) -> str:
        parts = path.relative_to(package.parent).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    return {name(p): p for p in package.rglob("*.py")}


def imported_modules(this: str, path: pathlib.Path, known: dict[str, pathlib.Path]) -> set[str]:
    """The package's modules that `path` imports anywhere in its body: an imported name that
    is a module counts as that module; an imported function or class, as its module."""
    root = this.split(".")[0]
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target not in (this, root):
                found.add(target)
    return found


def import_circles(package: pathlib.Path) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan's algorithm)."""
    known = modules(package)
    graph = {name: imported_modules(name, path, known) for name, path in known.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return circles


def test_no_import_circles():
    assert import_circles(PACKAGE) == []


def test_the_check_sees_a_circle_closed_by_a_function_local_import(tmp_path):
    """A check that skipped lazy imports would pass on the circles this layout removed."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from ..a import g\n")
    (package / "c.py").write_text("import pkg.a\n")
    assert import_circles(package) == [["pkg.a", "pkg.sub.b"]]


def test_every_top_level_module_is_a_command():
    top = [p for p in PACKAGE.glob("*.py") if p.name not in NOT_COMMANDS]
    assert {p.name for p in top} == {"main.py", "sample.py", "evaluate.py", "report.py", "sweep.py", "bench.py"}
    assert all('if __name__ == "__main__":' in p.read_text() for p in top)


def test_no_file_is_over_the_line_cap():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in modules(PACKAGE).values()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}
