"""Collective bytes and matmul FLOPs per device per step, read from a compiled program's HLO text.

``text`` is ``jitted.lower(*args).compile().as_text()`` (after SPMD partitioning: the collectives
the partitioner inserts exist only there; an AbstractMesh lowers but does not compile). Every
count is per device (the compiled module is the per-device program) and multiplied by the trip
counts of the while loops the op sits in (XLA's ``known_trip_count``, which ``lax.scan``/``fori_loop``
loops carry). Of a ``conditional``, the branch with the largest count is taken (one branch runs).

Collective bytes are the **operand** bytes of each op (what one device contributes): for an
all-reduce that is also its result; an all-gather's result is ``group size`` times its operand, a
reduce-scatter's ``1/group size``. Ops whose replica groups are single devices (collectives over
a size-1 mesh axis) move nothing and are not counted. Async pairs count once (at ``-start``; ``-done`` and
``async-done`` are skipped). Kinds: ``all-reduce``, ``all-gather``, ``reduce-scatter``,
``all-to-all`` (``ragged-all-to-all`` included), ``collective-permute``.

FLOPs count ``dot`` ops only (``2 * prod(result) * prod(contracted dims)``), wherever they sit
(fusions, custom fusions, loop bodies); elementwise work and convolutions are not counted.
"""
from __future__ import annotations

import json
import re
from collections import Counter

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5,
                "s2": 0.25, "u2": 0.25, "s1": 0.125, "u1": 0.125}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9a-z]*)?)\[([^\]]*)\]")
_HEADER = re.compile(r"^(?:ENTRY )?%?([^\s(]+) \(.*\) -> .*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([^\s=]+) = (.*)$")
_OPCODES = {"all-reduce": "all-reduce", "all-reduce-start": "all-reduce",
            "all-gather": "all-gather", "all-gather-start": "all-gather",
            "reduce-scatter": "reduce-scatter", "all-to-all": "all-to-all",
            "ragged-all-to-all": "all-to-all", "collective-permute": "collective-permute",
            "collective-permute-start": "collective-permute"}


def _dtype_bytes(name: str) -> float:
    if name in _DTYPE_BYTES:
        return _DTYPE_BYTES[name]
    if name.startswith("f8"):
        return 1
    return 0  # token[], opaque[]: no data


def _dims(dim_text: str) -> list[int]:
    return [int(d.replace("<=", "")) for d in dim_text.split(",") if d.strip()]


def _shape_bytes(type_text: str) -> float:
    total = 0.0
    for dtype, dims in _ARRAY.findall(type_text):
        n = 1
        for d in _dims(dims):
            n *= d
        total += n * _dtype_bytes(dtype)
    return total


def _closing(text: str, start: int) -> int:
    """Index of the bracket that closes the one at ``start``."""
    pairs = {"(": ")", "[": "]", "{": "}"}
    stack = []
    for i in range(start, len(text)):
        c = text[i]
        if c in pairs:
            stack.append(pairs[c])
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return i
    raise ValueError(f"hlo: unbalanced brackets in {text[:120]!r}")


def _split_top(text: str) -> list[str]:
    out, depth, cur = [], 0, []
    for c in text:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def _parse(text: str):
    """{computation: [(name, type, opcode, operand names, attrs)]}, the entry's name."""
    comps: dict[str, list] = {}
    entry, cur = None, None
    for line in text.splitlines():
        line = re.sub(r"/\*.*?\*/", "", line)  # /*index=5*/ comments in long operand lists
        if cur is None:
            m = _HEADER.match(line)
            if m:
                cur = m.group(1)
                comps[cur] = []
                if line.startswith("ENTRY"):
                    entry = cur
            continue
        if line.strip() == "}":
            cur = None
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, rest = m.group(1), m.group(2)
        if rest.startswith("("):
            end = _closing(rest, 0)
            typ, rest = rest[:end + 1], rest[end + 1:].lstrip()
        else:
            typ, _, rest = rest.partition(" ")
        paren = rest.find("(")
        if paren < 0:
            continue
        opcode = rest[:paren]
        end = _closing(rest, paren)
        operands = [o.split()[-1].lstrip("%") for o in _split_top(rest[paren + 1:end]) if o.split()]
        comps[cur].append((name, typ, opcode, operands, rest[end + 1:]))
    if entry is None:
        raise ValueError("hlo: no ENTRY computation in the text (pass compiled.as_text())")
    return comps, entry


def _called(attrs: str, key: str) -> list[str]:
    m = re.search(rf"\b{key}=(\{{[^}}]*\}}|%?[^\s,]+)", attrs)
    if not m:
        return []
    return [c.strip().lstrip("%") for c in m.group(1).strip("{}").split(",") if c.strip()]


