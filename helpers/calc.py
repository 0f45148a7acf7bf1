"""The `calc` helper: exact arithmetic with a safe parser (no eval), bounded in size.

Every value is an exact fraction whose numerator and denominator have at most
MAX_DIGITS decimal digits. The bound is checked *before* the work that could
exceed it: a power's size is estimated from its base and exponent, and a
terminating decimal's length from its denominator, so no expression of the
500 characters accepted makes the helper compute or print a huge number.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from fractions import Fraction

from helpers.sdk import HelperError, HelperRequest, HelperResult, helper

MAX_EXPONENT = 1000
MAX_DIGITS = 1000  # of a numerator or a denominator, and of a written answer
# A number of this many bits has at most MAX_DIGITS decimal digits.
MAX_BITS = int(MAX_DIGITS / math.log10(2))
TOO_LARGE = f"that number is too large to write out (more than {MAX_DIGITS} digits)"
_BINARY: dict[type[ast.operator], Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: lambda a, b: Fraction(a // b),
    ast.Mod: operator.mod,
}
_SYMBOLS = {"^": "**", "×": "*", "÷": "/", "−": "-", ",": ""}


def _bits(value: Fraction) -> int:
    return max(value.numerator.bit_length(), value.denominator.bit_length())


def _bounded(value: Fraction) -> Fraction:
    if _bits(value) > MAX_BITS:
        raise HelperError(TOO_LARGE)
    return value


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    if exponent.denominator != 1:
        raise HelperError("only whole-number powers are exact")
    if abs(exponent) > MAX_EXPONENT:
        raise HelperError(f"powers are limited to {MAX_EXPONENT}")
    if base == 0 and exponent < 0:
        raise HelperError("zero cannot be raised to a negative power")
    # The result has about bits(base) * |exponent| bits: refuse before computing it.
    if (_bits(base) - 1) * abs(int(exponent)) > MAX_BITS:
        raise HelperError(TOO_LARGE)
    return _bounded(base ** int(exponent))


def _constant(value: object) -> Fraction:
    if type(value) not in (int, float):
        raise HelperError("use numbers, + - * / // % ** and parentheses only")
    if isinstance(value, float) and not math.isfinite(value):
        raise HelperError(TOO_LARGE)
    return _bounded(Fraction(str(value)))


def _evaluate(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant):
        return _constant(node.value)
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
        # Operands of at most MAX_BITS bits: one operation is cheap, then bounded again.
        return _bounded(operation(left, right))
    raise HelperError("use numbers, + - * / // % ** and parentheses only")


def _decimal_places(denominator: int) -> int | None:
    """Digits after the point of n/denominator in lowest terms; None when it never ends."""
    twos = (denominator & -denominator).bit_length() - 1
    rest, fives = denominator >> twos, 0
    while rest % 5 == 0:  # at most MAX_BITS / 2.3 steps
        rest //= 5
        fives += 1
    return max(twos, fives) if rest == 1 else None


def _approximately(value: Fraction) -> str:
    """About 12 significant digits; beyond a float's range, computed with integers."""
    if value == 0:
        return "0"
    try:
        as_float = float(value)
    except OverflowError:
        as_float = math.inf
    if 1e-300 < abs(as_float) < 1e300:
        return f"{as_float:.12g}"
    numerator, denominator = abs(value.numerator), value.denominator
    # Within one of log10(|value|): the quotient below has 13 to 16 digits.
    exponent = math.floor((numerator.bit_length() - denominator.bit_length()) * math.log10(2))
    shift = 14 - exponent
    if shift >= 0:
        scaled = numerator * 10**shift // denominator
    else:
        scaled = numerator // (denominator * 10**-shift)
    digits = str(scaled)
    power = len(digits) - 1 - shift
    kept = int(digits[:12]) + (digits[12] >= "5")  # rounded to 12 significant digits
    if kept == 10**12:
        kept, power = kept // 10, power + 1
    mantissa = f"{str(kept)[0]}.{str(kept)[1:]}".rstrip("0").rstrip(".")
    sign = "-" if value < 0 else ""
    return f"{sign}{mantissa}e{power:+d}"


def _format(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)  # at most MAX_DIGITS digits
    places = _decimal_places(value.denominator)
    whole = len(str(abs(value.numerator) // value.denominator))
    if places is not None and whole + places <= MAX_DIGITS:  # a terminating decimal: exact
        scaled = abs(value.numerator) * (10**places // value.denominator)
        sign = "-" if value < 0 else ""
        text = str(scaled).rjust(places + 1, "0")
        return f"{sign}{text[:-places]}.{text[-places:]}"
    return f"{value.numerator}/{value.denominator} (≈ {_approximately(value)})"


def calculate(expression: str) -> str:
    """The exact value of an arithmetic expression, as text."""
    for symbol, replacement in _SYMBOLS.items():
        expression = expression.replace(symbol, replacement)
    expression = expression.strip().rstrip("=").strip()
    if not expression:
        raise HelperError("give me an expression, e.g. /calc (2+3)*4")
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise HelperError("I could not read that expression") from None
    try:
        return _format(_evaluate(tree))
    except RecursionError:
        raise HelperError("that expression is nested too deeply") from None


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
