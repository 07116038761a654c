"""The built-in agents: real and deterministic, no network and no model weights.

- `text-stats`: words (through the `word_count` tool), sentences, characters, top words.
- `summarize`: extractive summary: sentences (through `split_sentences`) scored by
  the frequency of their content words; the best N, in their original order.
- `calculator`: arithmetic, evaluated safely from the `ast` (never `eval`), one
  `calculate` tool call per expression.
- `json-transform`: selects and renames keys of an object (or of each object of
  a list) by a mapping `{"new_key": "dotted.source.path"}`.
- `chaos`: does what its input says (fail with a reason, hang, go silent, sleep,
  succeed), for tests and demos.

Bad input fails the attempt with reason INVALID_INPUT (INVALID_EXPRESSION for
arithmetic), which the registered retry policies mark as not retryable.
"""

from __future__ import annotations

import ast
import asyncio
import math
import operator
import re
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from opentelemetry import trace

from switchboard_client.worker import AgentContext, AgentError, RetryPolicy, Worker

WORD = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*")
# A sentence ends at . ! or ? (with any closing quotes or brackets) followed by
# white space, or at a blank line.
SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'\u201d\u2019)\]]))\s+|\n\s*\n")
STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further had
    has have having he her here hers herself him himself his how i if in into is it its itself just
    me more most my myself no nor not now of off on once only or other our ours ourselves out over
    own same she should so some such than that the their theirs them themselves then there these
    they this those through to too under until up very was we were what when where which while who
    whom why will with would you your yours yourself yourselves""".split()
)

NOT_RETRYABLE = RetryPolicy(non_retryable_reasons=("INVALID_INPUT", "INVALID_EXPRESSION"))
MAX_TEXT_CHARS = 1_000_000
MAX_EXPRESSIONS = 100
MAX_EXPRESSION_CHARS = 1_000
MAX_EXPONENT = 1_000
MAX_RESULT_BITS = 4_096
MAX_SLEEP_SECONDS = 3_600.0


def invalid_input(message: str) -> AgentError:
    return AgentError(message, reason="INVALID_INPUT")


def words_of(text: str) -> list[str]:
    return WORD.findall(text.lower())


def split_sentences(text: str) -> list[str]:
    return [part.strip() for part in SENTENCE_END.split(text) if part and part.strip()]


def top_words(words: list[str], count: int) -> list[dict[str, Any]]:
    """The most frequent content words, ties broken alphabetically."""
    frequencies = Counter(word for word in words if word not in STOPWORDS and not word.isdigit())
    ranked = sorted(frequencies.items(), key=lambda item: (-item[1], item[0]))[:count]
    return [{"word": word, "count": n} for word, n in ranked]


def rank_sentences(sentences: list[str], keep: int) -> list[int]:
    """Indices of the `keep` best sentences, in their original order.

    A sentence scores the sum of its content words' frequencies in the whole
    text (normalised by the most frequent word), divided by the square root of
    its length so that long sentences do not win by length alone.
    """
    per_sentence = [[w for w in words_of(s) if w not in STOPWORDS] for s in sentences]
    frequencies = Counter(word for words in per_sentence for word in words)
    top = max(frequencies.values(), default=1)
    scores = [
        (sum(frequencies[w] for w in words) / top) / math.sqrt(len(words)) if words else 0.0
        for words in per_sentence
    ]
    best = sorted(range(len(sentences)), key=lambda i: (-scores[i], i))[:keep]
    return sorted(best)


_BINARY: Mapping[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: Mapping[type[ast.unaryop], Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS: Mapping[str, Callable[..., Any]] = {
    "abs": abs,
    "round": round,
    "min": min,
    "max": max,
    "sqrt": math.sqrt,
}
_CONSTANTS: Mapping[str, float] = {"pi": math.pi, "e": math.e}


class ExpressionError(AgentError):
    def __init__(self, message: str) -> None:
        super().__init__(message, reason="INVALID_EXPRESSION")


def _checked(value: Any) -> int | float:
    if isinstance(value, float) and not math.isfinite(value):
        raise ExpressionError("the result is not a finite number")
    if isinstance(value, int) and value.bit_length() > MAX_RESULT_BITS:
        raise ExpressionError("the result is too large")
    return value  # type: ignore[no-any-return]


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _checked(node.value)
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _checked(_UNARY[type(node.op)](_evaluate(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ExpressionError(f"exponents are limited to {MAX_EXPONENT}")
        try:
            return _checked(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise ExpressionError("division by zero") from None
        except OverflowError:
            raise ExpressionError("the result is too large") from None
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _FUNCTIONS
        and not node.keywords
        and node.args
    ):
        arguments = [_evaluate(argument) for argument in node.args]
        try:
            return _checked(_FUNCTIONS[node.func.id](*arguments))
        except (TypeError, ValueError):
            raise ExpressionError(f"{node.func.id}() cannot take these arguments") from None
    raise ExpressionError(f"unsupported syntax: {type(node).__name__}")


def evaluate(expression: str) -> int | float:
    """Arithmetic only: numbers, + - * / // % **, parentheses, abs/round/min/max/sqrt, pi, e."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"expressions are limited to {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ExpressionError("not a valid expression") from None
    result = _evaluate(tree)
    # Whole floats read better as integers (2.0 ** 3 = 8).
    return (
        int(result) if isinstance(result, float) and result.is_integer() and abs(result) < 2**53 else result
    )


