"""The code's shape: model/ modules import each other without a cycle, evaluation does not depend on training,
the bench scripts stand alone, and nothing points at files a user of the repository does not have."""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_imports():
    """{module: set of model/ modules it imports} for every model/*.py (absolute and relative imports)."""
    graph = {}
    for path in glob.glob(os.path.join(ROOT, "model", "*.py")):
        name = os.path.basename(path)[:-3]
        tree = ast.parse(open(path, encoding="utf-8").read())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level == 1 and module:
                    found.add(module.split(".")[0])
                elif node.level == 1:
                    found.update(alias.name for alias in node.names)
                elif module.startswith("model."):
                    found.add(module.split(".")[1])
        graph[name] = {m for m in found if os.path.isfile(os.path.join(ROOT, "model", m + ".py")) and m != name}
    return graph


def test_model_package_has_no_import_cycle():
    graph = model_imports()
    done, path = set(), []

    def visit(module):
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        path.append(module)
        for dependency in sorted(graph.get(module, ())):
            visit(dependency)
        path.pop()
        done.add(module)
    for module in sorted(graph):
        visit(module)


def test_evaluation_and_generation_do_not_depend_on_training():
    graph = model_imports()

    def reachable(module, seen=None):
        seen = set() if seen is None else seen
        for dependency in graph.get(module, ()):
            if dependency not in seen:
                seen.add(dependency)
                reachable(dependency, seen)
        return seen
    for module in ("evaluate", "generate", "checkpoint", "runtime"):
        assert "trainer" not in reachable(module), module


def test_no_file_refers_to_a_design_document_users_do_not_have():
    tracked = [p for p in glob.glob(os.path.join(ROOT, "**", "*"), recursive=True)
               if os.path.isfile(p) and p.endswith((".py", ".md", ".txt", ".ini", ".json", ".html"))
               and "/.venv/" not in p and "/dataset/" not in p and "/out/" not in p]
    offenders = [os.path.relpath(p, ROOT) for p in tracked
                 if "DESIGN" + ".md" in open(p, encoding="utf-8", errors="replace").read()]
    assert offenders == []
