"""The package keeps its layers: read from the source with ``ast``, never by importing it.

A stage imports only itself and the stages listed for it below (docs/architecture.md
draws the same picture). ``fm_seg_config`` (the model registry, at the top level) is a
stage of its own. Besides the directions, no two modules may import each other in a loop,
counting imports inside functions too, and an import of a mirage module inside a function
must say why (``deferred``: an optional or heavy dependency), never dodge a circle.
"""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Every stage and the stages it may import, from the ground up. The ground floor is also
# a stage: its modules may import one another (errors <- fileio <- checkpoint_io).
GROUND = {"mirage.errors", "mirage.fileio", "mirage.checkpoint_io", "mirage.workers",
          "mirage.argparsing", "mirage.units", "mirage.progress"}
ALLOWED = {
    "ground": set(),
    "data": {"ground"},
    "models": {"ground"},
    "registry": {"ground", "data", "models"},  # fm_seg_config.py
    "config": {"ground", "models"},  # the --output_adapter choices come from the registry
    "run": {"ground", "data", "models", "registry", "config"},
    "train": {"ground", "data", "models", "registry", "config", "run"},
    "evaluate": {"ground", "data", "config", "run"},
    "report": {"ground", "data", "config", "run", "evaluate"},
    "grid": {"ground", "config", "run"},
    "entry": {"ground", "data", "models", "registry", "config", "run", "train", "evaluate",
              "report", "grid"},  # mirage/cli.py, mirage/demo.py, mirage/report_cli.py
}
ENTRY = {"mirage.cli", "mirage.demo", "mirage.report_cli", "mirage.predict_cli",
         "mirage.prepare_cli"}


def stage_of(module):
    """The stage of a module name (``mirage.train.loop`` -> "train"), or None if outside."""
    if module == "fm_seg_config":
        return "registry"
    if module == "mirage":
        return "ground"  # the package's own __init__: no code
    if not module.startswith("mirage."):
        return None
    if module in GROUND:
        return "ground"
    if module in ENTRY:
        return "entry"
    if module in ("mirage.config", "mirage.option_checks", "mirage.options", "mirage.protocol"):
        return "config"
    part = module.split(".")[1]
    if part in ALLOWED:
        return part
    raise AssertionError(f"{module}: not in any stage; add it to tests/test_architecture.py")


def module_name(path):
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources():
    """{module name: source file} of mirage/ and fm_seg_config.py."""
    files = sorted((REPO / "mirage").rglob("*.py")) + [REPO / "fm_seg_config.py"]
    return {module_name(path): path for path in files}


def imports_of(path, known, module=None):
    """[(imported mirage module, line number, inside a function, source line)] of the file
    of ``module`` (default: the module ``path`` is).

    ``from mirage.run import folder`` imports ``mirage.run.folder``; ``from mirage.run
    import METRICS`` imports ``mirage.run``.
    """
    module = module or module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    lines = path.read_text(encoding="utf-8").splitlines()
    tree = ast.parse("\n".join(lines))
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            names = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - child.level + 1]
                                    + ([base] if base else []))
                names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                         for alias in child.names]
            for name in names:
                if stage_of(name) is not None:
                    found.append((name, child.lineno, in_function, lines[child.lineno - 1]))
            visit(child, inner)

    visit(tree, False)
    return found


def import_graph():
    known = sources()
    return {module: imports_of(path, known) for module, path in known.items()}


def layer_violations(graph):
    problems = []
    for module, imports in graph.items():
        stage = stage_of(module)
        for name, line, _, _ in imports:
            target = stage_of(name)
            if target != stage and target not in ALLOWED[stage]:
                problems.append(f"{module}:{line} ({stage}) imports {name} ({target})")
    return problems


def cycles(graph):
    """The import loops between modules (strongly connected components of 2+ modules, or a
    module importing itself), imports inside functions included."""
    edges = {m: sorted({name for name, *_ in imports if name in graph and name != m}
                       | ({m} if any(name == m for name, *_ in imports) else set()))
             for m, imports in graph.items()}
    index, low, stack, on_stack, loops = {}, {}, [], set(), []

    def connect(v):  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
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
            if len(component) > 1 or v in edges[v]:
                loops.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return loops


def undeclared_function_imports(graph):
    """Imports of mirage modules inside a function without a ``deferred`` reason on the
    line or the line above."""
    problems = []
    for module, imports in graph.items():
        lines = sources()[module].read_text(encoding="utf-8").splitlines()
        for name, line, in_function, text in imports:
            reason = text + (lines[line - 2] if line >= 2 else "")
            if in_function and "deferred" not in reason:
                problems.append(f"{module}:{line} imports {name} inside a function")
    return problems


