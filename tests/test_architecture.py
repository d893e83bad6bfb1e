"""The layout's rules, checked on the source: the import graph has no cycles, the serving side never
reaches into training, and serving works in a Python where torch cannot be imported."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "specformer_deploy"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str, top_level_only: bool) -> set[str]:
    """The project modules that ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] == "specformer_deploy")
    return found


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = {t for t in _imports(path, name, top_level_only) if t in modules and t != name}
        graph[name] = targets
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_checker_finds_cycles_and_relative_imports() -> None:
    """The checks below rest on these two helpers: make sure they can say no."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    graph = _graph(top_level_only=False)
    assert "specformer_deploy.serving.layer_bounds" in graph["specformer_deploy.serving.runtime"]


def test_module_import_graph_has_no_cycles() -> None:
    """Counting imports inside functions too: a lazy import still couples two modules."""
    assert _cycle(_graph(top_level_only=False)) is None


def test_serving_never_imports_training() -> None:
    graph = _graph(top_level_only=False)
    offenders = {m: sorted(t for t in targets if t.startswith("specformer_deploy.training"))
                 for m, targets in graph.items() if m.startswith("specformer_deploy.serving")}
    assert not {m: t for m, t in offenders.items() if t}, offenders


def _offenders(graph: dict[str, set[str]], importers: tuple[str, ...], forbidden: tuple[str, ...]) -> dict:
    found = {m: sorted(t for t in targets if t.startswith(forbidden))
             for m, targets in graph.items() if m.startswith(importers)}
    return {m: t for m, t in found.items() if t}


def test_robustness_composes_and_is_never_imported_from_below() -> None:
    """robustness/ composes attacks, training's data and serving's runtime into evaluations: nothing in
    training/ or serving/ may import it (lazily neither), and the attacks it composes sit below
    training, evaluation and serving alike."""
    graph = _graph(top_level_only=False)
    below = ("specformer_deploy.training", "specformer_deploy.serving", "specformer_deploy.model",
             "specformer_deploy.artifact", "specformer_deploy.attacks")
    assert not _offenders(graph, below, ("specformer_deploy.robustness",))
    assert not _offenders(graph, ("specformer_deploy.attacks",),
                          ("specformer_deploy.training", "specformer_deploy.serving", "specformer_deploy.artifact"))
    # the rule can say no: an upward import is found
    assert _offenders({"specformer_deploy.training.train": {"specformer_deploy.robustness.robust_accuracy"}}, below,
                      ("specformer_deploy.robustness",))


MAX_SERVING_CLASS_LINES = 150


def test_serving_classes_stay_small() -> None:
    """One small object owns the ONNX Runtime session and each kind of evidence is its own unit over
    it: no class in serving/ grows past MAX_SERVING_CLASS_LINES lines (docstrings included)."""
    sizes = {}
    for path in (PACKAGE / "serving").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                sizes[f"{path.name}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert "runtime.py:SpecformerRuntime" in sizes and "session.py:ModelSession" in sizes
    assert not {name: n for name, n in sizes.items() if n > MAX_SERVING_CLASS_LINES}


def test_serving_modules_import_without_torch() -> None:
    """Module-level imports only: torch may appear lazily inside the PGD probe."""
    blocked = ("torch", "torchvision", "timm")
    for path in (PACKAGE / "serving").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.split(".")[0] in blocked], f"{path.name} imports {names} at load"


_NO_TORCH = textwrap.dedent("""
    import importlib.abc, json, sys

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision", "timm"):
                raise ImportError(f"{name} is blocked: the serving side must not need it")
            return None

    sys.meta_path.insert(0, NoTorch())
    import numpy as np
    from specformer_deploy.serving.runtime import SpecformerRuntime
    from specformer_deploy.serving.request import parse_request

    runtime = SpecformerRuntime(sys.argv[1])
    body = json.dumps({"pixels": np.full((runtime.image_size, runtime.image_size), 0.5).tolist(), "delta0": 0.02})
    parsed = parse_request(body.encode(), {}, runtime.image_size, channels=runtime.channels)
    answer = runtime.answer(parsed.pixels[None], delta0=parsed.delta0)[0]
    assert "torch" not in sys.modules
    print(json.dumps(answer))
""")


@pytest.mark.slow
def test_a_certificate_is_served_where_torch_cannot_be_imported(exported_pair) -> None:
    onnx_path = str(exported_pair["msvp"]["onnx"])
    result = subprocess.run([sys.executable, "-c", _NO_TORCH, onnx_path], capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    layers = answer["attention_lipschitz"]["layers"]
    assert layers and all(layer["bound"] is not None and layer["bound"] > 0 for layer in layers)
    # The same numbers as the runtime gives in this (torch-importing) process.
    import numpy as np

    from specformer_deploy.serving.runtime import SpecformerRuntime

    runtime = SpecformerRuntime(onnx_path)
    pixels = np.full((1, *runtime.input_shape), 0.5, dtype=np.float32)
    expected = runtime.answer(pixels, delta0=0.02)[0]
    assert answer["prediction"]["label"] == expected["prediction"]["label"]
    expected_bounds = [lay["bound"] for lay in expected["attention_lipschitz"]["layers"]]
    assert [lay["bound"] for lay in layers] == pytest.approx(expected_bounds)
