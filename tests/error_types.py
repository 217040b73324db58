"""The error ``type`` strings the code can emit, read from its source (so the README's list is tested against
the code rather than against a second hand-kept list).

Today an error type is either the ``type`` class attribute of an :class:`handler.errors.ExplainError`
subclass, or a ``type="..."`` keyword where such a class is raised. When the errors move into one module
of codes, re-point :func:`emitted_error_types` there; the tests that use it need not change.
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


def _dynamic_types() -> dict:
    """Types built at run time, by the file that builds them: the explainer's ``unknown_<registry>``."""
    from handler.engine.methods import METHODS
    from handler.engine.pathways import SELECTIONS
    from handler.engine.reduce import REDUCTIONS

    return {"engine/explainer.py": {f"unknown_{r.what.split()[-1]}": 400 for r in (METHODS, REDUCTIONS, SELECTIONS)}}


def emitted_error_types() -> dict:
    """``type`` -> HTTP status for every error the package can raise (the status a class or a call sets;
    400 when neither does)."""
    trees = _trees()
    classes = {}  # name -> (bases, class-level type, class-level status)
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                attrs = {}
                for stmt in node.body:
                    if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
                            and isinstance(stmt.value, ast.Constant)):
                        attrs[stmt.targets[0].id] = stmt.value.value
                classes[node.name] = ([_name(b) for b in node.bases], attrs.get("type"), attrs.get("status"))

    def is_error(name: str, seen=()) -> bool:
        if name == ROOT_ERROR:
            return True
        if name not in classes or name in seen:
            return False
        return any(is_error(base, seen + (name,)) for base in classes[name][0])

    def inherited(name: str, index: int):
        while name in classes:
            bases, *values = classes[name]
            if values[index - 1] is not None:
                return values[index - 1]
            name = next((b for b in bases if is_error(b)), "")
        return None

    errors = {name for name in classes if is_error(name)}
    types: dict = {}
    for name in errors:
        types.setdefault(inherited(name, 1), inherited(name, 2) or 400)
    dynamic_sites = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _name(node.func) in errors:
                keywords = {k.arg: k.value for k in node.keywords if isinstance(k.value, ast.Constant)}
                if any(k.arg == "type" and not isinstance(k.value, ast.Constant) for k in node.keywords):
                    dynamic_sites.append(str(path.relative_to(PACKAGE)))
                if "type" in keywords:
                    status = keywords["status"].value if "status" in keywords else inherited(_name(node.func), 2)
                    types.setdefault(keywords["type"].value, status or 400)
    known = _dynamic_types()
    if sorted(dynamic_sites) != sorted(known):
        raise AssertionError(f"error types built at run time in {dynamic_sites}; _dynamic_types() knows {list(known)}")
    for built in known.values():
        for type_, status in built.items():
            types.setdefault(type_, status)
    types.pop(None, None)
    return types


if __name__ == "__main__":
    for type_, status in sorted(emitted_error_types().items()):
        print(status, type_)
