"""Reading a user's mask or score function: what it computes and which tensors it reads.

:func:`probe` runs the function once on 0-d index tensors (FlexAttention's calling
convention) under a recording ``TorchFunctionMode``. Every torch call it makes is logged:

* as a step of a small :class:`Program` (the callable, its arguments with tensors replaced
  by references to earlier steps, the result's dtype and shape), which the mask analysis
  reads (:mod:`.intervals`, :mod:`.recognise`) and can replay on any index tensors;
* as a hashable key: arguments normalised (inputs, values computed inside, *captured*
  tensors by first appearance with their shape, dtype and device, Python scalars by value,
  and every Python value a call hands back), so two runs share a key exactly when they
  compute the same thing from captured tensors of the same kind.

Captured tensors are found by identity, however the function reaches them (closure,
``self.bias``, a list, a dict, a ``ParameterList``, a nested helper, a global): that is
the read set a score function's gradients need. The probe costs one eager run of the
function plus the recording, so it is redone on every call: nothing is
stale after a closure variable is rebound or a parameter swapped. (torch's own route,
``make_fx`` inside ``TransformGetItemToIndex``, sees the same calls but imports
``torch._dynamo`` on first use, seconds, and runs the function a second time.)

Shape letters as in :mod:`attnkit.masks`.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["Node", "Program", "Probe", "probe", "run", "index_args", "reachable_tensors",
           "version"]

# Python-level reads of a value: if the function does this to something computed from its
# indices, its control flow may depend on the index values and one run says little.
_DATA_DEPENDENT = {"__bool__", "item", "tolist", "__int__", "__float__", "__index__",
                   "__complex__", "numpy", "__len__", "__iter__"}

# torch-level names -> canonical (aten-like) names; "r"-names swap their two operands.
_CANON = {
    "__add__": "add", "__radd__": "add", "__iadd__": None, "__sub__": "sub",
    "__rsub__": "rsub", "subtract": "sub", "__mul__": "mul", "__rmul__": "mul",
    "multiply": "mul", "__truediv__": "div", "__rtruediv__": "rdiv", "true_divide": "div",
    "divide": "div", "__floordiv__": "floor_divide", "__rfloordiv__": "rfloor_divide",
    "__mod__": "remainder", "__rmod__": "rremainder", "__neg__": "neg", "negative": "neg",
    "__abs__": "abs", "absolute": "abs", "__and__": "bitwise_and", "__rand__": "bitwise_and",
    "__or__": "bitwise_or", "__ror__": "bitwise_or", "__xor__": "bitwise_xor",
    "__rxor__": "bitwise_xor", "__invert__": "bitwise_not", "__lshift__": "lshift",
    "__rlshift__": "rlshift", "bitwise_left_shift": "lshift", "__rshift__": "rshift",
    "__rrshift__": "rrshift", "bitwise_right_shift": "rshift", "__eq__": "eq",
    "__ne__": "ne", "not_equal": "ne", "__ge__": "ge", "greater_equal": "ge", "__gt__": "gt",
    "greater": "gt", "__le__": "le", "less_equal": "le", "__lt__": "lt", "less": "lt",
    "clip": "clamp", "float": "to", "double": "to", "half": "to", "bfloat16": "to",
    "long": "to", "int": "to", "short": "to", "bool": "to", "char": "to", "byte": "to",
    "type": "to", "type_as": "to", "__getitem__": "index", "view_as": "view",
    "expand_as": "expand", "reshape_as": "reshape",
}
_REFLECTED = {"rsub", "rdiv", "rfloor_divide", "rremainder", "rlshift", "rrshift"}


class Node:
    """One step of a :class:`Program`.

    ``op`` is ``"input"`` (``arg`` = position), ``"captured"`` (``arg`` = slot in
    :attr:`Probe.captured`), ``"element"`` (item ``arg`` of a tuple result) or the torch
    callable that ran; ``args``/``kwargs`` are its arguments with ``("n", i)`` for node
    ``i``, as it was called (for replay). ``name`` and ``cargs`` are the canonical form the
    analysis reads: an aten-like name (``"ge"``, ``"index"``, ``"to"``, ...) and the
    operands in that operator's order. ``dtype``/``shape`` describe the result.
    """

    __slots__ = ("op", "args", "kwargs", "arg", "name", "cargs", "dtype", "shape")

    def __init__(self, op, args=(), kwargs=(), arg=None, name="", cargs=(), dtype=None,
                 shape=()):
        self.op, self.args, self.kwargs, self.arg = op, args, kwargs, arg
        self.name, self.cargs, self.dtype, self.shape = name or str(op), cargs, dtype, shape

    def __repr__(self):
        return f"Node({self.name}, {self.cargs or self.arg}, {self.dtype}, {self.shape})"


@dataclass(frozen=True)
class Program:
    """The calls of one run, in order; ``output`` is the node the function returned."""

    nodes: tuple
    output: int

    def uses(self, position: int) -> bool:
        """Whether input ``position`` (0 = b, 1 = h, ... for a mask) reaches the result."""
        return any(n.op == "input" and n.arg == position for n in self.live())

    def live(self) -> list:
        """The nodes the output depends on, in order."""
        seen, stack = set(), [self.output]
        while stack:
            i = stack.pop()
            if i not in seen:
                seen.add(i)
                stack.extend(refs((self.nodes[i].args, self.nodes[i].kwargs)))
        return [self.nodes[i] for i in sorted(seen)]


@dataclass
class Probe:
    """What one run of a user function showed.

    Attributes:
        key: hashable log of the run (None when the run failed).
        captured: the tensors it read from outside, in order of first use.
        elementwise: every value computed from the indices was 0-d (no chained indexing
            such as ``bias[b][q]``): broadcasting the function over index grids is exact.
        data_dependent: Python read an index-dependent value (``if``, ``.item()``).
        out: the result's ``(dtype, shape)``, or the name of a non-tensor result's type.
        error: why the run failed (None when it ran).
    """

    key: tuple | None
    captured: tuple
    build: object = None  # () -> Program
    elementwise: bool = True
    data_dependent: bool = False
    out: object = None
    error: str | None = None
    _program: Program | None = None

    @property
    def program(self) -> Program | None:
        """The run as a :class:`Program` (built on first use; None when it failed)."""
        if self._program is None and self.build is not None:
            self._program = self.build()
        return self._program


def is_ref(x) -> bool:
    """Whether an argument is a node reference ``("n", i)``."""
    return isinstance(x, tuple) and len(x) == 2 and x[0] == "n" and isinstance(x[1], int)


def refs(x):
    """Node indices referenced in a (nested) argument structure."""
    if is_ref(x):
        yield x[1]
    elif isinstance(x, (list, tuple)):
        for i in x:
            yield from refs(i)
    elif isinstance(x, dict):
        for i in x.values():
            yield from refs(i)


def _canonical(func, args, kwargs) -> tuple[str, tuple]:
    name = getattr(func, "__name__", "")
    if func is Tensor.where:  # self.where(cond, other) = where(cond, self, other)
        return "where", (args[1], args[0], *args[2:])
    if name in ("min", "max") and len(args) == 2 and not kwargs and is_ref(args[1]):
        return ("minimum" if name == "min" else "maximum"), tuple(args)
    name = _CANON.get(name, name) or "?"
    if name in _REFLECTED:
        return name[1:], (args[1], args[0], *args[2:])
    if name == "index":
        index = args[1] if isinstance(args[1], (tuple, list)) and not is_ref(args[1]) \
            else (args[1],)
        ok = all(isinstance(i, int) and not isinstance(i, bool) or is_ref(i) for i in index)
        return ("index", (args[0], list(index))) if ok else ("getitem", tuple(args))
    return name, tuple(args)


class _Recorder(TorchFunctionMode):
    """Logs every torch call of a run (and keeps its tensors alive: ids stay unique)."""

    def __init__(self):
        super().__init__()
        self.calls: list = []

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((func, args, kwargs, out))
        return out


class _Digest:
    """The log of one run as program nodes and a key (one pass, after the run)."""

    def __init__(self, inputs):
        self.nodes = [Node("input", arg=i, name="input", dtype=t.dtype, shape=tuple(t.shape))
                      for i, t in enumerate(inputs)]
        self.ref = {id(t): i for i, t in enumerate(inputs)}
        self.captured: list = []
        self.capkey: list = []
        self.dependent = set(range(len(inputs)))
        self.log: list = []
        self.raw: list = []
        self.elementwise = True
        self.data_dependent = False

    def node_of(self, t: Tensor):
        """Its node: an int for inputs and captured tensors, ``("v", call, item)`` for
        values computed in the run."""
        i = self.ref.get(id(t))
        if i is None:  # first sight of a tensor from outside: captured
            i = len(self.nodes)
            self.nodes.append(Node("captured", arg=len(self.captured), name="captured",
                                   dtype=t.dtype, shape=tuple(t.shape)))
            self.ref[id(t)] = i
            self.capkey.append((tuple(t.shape), t.dtype, t.device.type, t.requires_grad))
            self.captured.append(t)
        return i

    def arg(self, x):
        """Arguments with tensors replaced by node references."""
        if isinstance(x, Tensor):
            return ("n", self.node_of(x))
        if isinstance(x, (list, tuple)):
            return type(x)(self.arg(i) for i in x)
        if isinstance(x, dict):
            return {k: self.arg(v) for k, v in x.items()}
        return x

    def key(self, x):
        """A hashable stand-in (tensors are references; scalars typed: 1 != 1.0 != True)."""
        if isinstance(x, tuple):
            return x if _is_dref(x) else ("T", *(self.key(i) for i in x))
        if isinstance(x, list):
            return ("L", *(self.key(i) for i in x))
        if isinstance(x, dict):
            return ("D", *sorted((str(k), self.key(v)) for k, v in x.items()))
        if isinstance(x, slice):
            return ("S", self.key(x.start), self.key(x.stop), self.key(x.step))
        if type(x) is int or x is None or isinstance(x, (str, torch.dtype, torch.device)):
            return x
        if isinstance(x, (bool, float, complex, torch.layout, torch.memory_format)):
            return (type(x).__name__, x)
        if x is Ellipsis:
            return "..."
        return ("obj", type(x).__qualname__, id(x))

    def call(self, func, args, kwargs, out):
        a = self.arg(args) if type(args) is tuple else self.arg(tuple(args))
        k = self.arg(kwargs) if kwargs else {}
        dep = not self.dependent.isdisjoint(_drefs((a, k)))
        if dep and getattr(func, "__name__", "") in _DATA_DEPENDENT:
            self.data_dependent = True
        fkey = ("get", func.__self__) if type(func).__name__ == "method-wrapper" else func
        entry = [fkey, self.key(a), self.key(k) if k else None]
        at = len(self.raw)
        self.raw.append((func, a, k, out))
        if isinstance(out, Tensor):
            self.ref.setdefault(id(out), ("v", at, None))
            if dep:
                self.dependent.add(("v", at, None))
                self.elementwise = self.elementwise and out.dim() == 0
        elif isinstance(out, (list, tuple)) and any(isinstance(o, Tensor) for o in out):
            for j, o in enumerate(out):
                if isinstance(o, Tensor):
                    self.ref.setdefault(id(o), ("v", at, j))
                    if dep:
                        self.dependent.add(("v", at, j))
                        self.elementwise = self.elementwise and o.dim() == 0
        else:
            entry.append(("=", self.key(self.arg(out))))  # a value Python reads: keyed
        self.log.append(tuple(entry))

    def program(self, result) -> Program:
        """The run as program nodes (built only when a probe's analysis needs them)."""
        nodes = list(self.nodes)
        where: dict = {}  # ("v", call, item) -> node index

        def fix(x):
            if _is_dref(x):
                return ("n", where[x[1]] if isinstance(x[1], tuple) else x[1])
            if isinstance(x, (list, tuple)):
                return type(x)(fix(i) for i in x)
            if isinstance(x, dict):
                return {k: fix(v) for k, v in x.items()}
            return x
        for at, (func, a, k, out) in enumerate(self.raw):
            a, k = fix(a), fix(k)
            cname, cargs = _canonical(func, a, k)
            tensor = isinstance(out, Tensor)
            where[("v", at, None)] = len(nodes)
            nodes.append(Node(func, a, tuple(sorted(k.items())), name=cname, cargs=cargs,
                              dtype=out.dtype if tensor else None,
                              shape=tuple(out.shape) if tensor else ()))
            if isinstance(out, (list, tuple)):
                for j, o in enumerate(out):
                    if isinstance(o, Tensor):
                        where[("v", at, j)] = len(nodes)
                        nodes.append(Node("element", (("n", where[("v", at, None)]),), arg=j,
                                          name="element", dtype=o.dtype, shape=tuple(o.shape)))
        return Program(tuple(nodes), where[result] if isinstance(result, tuple) else result)


def _is_dref(x) -> bool:
    return type(x) is tuple and len(x) == 2 and x[0] == "n"


def _drefs(x):
    """References in a digest's arguments: ints, or ``("v", call, item)``."""
    if _is_dref(x):
        yield x[1]
    elif isinstance(x, (list, tuple)):
        for i in x:
            yield from _drefs(i)
    elif isinstance(x, dict):
        for i in x.values():
            yield from _drefs(i)


def version(t: Tensor):
    """``t._version`` (bumped by in-place updates), or None for an inference tensor, which
    has no version counter (then nothing derived from it may be cached)."""
    try:
        return t._version
    except RuntimeError:
        return None


def index_args(n: int, dtype=torch.int64):
    """``n`` 0-d index tensors (value 0), as FlexAttention calls a ``mask_mod``."""
    return [torch.zeros((), dtype=dtype) for _ in range(n)]


def probe(fn, inputs) -> Probe:
    """Run ``fn(*inputs)`` once and record it (see the module docstring). Never raises:
    a failing run is reported in :attr:`Probe.error`."""
    rec = _Recorder()
    try:
        with rec:
            out = fn(*inputs)
    except Exception as err:  # noqa: BLE001 - any failure means "cannot read it"
        d = _Digest(inputs)
        for c in rec.calls:
            d.call(*c)
        return Probe(None, tuple(d.captured), error=f"{type(err).__name__}: {err}")
    d = _Digest(inputs)
    for c in rec.calls:
        d.call(*c)
    if not isinstance(out, Tensor):
        return Probe(None, tuple(d.captured), out=type(out).__name__,
                     error=f"it returns {type(out).__name__}, not a tensor")
    result = d.node_of(out)
    key = (len(inputs), tuple(d.log), tuple(d.capkey), result)
    try:
        hash(key)
    except TypeError:  # an unhashable constant somewhere: no key, no analysis
        return Probe(None, tuple(d.captured), error="its arguments cannot be keyed")
    return Probe(key, tuple(d.captured), functools.partial(d.program, result),
                 d.elementwise, d.data_dependent, (out.dtype, tuple(out.shape)))


def run(program: Program, inputs, captured, upto: int | None = None):
    """Replay ``program`` (up to node ``upto``) on real tensors: any broadcastable index
    shapes for an elementwise program."""
    vals: list = []

    def get(a):
        if isinstance(a, tuple) and len(a) == 2 and a[0] == "n" and isinstance(a[1], int):
            return vals[a[1]]
        if isinstance(a, (list, tuple)):
            return type(a)(get(i) for i in a)
        if isinstance(a, dict):
            return {k: get(v) for k, v in a.items()}
        return a

    last = program.output if upto is None else upto
    need = {last}
    for i in range(last, -1, -1):  # only what the result depends on
        if i in need:
            need.update(refs((program.nodes[i].args, program.nodes[i].kwargs)))
    for i, n in enumerate(program.nodes[:last + 1]):
        if i not in need:
            vals.append(None)
        elif n.op == "input":
            vals.append(inputs[n.arg])
        elif n.op == "captured":
            vals.append(captured[n.arg])
        elif n.op == "element":
            vals.append(vals[n.args[0][1]][n.arg])
        else:
            vals.append(n.op(*get(n.args), **{k: get(v) for k, v in n.kwargs}))
    return vals[last]


# --- a conservative fallback: every tensor a function can reach --------------------------

def reachable_tensors(fn, limit: int = 2000) -> tuple:
    """Every tensor reachable from ``fn`` (closures, defaults, ``functools.partial``, bound
    ``self``, module parameters, buffers and attributes, lists, tuples, dicts, globals it
    names): a superset of what it reads, for functions that cannot be probed."""
    found, seen, stack = {}, set(), [fn]
    while stack and len(seen) < limit:
        x = stack.pop()
        if isinstance(x, Tensor):
            found.setdefault(id(x), x)
            continue
        if id(x) in seen or isinstance(x, (str, bytes, int, float, bool, type(None),
                                           types.ModuleType, type)):
            continue
        seen.add(id(x))
        if isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack.extend(x)
        elif isinstance(x, functools.partial):
            stack += [x.func, *x.args, *(x.keywords or {}).values()]
        elif isinstance(x, types.MethodType):
            stack += [x.__func__, x.__self__]
        elif isinstance(x, types.FunctionType):
            stack += [c.cell_contents for c in (x.__closure__ or ()) if _filled(c)]
            stack += list(x.__defaults__ or ()) + list((x.__kwdefaults__ or {}).values())
            stack += [x.__globals__[n] for n in _names(x.__code__) if n in x.__globals__]
        elif isinstance(x, torch.nn.Module):
            stack += list(x.parameters()) + list(x.buffers()) + list(vars(x).values())
        elif hasattr(x, "__dict__"):
            stack += list(vars(x).values())
            call = getattr(type(x), "__call__", None)
            if isinstance(call, types.FunctionType):
                stack.append(call)
    return tuple(found.values())


def _filled(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


def _names(code) -> set:
    out = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            out |= _names(c)
    return out
