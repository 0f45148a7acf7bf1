"""The `calc` helper: exact arithmetic with a safe parser (no eval), bounded in size."""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable
from fractions import Fraction

from helpers.sdk import HelperError, HelperRequest, HelperResult, helper

MAX_EXPONENT = 1000
MAX_RESULT_BITS = 20_000  # about 6,000 decimal digits
_BINARY: dict[type[ast.operator], Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: lambda a, b: Fraction(a // b),
    ast.Mod: operator.mod,
}
_SYMBOLS = {"^": "**", "×": "*", "÷": "/", "−": "-", ",": ""}


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    if exponent.denominator != 1:
        raise HelperError("only whole-number powers are exact")
    if abs(exponent) > MAX_EXPONENT:
        raise HelperError(f"powers are limited to {MAX_EXPONENT}")
    bits = max(base.numerator.bit_length(), base.denominator.bit_length())
    if bits * abs(int(exponent)) > MAX_RESULT_BITS:
        raise HelperError("that number is too large to write out")
    if base == 0 and exponent < 0:
        raise HelperError("zero cannot be raised to a negative power")
    return Fraction(base) ** int(exponent)


def _evaluate(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return Fraction(str(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            return _power(left, right)
        operation = _BINARY.get(type(node.op))
        if operation is None:
            raise HelperError("only + - * / // % and ** are supported")
        if right == 0 and isinstance(node.op, ast.Div | ast.FloorDiv | ast.Mod):
            raise HelperError("division by zero")
        result = operation(left, right)
        if max(result.numerator.bit_length(), result.denominator.bit_length()) > MAX_RESULT_BITS:
            raise HelperError("that number is too large to write out")
        return result
    raise HelperError("use numbers, + - * / // % ** and parentheses only")


def _format(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    denominator = value.denominator
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    if denominator == 1:  # a terminating decimal: write it exactly
        digits = 0
        while (value * 10**digits).denominator != 1:
            digits += 1
        scaled = value * 10**digits
        sign = "-" if scaled < 0 else ""
        text = str(abs(scaled.numerator)).rjust(digits + 1, "0")
        return f"{sign}{text[:-digits]}.{text[-digits:]}"
    return f"{value.numerator}/{value.denominator} (≈ {float(value):.12g})"


def calculate(expression: str) -> str:
    """The exact value of an arithmetic expression, as text."""
    for symbol, replacement in _SYMBOLS.items():
        expression = expression.replace(symbol, replacement)
    expression = expression.strip().rstrip("=").strip()
    if not expression:
        raise HelperError("give me an expression, e.g. /calc (2+3)*4")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        raise HelperError("I could not read that expression") from None
    return _format(_evaluate(tree))


@helper(
    "calc",
    "Exact arithmetic: + - * / // % ** and parentheses, e.g. (2+3)*4 - 2**3.",
    capabilities=["math.eval"],
    time_limit=5,
    max_input_chars=500,
)
def calc(request: HelperRequest) -> HelperResult:
    """Evaluate the request's text exactly."""
    return HelperResult(text=calculate(request.text))
