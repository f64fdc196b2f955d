"""A small PromQL parser for tests: it accepts the language's grammar (selectors,
ranges, subqueries, offset, functions, aggregations, binary operators with
precedence, on/ignoring/group_left/group_right, bool), checks argument types
(``rate`` needs a range vector, aggregations an instant vector) and returns the
metric names a query selects. No PromQL library is installed here; this is the
honest subset the dashboards and rules need, and it rejects what it does not know.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

GRAFANA_MACROS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<duration>(?:\d+(?:ms|s|m|h|d|w|y))+(?!\w))
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|0[xX][0-9a-fA-F]+|[Ii]nf|NaN)
  | (?P<ident>[a-zA-Z_][a-zA-Z0-9_:]*)
  | (?P<op>==|!=|>=|<=|=~|!~|[-+*/%^<>=(){}\[\],:@])
""", re.VERBOSE)

AGGREGATIONS = {"sum", "avg", "min", "max", "count", "stddev", "stdvar", "group",
                "topk", "bottomk", "quantile", "count_values", "limitk", "limit_ratio"}
AGG_WITH_PARAM = {"topk", "bottomk", "quantile", "count_values", "limitk", "limit_ratio"}
S, V, M, STR = "scalar", "vector", "matrix", "string"
_RANGE_FNS = ["rate", "irate", "increase", "delta", "idelta", "deriv", "changes", "resets",
              "avg_over_time", "min_over_time", "max_over_time", "sum_over_time", "count_over_time",
              "quantile_over_time", "stddev_over_time", "stdvar_over_time", "last_over_time",
              "present_over_time", "absent_over_time", "predict_linear"]
# name -> argument types; a trailing "..." makes the last optional.
FUNCTIONS: dict[str, tuple[str, ...]] = {
    **{f: (M,) for f in _RANGE_FNS},
    "quantile_over_time": (S, M), "predict_linear": (M, S),
    "histogram_quantile": (S, V), "histogram_fraction": (S, S, V),
    "abs": (V,), "ceil": (V,), "floor": (V,), "exp": (V,), "ln": (V,), "log2": (V,),
    "log10": (V,), "sqrt": (V,), "sgn": (V,), "absent": (V,), "timestamp": (V,),
    "round": (V, S, "..."), "clamp": (V, S, S), "clamp_min": (V, S), "clamp_max": (V, S),
    "scalar": (V,), "vector": (S,), "time": (), "sort": (V,), "sort_desc": (V,),
    "label_replace": (V, STR, STR, STR, STR), "label_join": (V, STR, STR, STR, "..."),
}
_SCALAR_RESULT = {"scalar", "time"}
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
             "offset", "and", "or", "unless", "atan2"}
_LEVELS = [{"or"}, {"and", "unless"}, {"==", "!=", ">", "<", ">=", "<="},
           {"+", "-"}, {"*", "/", "%", "atan2"}, {"^"}]


class PromQLError(ValueError):
    pass


@dataclass
class Parsed:
    type: str
    metrics: set[str] = field(default_factory=set)


def substitute_grafana(query: str) -> str:
    for macro, value in GRAFANA_MACROS.items():
        query = query.replace(macro, value)
    return query


