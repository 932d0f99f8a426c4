"""The marker contract shared by every stage.

A *marker* is a call ``debug_apply(value, name)`` placed after a module call. It is numerically a
no-op, and it survives export as one ONNX node per tensor::

    Debug(input) -> output        domain "fxalign", opset 1, string attribute ``name``

Three pieces make that work, all registered when this module is imported:

* the ``torch.library`` custom op ``fxalign::debug(Tensor x, str name) -> Tensor`` that exporters
  see, ``name`` being the marker name encoded by :func:`fxalign.names.encode_attribute` (eager:
  returns a copy, as custom ops may not alias their input; a fake implementation lets
  ``torch.export`` trace it). :func:`debug_apply` calls it only under a tracer; in plain eager
  execution it returns the tensor itself, so the instrumented model computes exactly what the
  model does (aliasing included), and inside :func:`capture` it records a copy, so later in-place
  ops cannot change what was captured;
* for the dynamo exporter, an ONNX ``OpSchema`` for ``fxalign::Debug`` plus an onnxscript
  translation that :data:`TRANSLATION_TABLE` hands to ``custom_translation_table``;
* for the TorchScript exporter, a symbolic registered with
  ``torch.onnx.register_custom_op_symbolic`` that emits the same node.

Markers are named by :class:`fxalign.names.MarkerName` objects (module path, call index, leaf
path, input or output), made here as the marker runs. Call indices are counted at run time within
one forward of an instrumented model, so the eager run and the export trace, which execute the
same Python, agree on them.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import weakref
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from onnx import defs
from torch.utils import _pytree as pytree

from fxalign.capture import CallRecord, InputRef, current_capture
from fxalign.names import (
    CallId,
    LeafPath,
    MarkerName,
    decode_attribute,
    encode_attribute,
    leaf_path,
)

__all__ = [
    "Answering",
    "DEBUG_OP",
    "DOMAIN",
    "OP_TYPE",
    "TRANSLATION_TABLE",
    "answering",
    "begin_call",
    "collect_aliases",
    "current_answering",
    "cut_markers",
    "debug_apply",
    "mark_inputs",
    "mark_output",
    "new_forward_scope",
    "tensor_leaves",
]

DOMAIN = "fxalign"
"""ONNX domain of the Debug node."""
OP_TYPE = "Debug"
"""ONNX op type of the Debug node."""
OPSET_VERSION = 1
"""Version of the ``fxalign`` ONNX domain."""

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Run-time state: the capture buffer and the per-forward call counters.
# --------------------------------------------------------------------------------------------
_CALLS: contextvars.ContextVar[dict[str, int] | None] = contextvars.ContextVar(
    "fxalign_calls", default=None
)
# id(marker output) -> (weak reference, version counter, marker name), within one forward.
_MarkedOutputs = dict[int, tuple["weakref.ReferenceType[torch.Tensor]", int, MarkerName]]
_MARKED: contextvars.ContextVar[_MarkedOutputs | None] = contextvars.ContextVar(
    "fxalign_marked", default=None
)
_ALIASES: contextvars.ContextVar[dict[MarkerName, MarkerName] | None] = contextvars.ContextVar(
    "fxalign_aliases", default=None
)
_ANSWERING: contextvars.ContextVar[Answering | None] = contextvars.ContextVar(
    "fxalign_answering", default=None
)
_CUT: contextvars.ContextVar[frozenset[MarkerName]] = contextvars.ContextVar(
    "fxalign_cut", default=frozenset()
)


@contextlib.contextmanager
def cut_markers(names: Collection[MarkerName]) -> Iterator[None]:
    """Under a tracer inside the block, leave the markers ``names`` out (no Debug node).

    The names come from :attr:`Captured.cut` of an eager run: markers whose copy would change
    what the model computes (see :meth:`Captured.watch`). The value keeps flowing unmarked, so
    the export computes exactly what the model does; the comparison then has no ONNX value for
    those names, and says why.
    """
    token = _CUT.set(frozenset(names))
    try:
        yield
    finally:
        _CUT.reset(token)


@contextlib.contextmanager
def collect_aliases() -> Iterator[dict[MarkerName, MarkerName]]:
    """Record the aliases (see :func:`debug_apply`) of markers traced or run inside the block.

    :func:`fxalign.export` uses it around the exporter, so that markers without a Debug node
    of their own can be mapped to the node of the marker whose value they share.

    Yields:
        A dict filled with ``marker name -> earlier marker name``.
    """
    aliases: dict[MarkerName, MarkerName] = {}
    token = _ALIASES.set(aliases)
    try:
        yield aliases
    finally:
        _ALIASES.reset(token)


def new_forward_scope() -> None:
    """Start a new forward pass: call indices count from zero again.

    Instrumented models call this as the first step of their ``forward``; it is harmless to call
    it anywhere else.
    """
    if _inside_compiled_region():
        return
    _CALLS.set({})
    _MARKED.set({})


def _next_call(path: str) -> CallId:
    calls = _CALLS.get()
    if calls is None:
        calls = {}
        _CALLS.set(calls)
    index = calls.get(path, 0)
    calls[path] = index + 1
    return CallId(path, index)


# --------------------------------------------------------------------------------------------
# The custom op.
# --------------------------------------------------------------------------------------------
def _record(name: MarkerName, x: torch.Tensor) -> None:
    """Keep a copy of ``x`` under ``name`` when a :func:`capture` is active."""
    values = current_capture()
    if values is not None:
        values.store(name, x)


def _inside_compiled_region() -> bool:
    """Inside code ``torch.compile`` traces, outside an export.

    ``torch.cond``'s branches, run eagerly, are compiled. Markers there would break the
    compiled graph; they do nothing, and the modules called there get no row. An export's
    trace (strict or not) keeps its markers.
    """
    return torch.compiler.is_compiling() and not torch.compiler.is_exporting()


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _tracer_active() -> bool:
    return torch.jit.is_tracing() or torch.compiler.is_exporting() or torch.compiler.is_compiling()


def _tracing(x: torch.Tensor) -> bool:
    """Whether an exporter (or compiler) is tracing, so the marker must become a graph op."""
    return _tracer_active() or type(x) not in _PLAIN_TENSORS  # fake, functional, proxy


@torch.library.custom_op("fxalign::debug", mutates_args=())
def _debug(x: torch.Tensor, name: str) -> torch.Tensor:
    # Run eagerly under a tracer that executes real tensors (torch.jit.trace); ``name`` is the
    # encoded marker name, decoded only when a capture wants it.
    if current_capture() is not None:
        _record(decode_attribute(name), x)
    return x.clone()


@_debug.register_fake
def _debug_fake(x: torch.Tensor, name: str) -> torch.Tensor:
    return torch.empty_like(x)


DEBUG_OP = torch.ops.fxalign.debug.default
"""The ATen-level overload that the exporters see."""


# --------------------------------------------------------------------------------------------
# ONNX side: schema, dynamo translation, TorchScript symbolic.
# --------------------------------------------------------------------------------------------
_ELEMENT_TYPES = (
    "float double float16 bfloat16 int8 int16 int32 int64 uint8 uint16 uint32 uint64 bool "
    "complex64 complex128 float8e4m3fn float8e5m2"
)
_ALL_TENSOR_TYPES = [f"tensor({t})" for t in _ELEMENT_TYPES.split(" ")]


def _register_schema() -> None:
    if defs.has(OP_TYPE, DOMAIN):
        return
    schema = defs.OpSchema(
        OP_TYPE,
        DOMAIN,
        OPSET_VERSION,
        doc="fxalign marker: identity that names the tensor it receives.",
        inputs=[defs.OpSchema.FormalParameter("input", "T")],
        outputs=[defs.OpSchema.FormalParameter("output", "T")],
        type_constraints=[("T", _ALL_TENSOR_TYPES, "Any tensor type.")],
        attributes=[
            defs.OpSchema.Attribute(
                "name",
                defs.OpSchema.AttrType.STRING,
                "Marker name, JSON of its fields (fxalign.names.encode_attribute).",
                required=True,
            )
        ],
    )
    defs.register_schema(schema)


_register_schema()


@functools.cache
def _fxalign_opset() -> Any:
    """The onnxscript opset of ``fxalign::Debug``, made on first use.

    Importing onnxscript takes a third of a second, which attaching to a file never needs.
    """
    import onnxscript

    return onnxscript.values.Opset(DOMAIN, OPSET_VERSION)


def _debug_translation(x: Any, name: str) -> Any:
    """Translate ``fxalign::debug`` for the dynamo exporter."""
    return _fxalign_opset().Debug(x, name=name)


TRANSLATION_TABLE: dict[Callable[..., Any], Callable[..., Any]] = {DEBUG_OP: _debug_translation}
"""Entries fxalign adds to ``custom_translation_table`` of the dynamo exporter."""


def _register_torchscript_symbolic() -> None:
    from torch.onnx import register_custom_op_symbolic
    from torch.onnx.symbolic_helper import parse_args

    @parse_args("v", "s")
    def symbolic(g: Any, x: Any, name: str) -> Any:
        return g.op(f"{DOMAIN}::{OP_TYPE}", x, name_s=name).setType(x.type())

    register_custom_op_symbolic(f"{DOMAIN}::debug", symbolic, OPSET_VERSION)


_register_torchscript_symbolic()


# --------------------------------------------------------------------------------------------
# The public marker functions.
# --------------------------------------------------------------------------------------------
def tensor_leaves(value: Any) -> dict[LeafPath, torch.Tensor]:
    """The tensors inside a value by leaf path: ``{(): x}`` for a tensor, else one per leaf.

    ``None`` and other non-tensor leaves are left out. This is how marker names locate tensors
    in a structured output, so the model's outputs and replayed outputs are found the same way.

    Example:
        >>> list(tensor_leaves((torch.ones(1), None, {"a": torch.ones(1)})))
        [(SequenceKey(idx=0),), (SequenceKey(idx=2), MappingKey(key='a'))]
    """
    if isinstance(value, torch.Tensor):
        return {(): value}
    leaves, _ = pytree.tree_flatten_with_path(value)
    return {leaf_path(path): leaf for path, leaf in leaves if isinstance(leaf, torch.Tensor)}


def _mark(x: torch.Tensor, name: MarkerName) -> torch.Tensor:
    """The op under a tracer; in eager mode, record a copy and return ``x`` itself.

    Returning ``x`` itself keeps eager semantics exact, aliasing included: a model whose
    in-place op relies on two names for one tensor computes the same instrumented.
    """
    if _tracing(x):
        # A block whose output is its last layer's output, a module that hands its input on
        # (dropout in eval mode) or the input of the next module marks a tensor that already
        # went through a marker: record the name as an alias of the earlier one instead of a
        # second Debug node. One node per distinct value keeps the exported graph, and the time
        # to export it, small. ``_version`` guards against in-place changes in between.
        marked = _MARKED.get()
        if marked is None:
            marked = {}
            _MARKED.set(marked)
        known = marked.get(id(x))
        if known is not None and known[0]() is x and known[1] == x._version:
            _record_alias(name, known[2])
            return x
        if name in _CUT.get():
            return x  # a copy here would cut an alias the model relies on (cut_markers)
        out = DEBUG_OP(x, encode_attribute(name))
        marked[id(out)] = (weakref.ref(out), out._version, name)
        return out
    values = current_capture()
    if values is not None:
        values.store(name, x)
        values.watch(name, x)
    answers = _ANSWERING.get()
    if answers is not None:
        return answers.take(name, x)
    return x


class Answering:
    """Inside :func:`answering`: a rerun of the model in which every marker answers from ONNX.

    The model is rerun on the same inputs, and at every marker the value computed so far is
    handed to ``check`` with the ONNX value of that marker, then replaced by the ONNX value.
    Each piece of code between markers therefore runs on ONNX values and is measured on its
    own: a leaf module (between its input and output markers) gives its local error, a block's
    inline code (between its submodules' markers) gives the block's *self* error. The rerun
    executes the same markers in the same order as the recorded run, so the k-th marker met is
    the k-th recorded; where it is not, the rerun took another path (:attr:`diverted`) and stops
    answering.

    Args:
        recorded: The markers the recorded run executed, in order.
        value_of: ``marker name -> ONNX value`` (``None`` when the ONNX side has none).
        check: Called as ``check(name, computed, onnx_value)`` for each answered marker.
        reshape: Answer with the ONNX value also where its shape differs (the rerun then goes
            on with the shapes the ONNX side computed; the marker is in :attr:`reshaped`).

    Attributes:
        unanswered: Markers that kept their computed value (no ONNX value, or another shape).
        same: ``unanswered marker -> the earlier marker`` that passed on the very tensor it
            holds, unwritten since (a module handing its input on, a block passing its input
            to a submodule): where a value without ONNX counterpart came from.
        reshaped: ``marker -> (computed shape, ONNX shape)`` where the two differ.
        diverted: Why the rerun stopped following the recorded markers, or ``None``.
        answered: How many markers answered.
    """

    def __init__(
        self,
        recorded: Sequence[MarkerName],
        value_of: Callable[[MarkerName], Any],
        check: Callable[[MarkerName, torch.Tensor, Any], None],
        reshape: bool = True,
    ) -> None:
        self.recorded, self.value_of, self.check = recorded, value_of, check
        self.reshape = reshape
        self.position = 0
        self.answered = 0
        self.unanswered: list[MarkerName] = []
        self.same: dict[MarkerName, MarkerName] = {}
        # id -> (tensor, its version then, the marker that passed it on)
        self._passed: dict[int, tuple[weakref.ref[torch.Tensor], int, MarkerName]] = {}
        self.reshaped: dict[MarkerName, tuple[list[int], list[int]]] = {}
        self.diverted: str | None = None

    def take(self, name: MarkerName, x: torch.Tensor) -> torch.Tensor:
        """The value the rerun goes on with after marker ``name`` (see the class docstring)."""
        if self.diverted is not None:
            return x
        if self.position >= len(self.recorded):
            self.diverted = f"the rerun ran {name} after every recorded marker"
            return x
        want = self.recorded[self.position]
        if (want.module_path, want.leaf, want.is_input) != (
            name.module_path,
            name.leaf,
            name.is_input,
        ):
            self.diverted = f"the rerun ran {name} where the recorded run ran {want}"
            return x
        self.position += 1
        value = self.value_of(want)
        if value is None:
            return self._keep(want, x)
        if tuple(value.shape) != tuple(x.shape):
            self.reshaped[want] = (list(x.shape), list(value.shape))
            if not self.reshape:
                return self._keep(want, x)
        else:
            self.check(want, x, value)
        self.answered += 1
        out = torch.from_numpy(np.array(value, copy=True)).to(dtype=x.dtype, device=x.device)
        self._passed[id(out)] = (weakref.ref(out), out._version, want)
        return out

    def _keep(self, name: MarkerName, x: torch.Tensor) -> torch.Tensor:
        """Go on with the computed ``x`` at ``name``; note the marker that passed it on."""
        self.unanswered.append(name)
        known = self._passed.get(id(x))
        if known is not None and known[0]() is x and known[1] == x._version:  # not written since
            self.same[name] = known[2]
        self._passed[id(x)] = (weakref.ref(x), x._version, name)
        return x

    def given(self, inputs: Mapping[LeafPath, torch.Tensor]) -> None:
        """The model's own inputs, by leaf: the same on both sides, as if they had answered.

        What :meth:`passed_on` finds behind a marker that holds one unchanged.
        """
        for leaf, x in inputs.items():
            self._passed[id(x)] = (weakref.ref(x), x._version, MarkerName("", 0, leaf, True))

    def passed_on(self, name: MarkerName) -> list[MarkerName]:
        """The earlier markers that passed on the tensor ``name`` holds, latest first."""
        chain = []
        while name in self.same:
            name = self.same[name]
            chain.append(name)
        return chain


def current_answering() -> Answering | None:
    """The :class:`Answering` of the innermost active :func:`answering`, if any.

    Markers answer through it; so do the forward hooks of a model rerun without markers.
    """
    return _ANSWERING.get()


@contextlib.contextmanager
def answering(answers: Answering) -> Iterator[Answering]:
    """Rerun the model with every marker answering from ONNX (see :class:`Answering`)."""
    token = _ANSWERING.set(answers)
    try:
        yield answers
    finally:
        _ANSWERING.reset(token)


def begin_call(path: str) -> CallId:
    """Start a marked call of module ``path``; return it with its call index in this forward."""
    if _inside_compiled_region():
        return CallId(path, 0)  # nothing is marked there (see _inside_compiled_region)
    call = _next_call(path)
    values = current_capture()
    if values is not None:
        values.begin(call)
    return call


def mark_inputs(
    args: tuple[Any, ...], kwargs: dict[str, Any], call: CallId
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Mark every tensor among a call's inputs (``path:in[0]``, ``path:in["mask"]``).

    Inside :func:`capture`, also records how the call was made (a :class:`CallRecord`) so that
    the module can be replayed on the ONNX values of its inputs.

    Returns:
        ``(args, kwargs)`` with every tensor marked.
    """
    if _inside_compiled_region():
        return args, kwargs
    if (
        not kwargs
        and current_capture() is None
        and _ANSWERING.get() is None
        and all(type(a) in _PLAIN_TENSORS for a in args)
        and not _tracer_active()
    ):
        return tuple(args), {}  # each marker would hand its tensor back: no tree to walk
    leaves, spec = pytree.tree_flatten_with_path((tuple(args), dict(kwargs)))
    refs: list[Any] = []
    marked: list[Any] = []
    dtypes: dict[MarkerName, torch.dtype] = {}
    for path, leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            # path[0] is (args, kwargs)'s own index: args are [i], kwargs ["name"]
            name = call.input(leaf_path(path[1:]))
            refs.append(InputRef(name))
            dtypes[name] = leaf.dtype
            marked.append(_mark(leaf, name))
        else:
            refs.append(leaf)
            marked.append(leaf)
    captured = current_capture()
    if captured is not None:
        captured.calls[call] = CallRecord(call, spec, refs, dtypes)
    new_args, new_kwargs = pytree.tree_unflatten(marked, spec)
    return tuple(new_args), dict(new_kwargs)


def mark_output(value: T, call: CallId) -> T:
    """Mark the output of a call started with :func:`begin_call` (see :func:`debug_apply`)."""
    if _inside_compiled_region():
        return value
    values = current_capture()
    if values is not None:
        values.end(call)
    if isinstance(value, torch.Tensor):
        return _mark(value, call.output())  # type: ignore[return-value]
    leaves, spec = pytree.tree_flatten_with_path(value)
    if values is not None:
        values.numbers.update(
            (call.output(leaf_path(path)), leaf)
            for path, leaf in leaves
            if isinstance(leaf, (int, float, bool))
        )
    if not any(isinstance(leaf, torch.Tensor) for _, leaf in leaves):
        if values is not None:
            values.without_tensors.append(call)
        return value
    marked = [
        _mark(leaf, call.output(leaf_path(path))) if isinstance(leaf, torch.Tensor) else leaf
        for path, leaf in leaves
    ]
    return pytree.tree_unflatten(marked, spec)


def debug_apply(value: T, name: str) -> T:
    """Mark ``value`` as the output of module ``name``; numerically a no-op.

    In eager execution every tensor is returned itself and, inside :func:`capture`, a copy is
    recorded. Under a tracer a tensor becomes one Debug node, unless it is the unchanged output
    of an earlier marker in the same forward (a block returning its last layer's output, the
    next module's input): then its name is recorded as an alias of that marker
    (:func:`collect_aliases`) and no second node is made. A tuple, list, dict or any pytree-
    registered container (Hugging Face ``ModelOutput`` included) is returned with the same
    structure, each tensor leaf marked under its leaf path; ``None`` and non-tensor leaves are
    left alone. Each call of one ``name`` in a forward gets the next call index
    (``MarkerName(name, 1)``, shown ``name#1``).

    Args:
        value: A tensor or a structure of tensors.
        name: The module path the value is the output of.

    Returns:
        In eager execution, ``value`` itself; under a tracer, ``value`` with each tensor replaced
        by the Debug op's output (or left as it is when it is an alias).

    Example:
        >>> x = torch.ones(1)
        >>> y = debug_apply((x, None), "block")
        >>> y[0] is x, y[1] is None
        (True, True)
    """
    if _inside_compiled_region():
        return value
    return mark_output(value, _next_call(name))


def _record_alias(name: MarkerName, target: MarkerName) -> None:
    """Under a tracer: ``name`` shares the Debug node of marker ``target``."""
    aliases = _ALIASES.get()
    if aliases is not None:
        aliases[name] = target


torch.fx.wrap("debug_apply")
torch.fx.wrap("begin_call")
torch.fx.wrap("mark_inputs")
torch.fx.wrap("mark_output")
torch.fx.wrap("new_forward_scope")