_MISSING = object()


def lookup(data: Any, path: str) -> Any:
    """The value at a dotted path (`items.0.name`); `_MISSING` if there is none."""
    current = data
    for part in path.split("."):
        if isinstance(current, Mapping) and part in current:
            current = current[part]
        elif (
            isinstance(current, list)
            and part.lstrip("-").isdigit()
            and -len(current) <= int(part) < len(current)
        ):
            current = current[int(part)]
        else:
            return _MISSING
    return current


def transform(record: Any, mapping: Mapping[str, str], drop_missing: bool) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, path in mapping.items():
        value = lookup(record, path)
        if value is _MISSING:
            if drop_missing:
                continue
            value = None
        result[key] = value
    return result


def _text(input: Mapping[str, Any]) -> str:
    text = input.get("text")
    if not isinstance(text, str) or not text.strip():
        raise invalid_input("input.text must be a non-empty string")
    if len(text) > MAX_TEXT_CHARS:
        raise invalid_input(f"input.text is limited to {MAX_TEXT_CHARS} characters")
    return text


def _int_in(input: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = input.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise invalid_input(f"input.{name} must be an integer from {low} to {high}")
    return value


TEXT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "text": {"type": "string", "minLength": 1},
        "top": {"type": "integer", "minimum": 1, "maximum": 50},
    },
    "required": ["text"],
}
SUMMARIZE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "text": {"type": "string", "minLength": 1},
        "max_sentences": {"type": "integer", "minimum": 1, "maximum": 50},
    },
    "required": ["text"],
}
CALCULATOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "expression": {"type": "string", "minLength": 1},
        "expressions": {
            "type": "array",
            "items": {"type": "string", "minLength": 1},
            "minItems": 1,
            "maxItems": MAX_EXPRESSIONS,
        },
    },
    "anyOf": [{"required": ["expression"]}, {"required": ["expressions"]}],
}
TRANSFORM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "data": {"type": ["object", "array"]},
        "mapping": {"type": "object", "additionalProperties": {"type": "string", "minLength": 1}},
        "drop_missing": {"type": "boolean"},
    },
    "required": ["data", "mapping"],
}
CHAOS_ACTIONS = ("succeed", "fail", "hang", "stop_heartbeats")
CHAOS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "action": {"enum": list(CHAOS_ACTIONS)},
        "reason": {"type": "string", "pattern": "^[A-Z][A-Z0-9_]*$"},
        "message": {"type": "string"},
        "sleep_seconds": {"type": "number", "minimum": 0, "maximum": MAX_SLEEP_SECONDS},
        "fail_attempts": {"type": "integer", "minimum": 0},
        "thoughts": {"type": "integer", "minimum": 0, "maximum": 1000},
        "echo": {},
    },
}


