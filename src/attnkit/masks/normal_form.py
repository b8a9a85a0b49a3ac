"""The normal form the recogniser (:mod:`attnkit.masks.recognise`) reads a traced mask
program in.

Integer values become affine forms ``{atom: coefficient, None: constant}`` over the index
variables ``"b"``, ``"h"``, ``"q"``, ``"kv"`` and opaque sub-results ``("n", i)`` (a gather,
a floor division, ...; :attr:`Symbolic.defs` says which). Comparisons become
``("cmp", "ge" | "eq" | "ne", form)``, meaning ``form >= 0``, ``== 0`` or ``!= 0`` (on
integers ``a < b`` is ``b - a - 1 >= 0``; an integer against a float constant is rounded
to the equivalent integer bound). Booleans become ``("and" | "or", [parts])``,
``("not", x)``, ``("const", bool)`` or ``("opaque", i)``; :func:`normal` pushes negations
into the comparisons, flattens nested and/or and folds constants; :func:`expand_abs` turns
``c - |A| >= 0`` into ``A <= c & -A <= c``. Anything the forms cannot say is opaque, never
approximated: the recogniser only matches what is exactly there.
"""

from __future__ import annotations

import math

import torch

from .probe import Program, index_args, refs, run

__all__ = ["Symbolic", "normal", "expand_abs", "add"]

_POS = ("b", "h", "q", "kv")
_PASS = {"_to_copy", "clone", "alias", "detach", "lift_fresh_copy", "view", "reshape",
         "expand", "contiguous", "_unsafe_view", "squeeze", "unsqueeze", "to"}


def add(x: dict, y: dict, k: int = 1) -> dict:
    out = dict(x)
    for a, c in y.items():
        out[a] = out.get(a, 0) + k * c
    return {a: c for a, c in out.items() if c != 0 or a is None}


class Symbolic:
    """Affine forms, comparisons and boolean trees of a program's nodes."""

    def __init__(self, program: Program, captured):
        self.p, self.captured = program, captured
        self.support: list = []  # frozenset of input names each node depends on
        self.sym: list = []
        self.defs: dict = {}  # opaque integer atom -> (op name, argument symbols)
        for i, node in enumerate(program.nodes):
            sup = frozenset().union(*(self.support[j] for j in refs((node.args, node.kwargs))))
            if node.op == "input":
                sup = frozenset({_POS[node.arg]})
            self.support.append(sup)
            self.sym.append(self._node(i, node))

    def _of(self, a):
        if isinstance(a, tuple) and len(a) == 2 and a[0] == "n" and isinstance(a[1], int):
            return self.sym[a[1]]
        if isinstance(a, bool):
            return ("const", a)
        if isinstance(a, int):
            return {None: a}
        if isinstance(a, float):
            return ("float", a)
        return None

    def _node(self, i, node):
        dt = node.dtype
        integer = dt is not None and dt != torch.bool and not dt.is_floating_point
        if node.op == "input":
            return {_POS[node.arg]: 1}
        if not self.support[i] and node.shape == () and dt is not None:
            try:  # reads no index: its value, this call
                v = run(self.p, index_args(4), self.captured, upto=i)
            except Exception:  # noqa: BLE001
                return ("opaque", i)
            if dt == torch.bool:
                return ("const", bool(v))
            return {None: int(v)} if integer else ("opaque", i)
        if node.op in ("captured", "element"):
            return ("opaque", i)
        name = node.name
        args = [self._of(a) for a in node.cargs]
        lin = [a for a in args if isinstance(a, dict)]
        if integer and name in ("add", "sub", "rsub") and len(lin) == 2:
            alpha = dict(node.kwargs).get("alpha", 1)
            if not isinstance(alpha, int):
                return self._opaque_int(i, name, args, node)
            x, y = (args[1], args[0]) if name == "rsub" else (args[0], args[1])
            return add(x, y, alpha if name == "add" else -alpha)
        if integer and name == "neg" and lin:
            return add({}, args[0], -1)
        if integer and name == "mul" and len(lin) == 2:
            for x, y in ((args[0], args[1]), (args[1], args[0])):
                if set(y) == {None}:
                    return {a: c * y[None] for a, c in x.items()}
        if name in _PASS and args and args[0] is not None and (
                integer and isinstance(args[0], dict) or dt == torch.bool
                and isinstance(args[0], tuple) and args[0][0] != "opaque"):
            if not integer or dt.itemsize >= 4:
                return args[0]
        if dt == torch.bool:
            return self._bool(i, name, args, node)
        if integer:
            return self._opaque_int(i, name, args, node)
        return ("opaque", i)

    def _opaque_int(self, i, name, args, node):
        self.defs[i] = (name, args, dict(node.kwargs))
        return {("n", i): 1}

    def _bool(self, i, name, args, node):
        cmp = {"ge": "ge", "gt": "gt", "le": "le", "lt": "lt", "eq": "eq", "ne": "ne"}
        if name in cmp and len(args) == 2:
            x, y = args
            if isinstance(x, dict) and isinstance(y, dict):
                return _compare(name, add(x, y, -1))
            if isinstance(x, dict) and isinstance(y, tuple) and y[0] == "float":
                return _compare_float(name, x, y[1])
            if isinstance(y, dict) and isinstance(x, tuple) and x[0] == "float":
                flip = {"ge": "le", "gt": "lt", "le": "ge", "lt": "gt"}.get(name, name)
                return _compare_float(flip, y, x[1])
            return ("opaque", i)
        parts = [a for a in args if isinstance(a, tuple) and a and a[0] != "float"]
        if name in ("bitwise_and", "logical_and", "__and__", "and") and len(parts) == 2:
            return ("and", parts)
        if name in ("bitwise_or", "logical_or", "__or__", "or") and len(parts) == 2:
            return ("or", parts)
        if name in ("bitwise_not", "logical_not") and len(parts) == 1:
            return ("not", parts[0])
        if name == "where" and len(parts) == 3:  # where(c, x, y) = c & x | ~c & y
            c, x, y = parts
            return ("or", [("and", [c, x]), ("and", [("not", c), y])])
        if name in ("new_ones", "ones_like", "full", "new_full", "full_like", "scalar_tensor",
                    "new_zeros", "zeros_like") and node.shape == ():
            value = {"new_ones": 1, "ones_like": 1, "new_zeros": 0, "zeros_like": 0}.get(name)
            if value is None:
                value = node.args[-1] if name != "scalar_tensor" else node.args[0]
            return ("const", bool(value)) if isinstance(value, (bool, int, float)) else \
                ("opaque", i)
        return ("opaque", i)


