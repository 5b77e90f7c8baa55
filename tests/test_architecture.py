"""The package's shape (docs/ARCHITECTURE.md), read with ast (no module is imported):
imports run one way (utils < core < workflows < apps < cli), no cycles, no module over 350
logical lines (networks.py mirrors the published networks), no function over 75 logical lines.

Sizes count logical lines (Python's NEWLINE tokens: one per statement, however the formatter
breaks it over physical lines; blank lines and comments do not count), so `ruff format` can
never push a module over its limit and a limit cannot be met by cramming lines together."""

import ast
import glob
import io
import os
import tokenize

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pfgmpp_fast")
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 350, 75  # logical lines
LONG_MODULES_ALLOWED = {"pfgmpp_fast.networks"}
LAYERS = {"utils": 0, "core": 1, "training": 2, "evaluation": 2, "apps": 3, "cli": 4}


def _modules():
    """{dotted name: path} of every module under pfgmpp_fast/ (the Triton kernels included)."""
    out = {}
    for dirpath, _, files in os.walk(ROOT, followlinks=True):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, f)
    return out


MODULES = _modules()


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("cli", "__main__"):
        return LAYERS["cli"] if len(parts) > 1 else LAYERS["core"]
    if parts[1] in ("utils", "training", "evaluation", "apps"):
        return LAYERS[parts[1]]
    return LAYERS["core"]  # root modules and the kernels


def _imports(module: str, path: str):
    """Package modules `module` imports anywhere (top level or inside functions)."""
    tree = ast.parse(open(path).read(), path)
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module and name != "pfgmpp_fast":
                found.add(name)
    return found


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def test_no_upward_imports():
    upward = [f"{m} -> {d}" for m, deps in GRAPH.items() for d in deps if _layer(d) > _layer(m)]
    assert not upward, "imports must run apps → workflows → core → utils:\n" + "\n".join(sorted(upward))


def test_workflows_do_not_import_each_other_except_training_data():
    cross = [
        f"{m} -> {d}"
        for m, deps in GRAPH.items()
        for d in deps
        if _layer(m) == _layer(d) == 2 and m.split(".")[1] != d.split(".")[1] and d != "pfgmpp_fast.training.data"
    ]
    assert not cross, "\n".join(sorted(cross))


def test_no_import_cycles():
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(GRAPH[m]):
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d) :] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_graph_is_read():
    """The scan sees the package (a broken walk would pass every test above vacuously)."""
    assert "pfgmpp_fast.ops" in GRAPH["pfgmpp_fast.loss"] and "pfgmpp_fast.checks" in GRAPH["pfgmpp_fast.reference"]
    assert _layer("pfgmpp_fast.apps.demo") > _layer("pfgmpp_fast.evaluation.generate") > _layer("pfgmpp_fast.ops")


def _logical_line_starts(source: str) -> list:
    """The physical line of each logical line's end (one NEWLINE token per statement)."""
    return [
        tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.NEWLINE
    ]


def _logical_lines(source: str, first: int = 1, last: float = float("inf")) -> int:
    return sum(first <= line <= last for line in _logical_line_starts(source))


def _long_functions(source: str) -> list:
    sizes = [
        (node.name, _logical_lines(source, node.lineno, node.end_lineno))
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    return [f"{name} ({n} logical lines)" for name, n in sizes if n > MAX_FUNCTION_LINES]


def test_logical_lines_ignore_line_breaks_inside_brackets():
    assert _logical_lines("x = f(\n    1,\n    2,\n)\n# note\n\ny = 3\n") == 2


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_and_function_sizes(module):
    source = open(MODULES[module]).read()
    lines = _logical_lines(source)
    if module not in LONG_MODULES_ALLOWED:
        assert lines <= MAX_MODULE_LINES, f"{module} has {lines} logical lines (> {MAX_MODULE_LINES}): split it"
    long = _long_functions(source)
    assert not long, f"{module}: functions over {MAX_FUNCTION_LINES} lines: {long}"


SCRIPTS = sorted(
    p for d in ("benchmarks", "scripts") for p in glob.glob(os.path.join(os.path.dirname(ROOT), d, "*.py"))
)


@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_benchmark_and_script_sizes(path):
    """The benchmarks and scripts keep the package's limits too."""
    source = open(path).read()
    assert _logical_lines(source) <= MAX_MODULE_LINES, f"{path}: split it"
    assert not _long_functions(source), f"{path}: functions over {MAX_FUNCTION_LINES} lines: {_long_functions(source)}"


def test_no_repeated_imports_inside_functions():
    """A name the module imports at the top is not imported again inside a function."""
    repeated = []
    for module, path in MODULES.items():
        tree = ast.parse(open(path).read())
        top = {
            (n.module, a.name) if isinstance(n, ast.ImportFrom) else (None, a.name)
            for n in tree.body
            if isinstance(n, (ast.Import, ast.ImportFrom))
            for a in n.names
        }
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for n in ast.walk(fn):
                    if isinstance(n, (ast.Import, ast.ImportFrom)):
                        for a in n.names:
                            if ((n.module if isinstance(n, ast.ImportFrom) else None), a.name) in top:
                                repeated.append(f"{module}.{fn.name}: {a.name}")
    assert not repeated, "\n".join(sorted(repeated))
