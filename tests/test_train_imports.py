"""The package's imports go one way: no module of ``dcal`` reaches itself through its imports,
counting imports inside functions too (a lazy import is still a dependency)."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def module_graph(package_dir, package):
    """{module: set of package modules it imports}, read from the source (nothing imported)."""
    mods = {}
    for dirpath, _, files in os.walk(package_dir):
        if os.path.islink(dirpath) or "__pycache__" in dirpath:
            continue
        for fn in files:
            if fn.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, fn), os.path.dirname(package_dir))[:-3]
                name = rel.replace(os.sep, ".")
                mods[name[: -len(".__init__")] if name.endswith(".__init__") else name] = os.path.join(dirpath, fn)
    graph = {}
    for name, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        base = name.split(".") if is_pkg else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(open(path).read())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level:
                    mod = ".".join(base[: len(base) - node.level + 1] + ([mod] if mod else []))
                # ``from pkg import sub`` depends on pkg.sub; ``from mod import name`` on mod
                subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in mods]
                targets = subs + ([mod] if len(subs) < len(node.names) else [])
            for t in targets:
                # a module depends on the deepest package module named, not on the package's parents
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                # a package's own parents are initialised before it, whatever it imports
                if t and t != name and t.startswith(package) and not name.startswith(t + "."):
                    deps.add(t)
        graph[name] = deps
    return graph


def find_cycle(graph):
    colour, stack = {}, []

    def visit(n):
        colour[n] = "grey"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if colour.get(m) == "grey":
                return stack[stack.index(m):] + [m]
            if m not in colour:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        colour[n] = "black"
        return None

    for n in sorted(graph):
        if n not in colour:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycle_in_dcal():
    graph = module_graph(os.path.join(ROOT, "dcal"), "dcal")
    # memory measurement sits below both the loop and the micro-batch search
    assert "dcal.train.memory" in graph["dcal.train.autobatch"]
    assert "dcal.train.trainer" not in graph["dcal.train.autobatch"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