def _group_size(attrs: str, default: int) -> int:
    """Devices per replica group: ``{{0,1,2,3},{4,5,6,7}}``, the iota form ``[2,4]<=[8]``, or the
    mesh form ``mesh['axis_0'=2,'axis_1'=4] {'axis_1'}`` (the product of the named axes' sizes)."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if m:
        sizes = {k.strip().strip("'\""): int(v) for k, v in (a.split("=") for a in m.group(1).split(","))}
        n = 1
        for a in m.group(2).split(","):
            if a.strip():
                n *= sizes[a.strip().strip("'\"")]
        return n
    m = re.search(r"replica_groups=\[([0-9,]+)\]<=", attrs)
    if m:
        return _dims(m.group(1))[-1]
    m = re.search(r"replica_groups=\{\{([^}]*)\}", attrs)
    if m:
        return len(m.group(1).split(","))
    return default  # replica_groups={}: every device


def _trip_count(attrs: str, name: str) -> int:
    m = re.search(r"backend_config=(\{.*\})", attrs)
    if m:
        try:
            n = json.loads(m.group(1)[:_closing(m.group(1), 0) + 1]).get("known_trip_count", {}).get("n")
        except (ValueError, AttributeError):
            n = None
        if n is not None:
            return int(n)
    raise ValueError(f"hlo: while loop %{name} has no known_trip_count; its per-step counts are unknown")


def _totals(text: str):
    comps, entry = _parse(text)
    m = re.search(r"num_partitions=([0-9]+)", text)
    n_devices = int(m.group(1)) if m else 1
    shapes = {name: typ for instrs in comps.values() for name, typ, *_ in instrs}
    memo: dict[str, Counter] = {}

    def visit(comp: str) -> Counter:
        if comp in memo:
            return memo[comp]
        memo[comp] = Counter()  # guards against cycles (none in valid HLO)
        total = Counter()
        for name, typ, opcode, operands, attrs in comps.get(comp, []):
            kind = _OPCODES.get(opcode)
            if kind is not None:
                g = _group_size(attrs, n_devices)
                if g == 1:  # groups of one device (a size-1 mesh axis): nothing moves
                    continue
                b = sum(_shape_bytes(shapes.get(o, "")) for o in operands)
                total[kind] += b
                total["result:" + kind] += b * g if kind == "all-gather" else b / g if kind == "reduce-scatter" else b
            elif opcode == "dot":
                lhs = _ARRAY.findall(shapes.get(operands[0], "")) if operands else []
                contract = _called(attrs, "lhs_contracting_dims")
                k = 1
                if lhs:
                    dims = _dims(lhs[0][1])
                    for c in contract:
                        k *= dims[int(c)]
                n = 1
                for _, dims in _ARRAY.findall(typ)[:1]:
                    for d in _dims(dims):
                        n *= d
                total["flops"] += 2 * n * k
            if opcode == "while":
                trips = None
                inner = Counter()
                for c in _called(attrs, "body") + _called(attrs, "condition"):
                    inner.update(visit(c))
                if any(inner.values()):
                    trips = _trip_count(attrs, name)
                    for key, v in inner.items():
                        total[key] += v * trips
            elif opcode == "conditional":
                branches = (_called(attrs, "branch_computations")
                            or _called(attrs, "true_computation") + _called(attrs, "false_computation"))
                counts = [visit(c) for c in branches]
                if counts:
                    total.update(max(counts, key=lambda c: (sum(v for k, v in c.items() if k != "flops"),
                                                            c["flops"])))
            elif opcode in ("async-done", "async-update") or opcode.endswith("-done"):
                continue
            else:
                for key in ("calls", "called_computations") + (("to_apply",) if opcode == "call" else ()):
                    for c in _called(attrs, key):
                        total.update(visit(c))
        memo[comp] = total
        return total

    return visit(entry)


def collectives(hlo_text: str, size: str = "operand") -> dict[str, int]:
    """Bytes per device per step of each collective kind (every kind in ``KINDS`` present).

    ``size="operand"`` (default) counts what each device sends in (operand bytes); ``"result"``
    counts what it receives (an all-gather's result is the group size times its operand).
    """
    if size not in ("operand", "result"):
        raise ValueError(f"hlo.collectives: size must be 'operand' or 'result', not {size!r}")
    t = _totals(hlo_text)
    prefix = "" if size == "operand" else "result:"
    return {k: int(t[prefix + k]) for k in KINDS}


def flops(hlo_text: str) -> int:
    """FLOPs per device per step of the program's dot ops (2 * result elements * contracted size)."""
    return int(_totals(hlo_text)["flops"])
