"""Verifiable rewards and their registry: math final answers, format, exact match.

A reward is ``fn(response, reference, **args) -> float``. Workflows pick one by name (``workflow.reward``, with
``workflow.rewardArgs``); a taskset row may name its own under ``taskset.rewardKey``. A judge model's score is the
``judge`` workflow's, since it needs a model call (``explorer.workflows``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Any

NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")
FRACTION = re.compile(r"^(-?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")  # \frac{a}{b}, \dfrac, \tfrac
BOXED_OPENERS = ("\\boxed{", "\\fbox{")

Reward = Callable[..., float]


def boxed_values(text: str) -> list[str]:
    """The contents of every ``\\boxed{...}`` in ``text``, braces matched (``\\boxed{\\frac{1}{4}}`` is whole)."""
    values: list[str] = []
    start = 0
    while True:
        found = [(i, opener) for opener in BOXED_OPENERS if (i := text.find(opener, start)) >= 0]
        if not found:
            return values
        index, opener = min(found)
        depth, cursor = 1, index + len(opener)
        while cursor < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[cursor], 0)
            cursor += 1
        if depth:  # unbalanced: no value
            return values
        values.append(text[index + len(opener) : cursor - 1])
        start = cursor


def extract_answer(text: str) -> str | None:
    """The final answer in a response: the last ``\\boxed{}`` value if present, else the last number."""
    boxed = boxed_values(text)
    if boxed:
        return boxed[-1].strip()
    numbers = NUMBER.findall(text.replace(",", ""))
    return str(numbers[-1]) if numbers else None


def as_number(value: str) -> Fraction | None:
    """``value`` as an exact number: integers, decimals, ``a/b``, ``\\frac{a}{b}`` (also ``\\dfrac``), a trailing
    ``%`` or ``$`` and LaTeX spacing ignored; None when it is not a number."""
    text = value.strip().replace(",", "").replace("\\!", "").replace("$", "").replace(" ", "")
    text = text.removeprefix("\\left(").removesuffix("\\right)")
    percent = text.endswith("%") or text.endswith("\\%")
    text = text.removesuffix("\\%").removesuffix("%")
    match = FRACTION.match(text)
    try:
        if match:
            sign, top, bottom = match.groups()
            number = Fraction(top) / Fraction(bottom) * (-1 if sign else 1)
        else:
            number = Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None
    return number / 100 if percent else number


def math_reward(response: str, reference: str) -> float:
    """1.0 when the response's final answer equals the reference (numerically, else as text), else 0.0."""
    answer = extract_answer(response)
    if answer is None:
        return 0.0
    expected = reference_answer(reference)
    got, want = as_number(answer), as_number(expected)
    if got is not None and want is not None:
        return 1.0 if got == want else 0.0
    return 1.0 if _normal(answer) == _normal(expected) else 0.0


def reference_answer(reference: str) -> str:
    """The answer a reference holds: its last ``\\boxed{}`` value, the reference itself when it is a number (``\\frac``
    included), what follows GSM8K's ``####``, else its last number (else the text)."""
    boxed = boxed_values(reference)
    if boxed:
        return boxed[-1].strip()
    if as_number(reference) is not None:
        return reference.strip()
    if "####" in reference:
        return reference.rsplit("####", 1)[1].strip()
    return extract_answer(reference) or reference.strip()


def _normal(text: str) -> str:
    return re.sub(r"\s+", "", text).removeprefix("\\text{").removesuffix("}")


def exact_match_reward(response: str, reference: str, *, ignore_case: bool = False) -> float:
    """1.0 when the response, stripped, is the reference (stripped; case-folded with ``ignore_case``)."""
    got, want = response.strip(), reference.strip()
    if ignore_case:
        got, want = got.casefold(), want.casefold()
    return 1.0 if got == want else 0.0


def format_reward(response: str, reference: str = "", *, pattern: str = r"\\boxed\{") -> float:
    """1.0 when ``pattern`` (a regular expression; default: a ``\\boxed{}`` answer) occurs in the response."""
    return 1.0 if re.search(pattern, response, flags=re.DOTALL) else 0.0


def math_and_format_reward(response: str, reference: str, *, format_weight: float = 0.1) -> float:
    """The math reward, plus ``format_weight`` for a boxed answer (a common shaping for small models)."""
    return math_reward(response, reference) + format_weight * format_reward(response)


REWARDS: Mapping[str, Reward] = {
    "math": math_reward,
    "exact_match": exact_match_reward,
    "format": format_reward,
    "math_and_format": math_and_format_reward,
}


def reward_names() -> list[str]:
    return sorted(REWARDS)


def resolve(name: str, args: Mapping[str, Any] | None = None) -> Callable[[str, str], float]:
    """The reward ``name`` with its keyword ``args`` bound; a clear error naming the known ones otherwise."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(reward_names())}")
    fn, bound = REWARDS[name], dict(args or {})

    def reward(response: str, reference: str) -> float:
        return float(fn(response, reference, **bound))

    return reward
