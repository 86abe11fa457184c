"""The package's layers point down only (config -> data -> models -> teacher -> losses -> train -> eval): a lower
layer never imports a higher one, not even inside a function (that is how import cycles hide)."""

from __future__ import annotations

import ast
from pathlib import Path

import lmdistill

PACKAGE = Path(lmdistill.__file__).parent
# Each layer and the layers it must not import.
ABOVE = {"data": {"teacher", "train", "eval"}, "models": {"teacher", "train", "eval"},
         "teacher": {"train", "eval"}, "losses": {"data", "models", "teacher", "train", "eval"}}


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_no_layer_imports_a_layer_above_it():
    wrong = []
    for layer, above in ABOVE.items():
        for path in sorted((PACKAGE / layer).glob("*.py")):
            for module in _imported_modules(path):
                parts = module.split(".")
                if parts[0] == "lmdistill" and len(parts) > 1 and parts[1] in above:
                    wrong.append(f"{layer}/{path.name} imports {module}")
    assert not wrong, wrong
