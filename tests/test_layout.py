"""The package's imports, read from its source: no import loops, no library module importing a command-line module,
and the data flowing one way (lower rooms never import higher ones)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"nvg": ROOT / "nvg", "nvg.kernels": ROOT / "kernels"}

# rooms, lowest first: ops/kernels <- quantizer/structure <- tokenizer/model <- sample <- train/eval <- commands
ROOMS = [
    ("nvg", "nvg.ops", "nvg.kernels", "nvg._C"),
    ("nvg.quantizer", "nvg.structure", "nvg.categorical", "nvg.blocks", "nvg.data", "nvg.checkpoint"),
    ("nvg.tokenizer", "nvg.model", "nvg.prefix", "nvg.convert", "nvg.convert_generator", "nvg.baselines.var.model",
     "nvg.baselines.var.vqvae", "nvg.baselines.var.quant", "nvg.baselines.var.attention",
     "nvg.baselines.var.autoencoder", "nvg.baselines.var.convert", "nvg.baselines"),
    ("nvg.sample", "nvg.baselines.var.sample", "nvg.baselines.var.graphs", "nvg.baselines.var.sampler"),
    ("nvg.train", "nvg.eval", "nvg.baselines.var.train", "nvg.baselines.var.train_tokenizer", "nvg.demo"),
]


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("").parts
            name = ".".join((pkg, *rel))
            mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """nvg modules imported anywhere in the file (module level or inside functions)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                mod = ".".join(base[: len(base) - node.level + 1] + ([mod] if mod else []))
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known]
            # `from . import sibling` imports the sibling module (its package is already initialising)
            targets = subs if len(subs) == len(node.names) else [mod] + subs
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph():
    mods = _modules()
    return {n: _imports(n, p, set(mods)) for n, p in mods.items()}


def _is_cli(name: str) -> bool:
    return name.endswith(".__main__") or name == "nvg.cli"


def _room(name: str) -> int:
    if _is_cli(name):
        return len(ROOMS)
    best = None
    for i, room in enumerate(ROOMS):
        for prefix in room:
            inside = name == prefix or (prefix != "nvg" and name.startswith(prefix + "."))
            if inside and (best is None or len(prefix) > best[1]):
                best = (i, len(prefix))
    assert best is not None, f"{name} belongs to no room: add it to ROOMS"
    return best[0]


def test_no_import_loops():
    graph = _graph()
    state, loops = {}, []

    def visit(n, stack):
        state[n] = 1
        for m in graph[n]:
            if m not in graph or m == "nvg":  # the package __init__ (loads the compiled ops) is imported by all
                continue
            if state.get(m) == 1:
                loops.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m, stack + [m])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [n])
    assert not loops, loops


def test_library_never_imports_a_command_line_module():
    bad = [(n, m) for n, deps in _graph().items() if not _is_cli(n) for m in deps if _is_cli(m)]
    assert not bad, bad


def test_lower_rooms_never_import_higher_ones():
    bad = [(n, m) for n, deps in _graph().items() for m in deps if _room(m) > _room(n)]
    assert not bad, bad
