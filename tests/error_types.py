"""The error codes (the ``type`` of an HTTP error body) the code can emit, read from its source, so the README's
list is tested against the code rather than against a second hand-kept list.

A code is the ``code`` class attribute of a :class:`handler.errors.ExplainError` subclass, a ``code="..."``
keyword where such an error is raised, an ``err.code = "..."`` assignment, or the code a
:class:`handler.engine.registry.Registry` gives an unknown name. The HTTP status of each comes from the serving
layer's one table (:data:`handler.serving.responses.STATUS`).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "handler"
ROOT_ERROR = "ExplainError"


def _trees() -> dict:
    return {path: ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.rglob("*.py"))}


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def emitted_error_codes() -> set:
    trees = _trees()
    classes = {}  # name -> (bases, class-level code)
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                code = None
                for stmt in node.body:
                    if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
                            and stmt.targets[0].id == "code" and isinstance(stmt.value, ast.Constant)):
                        code = stmt.value.value
                classes[node.name] = ([_name(b) for b in node.bases], code)

    def is_error(name: str, seen=()) -> bool:
        if name == ROOT_ERROR:
            return True
        if name not in classes or name in seen:
            return False
        return any(is_error(base, seen + (name,)) for base in classes[name][0])

    codes = {code for name, (_, code) in classes.items() if code is not None and is_error(name)}
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                if _name(node.func) in classes and is_error(_name(node.func)):
                    codes.update(k.value.value for k in node.keywords
                                 if k.arg == "code" and isinstance(k.value, ast.Constant))
                if _name(node.func) == "Registry" and len(node.args) == 2 and isinstance(node.args[1], ast.Constant):
                    codes.add(node.args[1].value)
            elif (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Attribute)
                  and node.targets[0].attr == "code" and isinstance(node.value, ast.Constant)):
                codes.add(node.value.value)
    return codes


def emitted_error_types() -> dict:
    """Error code -> HTTP status for every error the package can raise."""
    from handler.serving.responses import http_status
    from handler.errors import ExplainError

    return {code: http_status(ExplainError("", code=code)) for code in emitted_error_codes()}


if __name__ == "__main__":
    for type_, status in sorted(emitted_error_types().items()):
        print(status, type_)
