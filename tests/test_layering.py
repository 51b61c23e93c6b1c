"""The import rule of docs/architecture.md: data flows one way, and no module reaches back up the chain."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mlpot"

# layer -> the mlpot layers it may import (besides itself); see docs/architecture.md
LEAVES = {"keys", "units", "dtypes", "files", "threads", "version"}
ALLOWED = {
    **{leaf: set() for leaf in LEAVES},
    "data": LEAVES,
    "nn": LEAVES,
    "models": LEAVES | {"nn"},
    "export": LEAVES | {"models", "nn", "data"},
    "checkpoint": LEAVES | {"models", "nn", "export"},
    "calculators": LEAVES | {"data", "export", "nn"},
    "train": LEAVES | {"data", "models", "nn", "export", "checkpoint"},
    "workflows": LEAVES | {"data", "calculators", "export", "models", "nn", "checkpoint"},
    "engines": LEAVES | {"data", "calculators", "export"},
    "study": LEAVES | {"data", "models", "nn", "export", "checkpoint", "train", "calculators", "workflows"},
    "cli": None,  # the command line may import everything; nothing imports it
    "commands": None,
    "__main__": None,
    "__init__": None,  # the package's public API re-exports
}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path):
    """Every mlpot module imported anywhere in the file (top level and inside functions)."""
    module = "mlpot." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    if module.endswith(".__init__"):
        module = module[: -len(".__init__")]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{module}: mlpot uses absolute imports only (line {node.lineno})"
            base = node.module or ""
            # `from mlpot import export` imports the module mlpot.export
            names = [f"{base}.{alias.name}" for alias in node.names] if base == "mlpot" else [base]
        else:
            continue
        for name in names:
            if name.startswith("mlpot.") or name == "mlpot":
                yield module, name


def _violations():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for module, imported in _imports(path):
            layer, target = _layer(module), _layer(imported)
            if target in ("cli", "commands", "__main__") and layer not in ("cli", "commands", "__main__", "study"):
                found.append(f"{module} imports the command line ({imported})")
                continue
            allowed = ALLOWED.get(layer, set())
            if allowed is None or target == layer or imported == "mlpot":
                continue
            if target not in allowed:
                found.append(f"{module} ({layer}) imports {imported} ({target})")
    return found


def test_every_module_belongs_to_a_layer():
    layers = {_layer("mlpot." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts)) for p in PACKAGE.rglob("*.py")}
    assert layers <= set(ALLOWED), f"modules outside the layer table: {sorted(layers - set(ALLOWED))}"


def test_imports_follow_the_data_flow():
    assert _violations() == []


def test_the_rule_catches_a_backwards_import(tmp_path, monkeypatch):
    """The checker itself must fail on a module that reaches back up the chain."""
    fake = tmp_path / "mlpot"
    (fake / "data").mkdir(parents=True)
    (fake / "data" / "bad.py").write_text("def f():\n    from mlpot.calculators import MLPotCalculator\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert _violations() == ["mlpot.data.bad (data) imports mlpot.calculators (calculators)"]