def build_worker(
    *, heartbeat_interval: float = 1.0, tracer_provider: trace.TracerProvider | None = None
) -> Worker:
    worker = Worker(heartbeat_interval=heartbeat_interval, tracer_provider=tracer_provider)

    @worker.tool("word_count")
    def word_count(text: str) -> dict[str, int]:
        return {"words": len(words_of(text))}

    @worker.tool("split_sentences")
    def split_sentences_tool(text: str) -> dict[str, list[str]]:
        return {"sentences": split_sentences(text)}

    @worker.tool("calculate")
    def calculate(expression: str) -> dict[str, int | float]:
        return {"value": evaluate(expression)}

    @worker.agent(
        "text-stats",
        description="Counts words, sentences and characters of a text and finds its most frequent words.",
        tools=["word_count"],
        input_schema=TEXT_SCHEMA,
        retry_policy=NOT_RETRYABLE,
    )
    async def text_stats(ctx: AgentContext, input: dict[str, Any]) -> dict[str, Any]:
        text = _text(input)
        top = _int_in(input, "top", 5, 1, 50)
        await ctx.think("Counting words")
        counted = await ctx.call_tool("word_count", text=text)
        await ctx.think("Counting sentences and characters, ranking words")
        return {
            "words": counted["words"],
            "sentences": len(split_sentences(text)),
            "characters": len(text),
            "top_words": top_words(words_of(text), top),
        }

    @worker.agent(
        "summarize",
        description="Extractive summary: the sentences that best carry the text's frequent words.",
        tools=["split_sentences"],
        input_schema=SUMMARIZE_SCHEMA,
        retry_policy=NOT_RETRYABLE,
    )
    async def summarize(ctx: AgentContext, input: dict[str, Any]) -> dict[str, Any]:
        text = _text(input)
        keep = _int_in(input, "max_sentences", 3, 1, 50)
        await ctx.think("Splitting the text into sentences")
        sentences: list[str] = (await ctx.call_tool("split_sentences", text=text))["sentences"]
        await ctx.think(f"Scoring {len(sentences)} sentences by word frequency, keeping {keep}")
        chosen = rank_sentences(sentences, keep)
        picked = [sentences[i] for i in chosen]
        return {
            "summary": " ".join(picked),
            "sentences": picked,
            "indices": chosen,
            "sentence_count": len(sentences),
        }

    @worker.agent(
        "calculator",
        description="Evaluates arithmetic expressions safely, one tool call per expression.",
        tools=["calculate"],
        input_schema=CALCULATOR_SCHEMA,
        retry_policy=NOT_RETRYABLE,
    )
    async def calculator(ctx: AgentContext, input: dict[str, Any]) -> dict[str, Any]:
        expressions = input.get("expressions")
        if expressions is None and isinstance(input.get("expression"), str):
            expressions = [input["expression"]]
        if (
            not isinstance(expressions, list)
            or not 1 <= len(expressions) <= MAX_EXPRESSIONS
            or not all(isinstance(e, str) and e.strip() for e in expressions)
        ):
            raise invalid_input(
                f"input needs `expression` or `expressions` (1 to {MAX_EXPRESSIONS} non-empty strings)"
            )
        await ctx.think(f"Evaluating {len(expressions)} expression(s)")
        results = []
        for expression in expressions:
            value = (await ctx.call_tool("calculate", expression=expression))["value"]
            results.append({"expression": expression, "value": value})
        return {"results": results, "value": results[-1]["value"]}

    @worker.agent(
        "json-transform",
        description="Selects and renames keys of an object, or of each object in a list, by a mapping.",
        input_schema=TRANSFORM_SCHEMA,
        retry_policy=NOT_RETRYABLE,
    )
    async def json_transform(ctx: AgentContext, input: dict[str, Any]) -> dict[str, Any]:
        data, mapping = input.get("data"), input.get("mapping")
        if not isinstance(data, dict | list):
            raise invalid_input("input.data must be an object or a list")
        if not isinstance(mapping, dict) or not all(isinstance(p, str) and p for p in mapping.values()):
            raise invalid_input("input.mapping must map each output key to a dotted source path")
        drop_missing = bool(input.get("drop_missing", False))
        records = data if isinstance(data, list) else [data]
        await ctx.think(f"Applying {len(mapping)} mapping(s) to {len(records)} record(s)")
        transformed = [transform(record, mapping, drop_missing) for record in records]
        return {"result": transformed if isinstance(data, list) else transformed[0]}

    @worker.agent(
        "chaos",
        description=(
            "Does what its input says, for tests and demos: action succeed | fail (with reason) | hang | "
            "stop_heartbeats; sleep_seconds first; fail_attempts fails only the first N attempts."
        ),
        input_schema=CHAOS_SCHEMA,
    )
    async def chaos(ctx: AgentContext, input: dict[str, Any]) -> dict[str, Any]:
        action = input.get("action", "succeed")
        if action not in CHAOS_ACTIONS:
            raise invalid_input(f"input.action must be one of {', '.join(CHAOS_ACTIONS)}")
        for n in range(_int_in(input, "thoughts", 1, 0, 1000)):
            await ctx.think(f"chaos thought {n + 1}")
        sleep_seconds = input.get("sleep_seconds", 0)
        if not isinstance(sleep_seconds, int | float) or not 0 <= sleep_seconds <= MAX_SLEEP_SECONDS:
            raise invalid_input(f"input.sleep_seconds must be from 0 to {MAX_SLEEP_SECONDS:g}")
        if sleep_seconds:
            await asyncio.sleep(sleep_seconds)
        fail_attempts = input.get("fail_attempts")
        if action == "fail" or (isinstance(fail_attempts, int) and ctx.attempt <= fail_attempts):
            reason = str(input.get("reason") or "CHAOS_FAILURE")
            raise AgentError(str(input.get("message") or "chaos failed as asked"), reason=reason)
        if action == "stop_heartbeats":
            ctx.stop_heartbeats()
        if action in ("hang", "stop_heartbeats"):
            await asyncio.Event().wait()  # until cancelled
        return {"ok": True, "attempt": ctx.attempt, "echo": input.get("echo")}

    return worker