def test_every_module_belongs_to_a_stage():
    for module in sources():
        assert stage_of(module) in ALLOWED, module


def test_no_stage_imports_a_stage_above_it():
    assert layer_violations(import_graph()) == []


def test_no_import_loops():
    assert cycles(import_graph()) == []


def test_imports_inside_functions_say_why():
    assert undeclared_function_imports(import_graph()) == []


@pytest.mark.parametrize("module, source, expected", [
    # the evaluate stage reaching up into the report stage
    ("mirage.evaluate.class_plan", "from mirage.report.htmlpage import table\n", "layers"),
    # the run stage reaching into training, inside a function without a reason
    ("mirage.run.folder", "def f():\n    from mirage.train.loop import train\n", "both"),
    # two modules of one stage importing each other (catalog imports folder)
    ("mirage.run.folder", "from mirage.run.catalog import read_run\n", "loop"),
])
def test_the_checks_catch_a_forbidden_import(tmp_path, module, source, expected):
    """Each check fails on an import it must refuse (added to a copy of the graph)."""
    graph = import_graph()
    path = tmp_path / "extra.py"
    path.write_text(source)
    extra = imports_of(path, sources(), module)
    graph[module] = graph[module] + extra
    layers, loops = layer_violations(graph), cycles(graph)
    undeclared = [name for name, _, inner, text in extra if inner and "deferred" not in text]
    if expected == "layers":
        assert layers and not loops
    elif expected == "both":
        assert layers and undeclared
    else:
        assert loops and not layers


# ----------------------------------------------------------------------------- typed options
OPTION_DICT_NAMES = ("config", "options", "c", "cfg")  # what the options dict is called
# The train stage's only reads of an options dict by string key, each of a stored dict:
# a first-version checkpoint's own config (its input size and decoder), and the dataset
# class table of a checkpoint that recorded no classes (the predictor's fallback).
TRAIN_OPTION_READS = {("mirage/train/checkpointing.py", "_legacy_meta"),
                      ("mirage/train/predictor.py", "checkpoint_classes")}


def option_reads(path, option_names):
    """[(function, option)] of every ``config["opt"]`` / ``spec.options.get("opt")`` read of
    an option by its string name in a source file."""
    def is_options(node):
        return (isinstance(node, ast.Name) and node.id in OPTION_DICT_NAMES) or \
            (isinstance(node, ast.Attribute) and node.attr == "options")

    found = []
    for function in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            key = None
            if isinstance(node, ast.Subscript) and is_options(node.value) and \
                    isinstance(node.slice, ast.Constant):
                key = node.slice.value
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr == "get" and is_options(node.func.value) and node.args \
                    and isinstance(node.args[0], ast.Constant):
                key = node.args[0].value
            if key in option_names:
                found.append((function.name, key))
    return found


def test_the_train_stage_takes_typed_specs_not_the_options_dict():
    """Options reach training as the typed sub-specs of mirage/run/spec.py; a string-key
    read there would find a misspelled option only when that line runs."""
    from mirage.options import OPTION_BY_NAME
    reads = {(str(path.relative_to(REPO)), function)
             for path in sorted((REPO / "mirage" / "train").rglob("*.py"))
             for function, _ in option_reads(path, set(OPTION_BY_NAME))}
    assert reads <= TRAIN_OPTION_READS, sorted(reads - TRAIN_OPTION_READS)


def test_the_checks_find_an_option_read(tmp_path):
    path = tmp_path / "step.py"
    path.write_text("def f(spec, config):\n    return config['lr'] + spec.options.get('seed')\n")
    assert sorted(option_reads(path, {"lr", "seed"})) == [("f", "lr"), ("f", "seed")]


def test_train_functions_take_few_parameters_and_modules_stay_short():
    """The loop's state travels in one context (mirage/train/context.py): no function of
    the train stage takes more than 5 parameters; no module of the package is over 500
    lines."""
    crowded = []
    for path in sorted((REPO / "mirage" / "train").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
                count = len(names) - (names[:1] in (["self"], ["cls"]))
                if count > 5:
                    crowded.append(f"{path.name}:{node.name} ({count})")
    assert crowded == []
    long = [f"{path.relative_to(REPO)} ({n})" for path in sources().values()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > 500]
    assert long == []
