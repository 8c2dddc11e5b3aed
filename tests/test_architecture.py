"""The package's shape: no import circle, no import running back up a layer, and the commands that run after
training (eval, predict, report, compare) never ask which task a run is — the run's task answers them.

The import graph counts every ``import`` of a medtune module, also the ones inside functions: a lazy import still
makes two modules depend on each other."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first. A module may import its own layer and the layers below it, never a layer above.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("medtune.errors", "medtune.config", "medtune.atomic", "medtune.threads")),
    ("foundations", ("medtune.data", "medtune.metrics", "medtune.stats", "medtune.calibration", "medtune.losses",
                     "medtune.rewards", "medtune.policy", "medtune.answers", "medtune.text_policy",
                     "medtune.video_metrics")),
    ("models", ("medtune.models", "medtune.inference")),
    ("runs", ("medtune.runs",)),
    ("pages", ("medtune.report.page", "medtune.report.plots", "medtune.report.html", "medtune.report.answers",
               "medtune.report.compare", "medtune.report.video")),
    ("tasks", ("medtune.tasks",)),
    ("commands", ("medtune.train", "medtune.evaluate", "medtune.predict", "medtune.reporting", "medtune.report.cv",
                  "medtune.demo", "medtune.app")),
    ("cli", ("medtune.cli", "medtune", "medtune.report")),
]
# The commands after training: they dispatch through the run's task and must not test its kind themselves.
AFTER_TRAINING = ("medtune/evaluate.py", "medtune/predict.py", "medtune/reporting.py", "medtune/report/html.py",
                  "medtune/report/compare.py", "medtune/report/answers.py", "medtune/report/video.py")


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "medtune").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()

    def owner(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    keep = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(keep + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            graph[name] |= {owner(t) for t in targets if t.startswith("medtune")} - {name}
    return graph


def layer_of(module: str) -> int:
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_architecture.py: place it")
    return best[0]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_planted_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    assert cycles(import_graph()) == []


def test_no_import_runs_back_up_a_layer():
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
              for m, targets in sorted(import_graph().items()) for t in sorted(targets) if layer_of(t) > layer_of(m)]
    assert upward == []


@pytest.mark.parametrize("relative", AFTER_TRAINING)
def test_commands_after_training_do_not_branch_on_the_task(relative):
    from medtune.tasks import TASKS

    tree = ast.parse((SRC / relative).read_text())
    asks = [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr == "task_kind"]
    compares = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Compare)
                and any(isinstance(c, ast.Constant) and c.value in TASKS for c in [node.left, *node.comparators])]
    assert not asks and not compares, f"{relative} branches on the task kind at lines {asks + compares}"


def test_every_task_answers_every_command():
    from medtune.tasks import TASKS, task_named

    for kind in TASKS:
        task = task_named(kind)
        assert task.name == kind
        for hook in ("evaluate_run", "format_summary", "predict", "write_report", "compare", "predict_image",
                     "prompt_option"):
            assert callable(getattr(task, hook)), f"task {kind} lacks {hook}"