def tokenize(query: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    while pos < len(query):
        match = _TOKEN.match(query, pos)
        if not match:
            raise PromQLError(f"unexpected character {query[pos]!r} at {pos} in {query!r}")
        pos = match.end()
        if match.lastgroup != "ws":
            tokens.append((match.lastgroup, match.group()))
    return tokens


def parse(query: str) -> Parsed:
    """Parse ``query`` (Grafana macros substituted); raise PromQLError if invalid."""
    parser = _Parser(tokenize(substitute_grafana(query)), query)
    result = parser.expr(0)
    if parser.pos != len(parser.tokens):
        parser.fail(f"unexpected {parser.peek()[1]!r}")
    return result


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]], query: str) -> None:
        self.tokens, self.query, self.pos = tokens, query, 0

    def fail(self, message: str):
        raise PromQLError(f"{message} (token {self.pos}) in {self.query!r}")

    def peek(self, ahead: int = 0) -> tuple[str, str]:
        index = self.pos + ahead
        return self.tokens[index] if index < len(self.tokens) else ("eof", "")

    def take(self, value: str | None = None, kind: str | None = None) -> str:
        token_kind, text = self.peek()
        if (value is not None and text != value) or (kind is not None and token_kind != kind):
            self.fail(f"expected {value or kind}, got {text or 'end'!r}")
        self.pos += 1
        return text

    def at(self, *values: str) -> bool:
        return self.peek()[1] in values

    def expr(self, level: int) -> Parsed:
        if level == len(_LEVELS):
            return self.unary()
        left = self.expr(level + 1)
        while self.peek()[1] in _LEVELS[level] and self.peek()[0] in ("op", "ident"):
            op = self.take()
            self.binary_modifiers(op)
            # ^ is right-associative; the others associate left.
            right = self.expr(level if op == "^" else level + 1)
            left = self.combine(op, left, right)
        return left

    def binary_modifiers(self, op: str) -> None:
        if self.at("bool"):
            if op not in _LEVELS[2]:
                self.fail("bool applies only to comparisons")
            self.take()
        if self.at("on", "ignoring"):
            self.take()
            self.label_list()
            if self.at("group_left", "group_right"):
                self.take()
                if self.at("("):
                    self.label_list()

    def combine(self, op: str, left: Parsed, right: Parsed) -> Parsed:
        for side in (left, right):
            if side.type not in (S, V):
                self.fail(f"operator {op} needs scalars or instant vectors, got a {side.type}")
        if op in ("and", "or", "unless") and S in (left.type, right.type):
            self.fail(f"{op} needs instant vectors on both sides")
        kind = S if left.type == right.type == S else V
        return Parsed(kind, left.metrics | right.metrics)

    def unary(self) -> Parsed:
        if self.at("-", "+"):
            self.take()
            return self.unary()
        return self.postfix(self.primary())

    def postfix(self, node: Parsed) -> Parsed:
        while True:
            if self.at("["):
                self.take("[")
                self.take(kind="duration")
                if self.at(":"):
                    if node.type != V:
                        self.fail("a subquery needs an instant vector")
                    self.take(":")
                    if self.peek()[0] == "duration":
                        self.take()
                elif not getattr(node, "selector", False):
                    self.fail("a range applies only to a metric selector")
                self.take("]")
                node = Parsed(M, node.metrics)
            elif self.at("offset"):
                self.take()
                if self.at("-"):
                    self.take()
                self.take(kind="duration")
            elif self.at("@"):
                self.take()
                if self.at("start", "end"):
                    self.take()
                    self.take("(")
                    self.take(")")
                else:
                    self.take(kind="number")
            else:
                return node

    def primary(self) -> Parsed:
        kind, text = self.peek()
        if kind == "number":
            self.take()
            return Parsed(S)
        if kind == "string":
            self.take()
            return Parsed(STR)
        if text == "(":
            self.take("(")
            inner = self.expr(0)
            self.take(")")
            return Parsed(inner.type, inner.metrics)  # no longer a bare selector
        if text == "{":
            return self.selector(None)
        if kind == "ident":
            if text in AGGREGATIONS:
                return self.aggregation()
            if self.peek(1)[1] == "(":
                return self.call()
            if text in _KEYWORDS:
                self.fail(f"keyword {text!r} where an expression belongs")
            return self.selector(self.take())
        self.fail(f"unexpected {text or 'end'!r}")

    def selector(self, name: str | None) -> Parsed:
        metrics = {name} if name else set()
        if self.at("{"):
            self.take("{")
            while not self.at("}"):
                label = self.take(kind="ident")
                if not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", label):
                    self.fail(f"bad label name {label!r}")
                if self.peek()[1] not in ("=", "!=", "=~", "!~"):
                    self.fail("expected a label matcher operator")
                op = self.take()
                value = self.take(kind="string")
                if label == "__name__" and op == "=":
                    metrics.add(value[1:-1])
                if not self.at("}"):
                    self.take(",")
            self.take("}")
        if not metrics:
            self.fail("a selector needs a metric name")
        node = Parsed(V, metrics)
        node.selector = True  # type: ignore[attr-defined]
        return node

    def label_list(self) -> list[str]:
        return self.parenthesised(lambda: self.take(kind="ident"))

    def parenthesised(self, item):
        """``( item, item, ... )``, possibly empty."""
        self.take("(")
        items = []
        while not self.at(")"):
            items.append(item())
            if not self.at(")"):
                self.take(",")
        self.take(")")
        return items

    def call(self) -> Parsed:
        name = self.take()
        if name not in FUNCTIONS:
            self.fail(f"unknown function {name!r}")
        args = self.arguments()
        expected = FUNCTIONS[name]
        types = [t for t in expected if t != "..."]
        fewest = len(types) - (1 if "..." in expected else 0)
        most = 64 if name == "label_join" else len(types)
        if not fewest <= len(args) <= most:
            self.fail(f"{name} takes {fewest}..{most} arguments, got {len(args)}")
        for index, (arg, want) in enumerate(zip(args, types + [STR] * len(args))):
            if arg.type != want:
                self.fail(f"argument {index + 1} of {name} must be a {want}, got a {arg.type}")
        metrics = set().union(*(a.metrics for a in args)) if args else set()
        return Parsed(S if name in _SCALAR_RESULT else V, metrics)

    def arguments(self) -> list[Parsed]:
        return self.parenthesised(lambda: self.expr(0))

    def aggregation(self) -> Parsed:
        name = self.take()
        grouped = self.at("by", "without")
        if grouped:
            self.take()
            self.label_list()
        args = self.arguments()
        if not grouped and self.at("by", "without"):
            self.take()
            self.label_list()
        want = 2 if name in AGG_WITH_PARAM else 1
        if len(args) != want:
            self.fail(f"{name} takes {want} arguments, got {len(args)}")
        if args[-1].type != V:
            self.fail(f"{name} aggregates an instant vector, got a {args[-1].type}")
        return Parsed(V, args[-1].metrics)
