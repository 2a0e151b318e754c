"""The package's import graph, read from the source (ast, every import statement, module level or
inside a function): no circles, data flows one way (docs/design.md, code layout: dcal.train -> dcal.models ->
dcal.nn -> dcal.ops -> backends), kernel files depend on torch and triton only, and production
code never imports test, benchmark or verification code."""

from __future__ import annotations

import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Floors, lowest first: a module may import its own floor and the ones below it.
FLOORS = ["dcal.kernels", "dcal._ext", "dcal.ops", "dcal.nn", "dcal.models", "dcal.train"]
TOOLING = ("dcal.testing", "dcal.check")  # may import everything; nothing in the floors imports them


def _modules():
    """module name -> source path, for dcal/ and kernels/ (installed as dcal.kernels)."""
    mods = {}
    for base, prefix in ((ROOT / "dcal", "dcal"), (ROOT / "kernels", "dcal.kernels")):
        for path in base.rglob("*.py"):
            if "kernels" in path.relative_to(base).parts and prefix == "dcal":
                continue  # a dcal/kernels link to ../kernels in a work tree
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([prefix] + parts)] = path
    return mods


def _imports(name, path, mods):
    """Names of the dcal modules that ``name`` imports, and the external top-level packages."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    inner, outer = set(), set()

    def add(target):
        if target == "dcal._C":  # the compiled extension: a leaf
            inner.add(target)
        elif target.split(".")[0] == "dcal":
            while target not in mods and "." in target:
                target = target.rsplit(".", 1)[0]
            inner.add(target)
        else:
            outer.add(target.split(".")[0])

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module
            for a in node.names:
                full = f"{mod}.{a.name}"
                add(full if full in mods or full == "dcal._C" else mod)
    inner.discard(name)
    return inner, outer


def _graph():
    mods = _modules()
    return mods, {n: _imports(n, p, mods) for n, p in mods.items()}


def _floor(name):
    for i, f in reversed(list(enumerate(FLOORS))):
        if name == f or name.startswith(f + "."):
            return i
    return None


def test_no_import_circle():
    mods, graph = _graph()
    edges = {n: sorted(inner) for n, (inner, _) in graph.items()}
    # Tarjan's strongly connected components
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, []):
            if w not in index:
                visit(w)
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
            comps.append(comp)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    # a package importing its own submodules (its __init__ re-exporting them) is not a circle
    circles = [c for c in comps if len(c) > 1 and not _only_package_reexports(c, edges)]
    assert not circles, f"import circles: {circles}"
    # memory measurement sits below both the training loop and the micro-batch search
    assert "dcal.train.memory" in edges["dcal.train.autobatch"]
    assert "dcal.train.trainer" not in edges["dcal.train.autobatch"]


def test_circle_finder_sees_a_circle(monkeypatch, tmp_path):
    # the finder itself: a two-module circle written to a scratch package is reported
    pkg = tmp_path / "dcal"
    (pkg / "train").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "train" / "__init__.py").write_text("")
    (pkg / "train" / "a.py").write_text("from dcal.train import b\n")
    (pkg / "train" / "b.py").write_text("def f():\n    from dcal.train.a import x\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    mods, graph = _graph()
    assert "dcal.train.b" in graph["dcal.train.a"][0] and "dcal.train.a" in graph["dcal.train.b"][0]


def _only_package_reexports(comp, edges):
    """A component held together only by ``pkg/__init__`` -> ``pkg.sub`` edges and ``pkg.sub`` ->
    ``pkg`` edges that name the package itself is what `from pkg import x` in a sibling does."""
    sub = {v: [w for w in edges[v] if w in comp] for v in comp}
    for v, ws in sub.items():
        for w in ws:
            if not (w.startswith(v + ".") or v.startswith(w + ".")):
                return False
    return True


def test_one_way_floors():
    _, graph = _graph()
    bad = []
    for name, (inner, _) in graph.items():
        fl = _floor(name)
        if fl is None or name.startswith(TOOLING):
            continue
        for dep in inner:
            if dep.startswith(TOOLING):
                bad.append(f"{name} -> {dep} (production code imports verification code)")
                continue
            dfl = _floor(dep)
            if dfl is not None and dfl > fl:
                bad.append(f"{name} -> {dep} (imports upward: {FLOORS[fl]} below {FLOORS[dfl]})")
    assert not bad, "\n".join(sorted(bad))


def test_kernel_files_depend_on_torch_and_triton_only():
    _, graph = _graph()
    bad = []
    allowed_outer = {"torch", "triton"} | set(sys.stdlib_module_names)
    for name, (inner, outer) in graph.items():
        if not name.startswith("dcal.kernels"):
            continue
        bad += [f"{name} -> {d}" for d in inner if not d.startswith("dcal.kernels")]
        bad += [f"{name} -> {d}" for d in outer - allowed_outer]
    assert not bad, "kernel files import beyond torch/triton: " + ", ".join(sorted(bad))


def test_production_code_never_imports_tests_or_bench():
    _, graph = _graph()
    bad = [
        f"{n} -> {d}"
        for n, (_, outer) in graph.items()
        for d in outer
        if d in ("tests", "bench", "pytest") and not n.startswith(TOOLING)
    ]
    assert not bad, bad
