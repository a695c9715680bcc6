"""The ``tool_use`` workflow's calculator tool: its OpenAI tool schema and a safe evaluator of model-written input.

The expression comes from the model, so it is parsed, never executed: numbers, + - * / // % ** and parentheses only,
with bounded sizes (a model cannot make the coordinator compute 9**9**9).
"""

from __future__ import annotations

import ast
import json
import operator
from collections.abc import Callable
from fractions import Fraction
from typing import Any

NAME = "calculator"
MAX_EXPRESSION = 200
MAX_EXPONENT = 64
MAX_MAGNITUDE = 10**30
TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": NAME,
        "description": "Evaluate an arithmetic expression (+ - * / // % ** and parentheses) exactly.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "pattern": r"^[0-9+*/%(). -]{1,64}$"}},
            "required": ["expression"],
        },
    },
}
FORCED: dict[str, Any] = {"type": "function", "function": {"name": NAME}}

BINARY: dict[type[ast.operator], Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: lambda a, b: Fraction(a // b), ast.Mod: operator.mod,
}  # fmt: skip


def _value(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return Fraction(str(node.value))  # 0.1 is 1/10, not the binary float's fraction
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _value(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        base, exponent = _value(node.left), _value(node.right)
        if exponent.denominator != 1 or abs(exponent) > MAX_EXPONENT:
            raise ValueError(f"exponents must be integers of at most {MAX_EXPONENT}")
        return _bounded(base**exponent.numerator)
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        return _bounded(BINARY[type(node.op)](_value(node.left), _value(node.right)))
    raise ValueError(f"unsupported syntax: {type(node).__name__}")


def _bounded(value: Fraction) -> Fraction:
    if abs(value) > MAX_MAGNITUDE or value.denominator > MAX_MAGNITUDE:
        raise ValueError("the result is too large")
    return value


def evaluate(expression: str) -> str:
    """The exact value of ``expression`` as text (an integer, or a fraction ``a/b``); ValueError if it is not one."""
    if len(expression) > MAX_EXPRESSION:
        raise ValueError(f"expressions are at most {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as err:
        raise ValueError(f"not an arithmetic expression: {err.msg}") from None
    try:
        return str(_value(tree.body))
    except ZeroDivisionError:
        raise ValueError("division by zero") from None


def call(function: Any) -> str:
    """The tool message's content for one tool call (``function``: its name and JSON arguments): the result, or an
    error the model can read; never raises on bad model output."""
    name = getattr(function, "name", None)
    if name != NAME:
        return f"error: unknown tool {name!r}; the only tool is {NAME}"
    try:
        arguments = json.loads(getattr(function, "arguments", "") or "{}")
        expression = arguments["expression"] if isinstance(arguments, dict) else None
        if not isinstance(expression, str):
            return 'error: arguments must be {"expression": "<arithmetic>"}'
        return evaluate(expression)
    except (json.JSONDecodeError, KeyError):
        return 'error: arguments must be JSON: {"expression": "<arithmetic>"}'
    except ValueError as err:
        return f"error: {err}"
