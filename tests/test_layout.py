"""The code's shape: model/ modules import each other without a cycle, evaluation does not depend on training,
the model package never imports the benchmarks (bench/), and nothing points at files a user of the repository does
not have."""
import ast
import glob
import os
import subprocess
import sys

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


def test_model_package_never_imports_bench():
    # bench/ measures the model; a training or serving process must not load (or depend on) the benchmarks
    offenders = []
    for path in glob.glob(os.path.join(ROOT, "model", "*.py")):
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            offenders += [f"{os.path.basename(path)}: {name}" for name in names if name.split(".")[0] == "bench"]
    assert offenders == []


def test_data_process_starts_without_torch_and_the_model_still_loads_through_transformers(tmp_path):
    # data_process.py (the demo's corpus and packing steps) imports neither torch nor transformers: seconds per run
    probe = ("import runpy, sys; sys.argv = ['data_process.py', '--help']\n"
             "try:\n    runpy.run_path('data_process.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr
    # the package imports nothing by itself; the model's module registers it with transformers' Auto classes
    load = ("import model, model.chat, model.errors, model.data_formats, model.stages\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
            "from model.LMConfig import LMConfig\n"
            "from model.model import Transformer\n"
            "from transformers import AutoModelForCausalLM\n"
            "Transformer(LMConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64)).save_pretrained(sys.argv[1])\n"
            "print(type(AutoModelForCausalLM.from_pretrained(sys.argv[1])).__name__)")
    result = subprocess.run([sys.executable, "-c", "import sys\n" + load, str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.split() == ["[]", "Transformer"], result.stdout + result.stderr


def test_no_file_refers_to_a_design_document_users_do_not_have():
    tracked = [p for p in glob.glob(os.path.join(ROOT, "**", "*"), recursive=True)
               if os.path.isfile(p) and p.endswith((".py", ".md", ".txt", ".ini", ".json", ".html"))
               and "/.venv/" not in p and "/dataset/" not in p and "/out/" not in p]
    offenders = [os.path.relpath(p, ROOT) for p in tracked
                 if "DESIGN" + ".md" in open(p, encoding="utf-8", errors="replace").read()]
    assert offenders == []


def repo_python_files():
    return [p for p in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True)
            if "/.venv/" not in p and "/out/" not in p and "/dataset/" not in p]


def test_no_re_export_shims_in_the_model_package():
    # callers import a name from the module that owns it; an "as before" re-export hides who owns what
    offenders = [f"{os.path.relpath(p, ROOT)}:{n}" for p in glob.glob(os.path.join(ROOT, "model", "*.py"))
                 for n, line in enumerate(open(p, encoding="utf-8"), 1)
                 if line.lstrip().startswith("from ") and "noqa: F401" in line]
    assert offenders == []


def test_scripts_do_not_load_each_other():
    # stage scripts are entry points: what two of them share lives in model/, never in a script loaded by path
    offenders = [os.path.relpath(p, ROOT) for p in repo_python_files()
                 if "/tests/" not in p and ("spec_from_file_location" in open(p, encoding="utf-8").read())]
    assert offenders == []


def test_the_chat_format_is_rendered_in_one_module():
    # token ids of text are made in model/chat.py only (split_special_tokens keeps typed "<s>"/"</s>" as text),
    # and the template string lives there too
    chat = os.path.join(ROOT, "model", "chat.py")
    markers = ("split_special_tokens", "bos_token_id] +", "<s>{{ message", "add_special_tokens=False)")
    offenders = [f"{os.path.relpath(p, ROOT)}: {marker}" for p in repo_python_files() if p != chat
                 and "/tests/" not in p for marker in markers if marker in open(p, encoding="utf-8").read()]
    assert offenders == []


def test_every_stage_in_the_registry_has_its_script():
    from model.stages import STAGES
    for name, stage in STAGES.items():
        assert os.path.isfile(os.path.join(ROOT, stage.script)), name
        assert all(previous in STAGES for previous in stage.starts_from), name
