"""The code stays readable (issue 21): no function of the pipeline longer than 80 lines (docstring included) or
taking more than 14 parameters. A function that grows past either is a sign that it holds two concerns, or that a
list of parameters wants to be one object (the requests and settings groups of ``tasks/validation/``)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dino_model", "tasks", "flows", "infra")
MAX_LINES = 80
MAX_PARAMETERS = 14


def _functions():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield f"{path.relative_to(ROOT)}:{node.lineno} {node.name}", node


def _parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    args = node.args
    named = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs if a.arg not in ("self", "cls")]
    return len(named) + (args.vararg is not None) + (args.kwarg is not None)


def test_functions_are_short_and_take_few_parameters():
    functions = list(_functions())
    assert len(functions) > 500  # the walk found the code
    too_long = [f"{where} ({node.end_lineno - node.lineno + 1} lines)" for where, node in functions
                if node.end_lineno - node.lineno + 1 > MAX_LINES]
    too_many = [f"{where} ({_parameters(node)} parameters)" for where, node in functions
                if _parameters(node) > MAX_PARAMETERS]
    assert not too_long, f"functions over {MAX_LINES} lines: {too_long}"
    assert not too_many, f"functions over {MAX_PARAMETERS} parameters: {too_many}"