def _compare(op: str, d: dict):
    """``d op 0`` for an integer form ``d``, normalised to ``ge``/``eq``/``ne``."""
    if op == "gt":
        return ("cmp", "ge", add(d, {None: -1}))
    if op == "le":
        return ("cmp", "ge", add({}, d, -1))
    if op == "lt":
        return ("cmp", "ge", add(add({}, d, -1), {None: -1}))
    return ("cmp", op, d)


def _compare_float(op: str, x: dict, c: float):
    """``x op c`` with integer ``x`` and a float ``c``: the same on the integers."""
    if op == "eq" and not float(c).is_integer():
        return ("const", False)
    if op == "ne" and not float(c).is_integer():
        return ("const", True)
    k = {"ge": math.ceil(c), "gt": math.floor(c) + 1, "le": math.floor(c),
         "lt": math.ceil(c) - 1}.get(op, int(c))
    op = {"gt": "ge", "lt": "le"}.get(op, op)
    return _compare(op, add(x, {None: -k}))


def _negate(e):
    kind = e[0]
    if kind == "const":
        return ("const", not e[1])
    if kind == "not":
        return e[1]
    if kind == "and":
        return ("or", [_negate(p) for p in e[1]])
    if kind == "or":
        return ("and", [_negate(p) for p in e[1]])
    if kind == "cmp":
        if e[1] == "ge":  # not (d >= 0)  <=>  -d - 1 >= 0
            return ("cmp", "ge", add(add({}, e[2], -1), {None: -1}))
        return ("cmp", "ne" if e[1] == "eq" else "eq", e[2])
    return ("not", e)


def normal(e):
    """Negations pushed down; nested and/or flattened; constants folded."""
    if e[0] == "not":
        inner = normal(e[1])
        return normal(_negate(inner)) if inner[0] != "opaque" else ("not", inner)
    if e[0] in ("and", "or"):
        absorbing = e[0] == "or"  # True absorbs an or, False an and
        flat = []
        for p in (normal(x) for x in e[1]):
            if p[0] == "const":
                if p[1] == absorbing:
                    return p
                continue
            flat += p[1] if p[0] == e[0] else [p]
        if not flat:
            return ("const", not absorbing)
        return flat[0] if len(flat) == 1 else (e[0], flat)
    return e


def expand_abs(e, sym: Symbolic):
    """``c - |A| >= 0`` as ``A <= c & -A <= c``; ``|A| - c >= 0`` as an or."""
    if e[0] in ("and", "or"):
        return (e[0], [expand_abs(p, sym) for p in e[1]])
    if e[0] != "cmp" or e[1] != "ge":
        return e
    d = e[2]
    atoms = [a for a in d if a is not None]
    if len(atoms) != 1 or not isinstance(atoms[0], tuple):
        return e
    a, c = atoms[0], d[atoms[0]]
    name, args, _ = sym.defs.get(a[1], (None, None, None))
    if name != "abs" or not isinstance(args[0], dict) or abs(c) != 1:
        return e
    inner, k = args[0], d.get(None, 0)
    pos = ("cmp", "ge", add({None: k}, inner, c))
    neg = ("cmp", "ge", add({None: k}, inner, -c))
    return ("and", [pos, neg]) if c < 0 else ("or", [pos, neg])
