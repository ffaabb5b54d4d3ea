"""The shape of the code: no import circles among the project's modules, and a config that loads
without torch. Imports inside functions count (a lazy import hides a circle, it does not remove
it); those under ``if TYPE_CHECKING:`` do not (they never run)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

from conftest import REPO

PACKAGES = ("components", "pipelines")


def project_modules() -> dict[str, ast.Module]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = ast.parse(path.read_text(), str(path))
    return modules


def runtime_imports(tree: ast.Module) -> set[str]:
    """Every module name an ``import`` or ``from ... import`` may load, outside TYPE_CHECKING blocks."""
    found, pending = set(), list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            pending += node.orelse
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        pending += list(ast.iter_child_nodes(node))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: {m for m in runtime_imports(tree) if m in modules and m != name} for name, tree in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_the_cycle_finder_finds_a_circle_and_only_that():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_type_checking_imports_do_not_count_and_lazy_ones_do():
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x\n"
                     "def f():\n    from y import z\n")
    assert runtime_imports(tree) == {"typing", "typing.TYPE_CHECKING", "y", "y.z"}


def test_no_import_circles_among_the_project_modules():
    assert cycles(import_graph()) == []


def test_loading_a_config_imports_no_torch():
    code = ("import sys; from pipelines.config import load_pipeline_config; "
            "load_pipeline_config('configs/pipeline/imagenet256.yaml'); print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


def step_cache_keys(preset: str) -> dict[str, str]:
    """Every step's cache key in ``configs/pipeline/<preset>.yaml``, upstream digests and source
    fingerprints held fixed, so that only the step's name, code version and config enter it."""
    import dataclasses

    from pipelines.config import load_pipeline_config
    from pipelines.latent_diffusion import build_workflow
    from pipelines.workflow import cache_key

    workflow = build_workflow(load_pipeline_config(REPO / "configs" / "pipeline" / f"{preset}.yaml"))
    return {s.name: cache_key(dataclasses.replace(s, fingerprint=None), {i: f"digest-of-{i}" for i in s.inputs})
            for s in workflow.steps}


def preset_cache_keys() -> dict[str, dict[str, str]]:
    """``step_cache_keys`` of the three presets."""
    return {preset: step_cache_keys(preset) for preset in ("smoke", "mnist", "imagenet256")}


def test_reshaping_the_code_keeps_the_presets_cache_keys():
    """A change of shape must not re-train what users have cached. tests/data/preset_cache_keys.json
    holds the keys as they were before the redesign of issue 16; a change that means to alter what
    a step writes bumps its CODE_VERSION and this file together, on purpose."""
    recorded = json.loads((REPO / "tests" / "data" / "preset_cache_keys.json").read_text())
    assert preset_cache_keys() == recorded


SIZED_FOLDERS = ("components", "pipelines", "benchmarks", "tests")
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 80


def oversized(folders: tuple[str, ...] = SIZED_FOLDERS) -> list[str]:
    """Every Python file over MAX_FILE_LINES lines and every function (or method) over
    MAX_FUNCTION_LINES (``def`` to its last line), as ``path: what``."""
    found = []
    for folder in folders:
        for path in sorted((REPO / folder).rglob("*.py")):
            name, text = path.relative_to(REPO).as_posix(), path.read_text()
            if (lines := len(text.splitlines())) > MAX_FILE_LINES:
                found.append(f"{name}: {lines} lines")
            for node in ast.walk(ast.parse(text, name)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    if (length := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES:
                        found.append(f"{name}:{node.lineno}: function {node.name} is {length} lines")
    return found


def test_the_size_finder_names_a_long_function(tmp_path, monkeypatch):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "long.py").write_text(f"def short():\n    pass\n\n\ndef long():\n{body}\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert oversized(("pkg",)) == [f"pkg/long.py:5: function long is {MAX_FUNCTION_LINES + 1} lines"]


def test_no_file_over_400_lines_and_no_function_over_80():
    """Files short enough to read in one sitting, functions short enough to hold in one's head."""
    assert oversized() == []
