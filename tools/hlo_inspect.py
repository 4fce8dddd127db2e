"""Reading collectives out of compiled HLO text (compiled.as_text()).

Used by launch/plan.py to report what a sharded step communicates and by the tests to prove
that no expert weight is ever all-gathered. Optimized HLO names operands without their
shapes, so shapes are resolved through a name -> type table built from the whole module.
"""

from __future__ import annotations

import re
from typing import NamedTuple

COLLECTIVE_OPS = (
    "all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all", "collective-permute",
    "collective-broadcast",
)
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*")
_SHAPE = re.compile(r"([a-z]+\d*(?:e\d+m\d+\w*)?|pred|token)\[([\d,]*)\]")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")


class Collective(NamedTuple):
    op: str  # e.g. "all-reduce" (async "-start" forms are folded in)
    name: str
    computation: str  # enclosing HLO computation
    in_loop: bool  # inside a while body (directly or via calls): runs once per iteration, e.g. per scanned layer
    result: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, shape) per output
    operands: tuple[tuple[str, tuple[int, ...]], ...]
    replica_groups: str

    def describe(self) -> dict:
        fmt = lambda xs: [f"{d}[{','.join(map(str, s))}]" for d, s in xs]
        return {
            "op": self.op, "computation": self.computation, "in_loop": self.in_loop, "operands": fmt(self.operands),
            "result": fmt(self.result), "replica_groups": self.replica_groups,
        }


def _split_type(rest: str) -> tuple[str, str]:
    """'(f32[2], s32[]) op(...)' -> ('(f32[2], s32[])', 'op(...)'); handles tuple types."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 1 :].lstrip()
    head, _, tail = rest.partition(" ")
    return head, tail


def _shapes(type_str: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((d, tuple(int(x) for x in s.split(",") if x)) for d, s in _SHAPE.findall(type_str))


def _args(text: str) -> str:
    depth = 0
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return text[1:i]
    return text[1:]


_CALLEE = re.compile(r"(?:calls|body|condition|to_apply|branch_computations|called_computations)=\{?([%\w.\-, ]+)\}?")


def _loop_computations(lines: list[str]) -> set[str]:
    """Computations that run inside some while loop: the bodies and everything they call."""
    calls: dict[str, set[str]] = {}
    bodies: set[str] = set()
    comp = ""
    for line in lines:
        c = _COMP.match(line)
        if c:
            comp = c.group(1)
            continue
        for m in _CALLEE.finditer(line):
            names = set(re.findall(r"%([\w.\-]+)", m.group(1)))
            calls.setdefault(comp, set()).update(names)
        b = re.search(r"\bbody=%([\w.\-]+)", line)
        if b:
            bodies.add(b.group(1))
    out, todo = set(), list(bodies)
    while todo:
        name = todo.pop()
        if name not in out:
            out.add(name)
            todo.extend(calls.get(name, ()))
    return out


def collectives(hlo_text: str) -> list[Collective]:
    types: dict[str, str] = {}
    lines = hlo_text.splitlines()
    for line in lines:
        m = _DEF.match(line)
        if m:
            types[m.group(1)] = _split_type(line[m.end():])[0]
    in_loop = _loop_computations(lines)
    out: list[Collective] = []
    comp = ""
    for line in lines:
        c = _COMP.match(line)
        if c:
            comp = c.group(1)
            continue
        m = _DEF.match(line)
        if not m:
            continue
        type_str, rest = _split_type(line[m.end():])
        op = rest.split("(", 1)[0].strip()
        base = op[: -len("-start")] if op.endswith("-start") else op
        if base not in COLLECTIVE_OPS:
            continue
        operand_names = re.findall(r"%([\w.\-]+)", _args(rest[len(op):]))
        operands = tuple(s for n in operand_names for s in _shapes(types.get(n, "")))
        groups = re.search(r"replica_groups=(\S+(?: \{[^}]*\})?)", rest)
        result = _shapes(type_str)
        if op.endswith("-start") and base in ("all-gather", "collective-permute", "all-reduce") and len(result) > 1:
            result = result[len(result) // 2 :]  # async start returns (operands, results)
        out.append(Collective(base, m.group(1), comp, comp in in_loop, result, operands,
                              groups.group(1) if groups else ""))
    return out
