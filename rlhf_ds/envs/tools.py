"""Tools a multi-turn environment runs for the policy, and the tag format of a call.

Format (documented in docs/rl.md): the model calls a tool by writing `<tool>NAME: ARGUMENTS</tool>` in its turn (the
first complete tag counts); the environment answers `<result>TEXT</result>`. Every failure -- a malformed call, an
unknown tool, a tool that raises or runs past its timeout -- becomes such an answer saying what went wrong, with its
`ToolOutcome.status`, so the episode goes on and the rollout counts the event; nothing here raises.

A tool is a function `str -> str` registered in TOOLS (`@TOOLS.register("name")`); built in: `calculator`.
"""
from __future__ import annotations

import ast
import operator
import re
import threading
from dataclasses import dataclass
from typing import Optional

from rlhf_ds.registry import Registry

TOOLS = Registry("tool")  # name -> function(arguments: str) -> result text

CALL = re.compile(r"<tool>(.*?)</tool>", re.DOTALL)
OPEN = "<tool>"
STATUSES = ("ok", "malformed", "unknown_tool", "error", "timeout")


@dataclass
class ToolOutcome:
    status: str  # one of STATUSES
    observation: str  # the `<result>...</result>` text the environment appends


def result_text(text: str) -> str:
    return f"<result>{text}</result>"


def find_call(turn: str) -> Optional[tuple[str, str] | str]:
    """(name, arguments) of the turn's first tool call, None when the turn calls no tool, or a string saying why the
    call is malformed (an opened tag never closed, no "name:" inside)."""
    match = CALL.search(turn)
    if match is None:
        return "a <tool> tag that is never closed with </tool>" if OPEN in turn else None
    name, sep, arguments = match.group(1).partition(":")
    if not sep or not name.strip():
        return "expected <tool>NAME: ARGUMENTS</tool>"
    return name.strip(), arguments.strip()


def run_call(call: tuple[str, str] | str, tools: list[str], timeout_s: float) -> ToolOutcome:
    """Run a call `find_call` found, among the tools this environment allows, within `timeout_s` seconds."""
    if isinstance(call, str):
        return ToolOutcome("malformed", result_text(f"error: malformed tool call: {call}"))
    name, arguments = call
    if name not in tools:
        return ToolOutcome("unknown_tool", result_text(f"error: unknown tool {name!r}; tools: {', '.join(tools)}"))
    box: dict = {}

    def target():
        try:
            box["value"] = str(TOOLS.get(name)(arguments))
        except Exception as e:  # the tool's own failure is the model's observation
            box["error"] = f"{type(e).__name__}: {e}"

    # a thread, abandoned on timeout: a tool blocked in I/O or sleep cannot stall the rollout (a tool computing in
    # Python without releasing the GIL must bound its own work, as the calculator does)
    worker = threading.Thread(target=target, daemon=True, name=f"tool-{name}")
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        return ToolOutcome("timeout", result_text(f"error: tool {name!r} timed out after {timeout_s:g} s"))
    if "error" in box:
        return ToolOutcome("error", result_text(f"error: {box['error']}"))
    return ToolOutcome("ok", result_text(box["value"]))


# ---- calculator ----------------------------------------------------------------------------------------------------
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPRESSION_CHARS = 200
MAX_MAGNITUDE = 1e30  # every intermediate value: big-integer arithmetic holds the GIL, so the work is bounded here
MAX_EXPONENT = 64


def _evaluate(node):
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        value = node.value
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        value = _UNARY[type(node.op)](_evaluate(node.operand))
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"exponent {right} is beyond +-{MAX_EXPONENT}")
        value = _BINARY[type(node.op)](left, right)
    else:
        raise ValueError(f"unsupported expression element {type(node).__name__} (numbers, + - * / // % ** and "
                         "parentheses only)")
    if isinstance(value, complex) or abs(value) > MAX_MAGNITUDE:
        raise ValueError("result out of range")
    return value


@TOOLS.register("calculator")
def calculator(expression: str) -> str:
    """Arithmetic on numbers: `+ - * / // % **` and parentheses, e.g. `37 * (12 + 5)`. Integral results print as
    integers, others with up to 6 significant digits."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.replace("x", "*").replace("^", "**"), mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot parse {expression!r}") from None
    value = _evaluate(tree)
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.6g}"
