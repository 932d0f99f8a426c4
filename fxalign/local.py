"""Introduced error: what each module's exported version adds on its own.

Once one module diverges, every later module's output diverges too; the cumulative error cannot
say where the error *starts*. fxalign reruns the instrumented model once, eagerly, with every
marker answering with its ONNX value (:class:`fxalign.markers.Answering`): each piece of code
between two markers then runs on ONNX values, and what it computes is compared with the ONNX
value of the marker after it. That gives every row its *introduced* error at once:

* a leaf module runs between its input and output markers: its **local** error,
  ``compare(m(onnx inputs), onnx output)``;
* a block's own code runs between its submodules' markers (the attention math between ``qkv``
  and ``out_proj``, a mask, a division): its **self** error is the worst of what its code hands
  each submodule and its output, against their ONNX values, so a faulty line in a block's
  ``forward`` is blamed on the block, not on the next submodule that inherits the error;
* the model's own code (its ``forward`` between top-level modules) is the final outputs' rows.

Which call's code computed a submodule's input is known from the recorded run
(:attr:`fxalign.torch_run.TorchRun.parents`), refined by module path for blocks that torch.fx
inlined. A faithful module has an introduced error at round-off level even deep inside a
diverged region; the module that breaks has a large one. Values without an ONNX counterpart
(a marker the export left out, a value the exporter folded) keep their computed value, and the
rows they touch say so. Where the rerun takes another path (data-dependent control flow on the
ONNX values) it stops answering; leaf calls after that point are replayed one by one instead.

By default (``which="failing"``) nothing is rerun when every value is within tolerance: an
aligned model costs no replay at all.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch.utils import _pytree as pytree

from fxalign.capture import CallRecord, InputRef
from fxalign.compare.metrics import compare_arrays, dtype_eps
from fxalign.instrument.result import first_line
from fxalign.instrument.wrappers import replay_module
from fxalign.markers import Answering, answering, new_forward_scope, tensor_leaves
from fxalign.names import CallId, LeafPath, MarkerName, leaf_suffix
from fxalign.report.model import Metrics, Row, Verdict
from fxalign.torch_run import flatten_outputs, to_numpy

__all__ = [
    "NOT_REPLAYED",
    "LocalRows",
    "Replay",
    "Rerun",
    "call_replay",
    "fill_local_errors",
    "set_local_error",
]

logger = logging.getLogger(__name__)

LocalRows = Literal["failing", "all"]
"""When introduced errors are computed: ``failing`` (when some value breaks tolerance: all
naming the culprit needs, and no rerun at all on an aligned model) or ``all`` (always)."""

NOT_REPLAYED = "not replayed: every value is within tolerance (align(local='all') replays)"

ValueOf = Callable[[MarkerName], "np.ndarray | None"]


Replay = Callable[[CallId], "dict[LeafPath, torch.Tensor] | str"]
"""Reruns one call on the ONNX values of its inputs: its outputs by leaf, or why it cannot."""


@dataclasses.dataclass
class Rerun:
    """What rerunning the model with every marked value answering from ONNX takes.

    Attributes:
        run: Calls the model on fresh copies of the sample's inputs, its markers (or hooks)
            answering through :func:`fxalign.markers.answering`; returns its output.
        names: The markers the recorded run executed, in order (final outputs left out).
        inputs: ``call -> its input markers``, for every call whose inputs were marked.
        parents: ``call -> the call whose code made it`` (``None``: the model's own code).
        replay: One call rerun alone on ONNX inputs, for rows after the rerun left the
            recorded path; ``None`` when there is no such replay.
        reasons: ``marker -> why the ONNX side has no value for it`` (``"fused into bn"``).
        fused: ``marker without ONNX value -> the call whose nodes compute it with theirs``
            (a Conv fused into the BatchNorm reading it).
    """

    run: Callable[[], Any]
    names: Sequence[MarkerName]
    inputs: Mapping[CallId, Sequence[MarkerName]]
    parents: Mapping[CallId, CallId | None]
    replay: Replay | None = None
    reasons: Mapping[MarkerName, str] = dataclasses.field(default_factory=dict)
    fused: Mapping[MarkerName, CallId] = dataclasses.field(default_factory=dict)


def call_replay(
    instrumented: torch.nn.Module, calls: Mapping[CallId, CallRecord], value_of: ValueOf
) -> Replay:
    """:attr:`Rerun.replay` for an instrumented module: the recorded call rerun on ONNX inputs."""

    def replay(call: CallId) -> dict[LeafPath, torch.Tensor] | str:
        record = calls.get(call)
        if record is None:
            return "no record of this call to replay"
        return _replay(instrumented, record, value_of)

    return replay


def fill_local_errors(
    rows: Sequence[tuple[MarkerName, Row]],
    rerun: Rerun,
    value_of: ValueOf,
    verdict: Verdict = "roundoff",
    *,
    which: LocalRows = "failing",
) -> None:
    """Set ``row.local`` and ``row.local_scope`` (or ``row.local_note``) on every row, in place.

    Args:
        rows: ``(marker name, row)`` pairs of one sample, final outputs included.
        rerun: How to rerun the model (see :class:`Rerun`).
        value_of: ``marker name -> ONNX value`` (``None`` when the ONNX side has none), asked
            in execution order; final outputs are asked under their root names.
        verdict: The rule introduced errors are judged by (see :func:`fxalign.compare_arrays`).
        which: Rerun only when a value breaks tolerance, or always (:data:`LocalRows`).
    """
    if which == "failing" and not any(row.failed for _, row in rows):
        for _, row in rows:
            if row.kind != "output":
                row.local_note = NOT_REPLAYED
        return
    by_name = {name: row for name, row in rows}
    attempt = _attempt(rerun, value_of, by_name, verdict, reshape=True)
    if isinstance(attempt, str):
        # ONNX values of other shapes may not fit the code after them: keep PyTorch's there.
        attempt = _attempt(rerun, value_of, by_name, verdict, reshape=False)
    if isinstance(attempt, str):  # the model raised on ONNX values: say so on every row
        for _, row in rows:
            row.local_note = attempt
        return
    checks, answers, out = attempt
    if answers.diverted is None:
        for name, value in flatten_outputs(out).items():
            onnx = value_of(name)
            if name in by_name and onnx is not None and tuple(onnx.shape) == tuple(value.shape):
                checks.add(name, value, onnx)
    owners = _owners(rerun, by_name)
    seen = _Seen(set(answers.unanswered), answers.reshaped, rerun.names, answers.passed_on)
    done = set(rerun.names[: answers.position])
    for name, row in rows:
        reached = name in done if row.kind != "output" else answers.diverted is None
        if not reached:
            _after_divergence(name, row, rerun, value_of, verdict, answers.diverted)
        else:
            _set_introduced(name, row, checks, owners, seen, rerun)
        if row.failed and row.break_at is None and (row.local is None or row.introduced_failed):
            row.break_at = seen.position(name)


def _attempt(
    rerun: Rerun,
    value_of: ValueOf,
    rows: Mapping[MarkerName, Row],
    verdict: Verdict,
    *,
    reshape: bool,
) -> tuple[_Checks, Answering, Any] | str:
    """One rerun answering from ONNX: its checks, what it saw and its output; or why it failed."""
    checks = _Checks(rows, verdict)
    answers = Answering(list(rerun.names), value_of, checks.add, reshape=reshape)
    try:
        out = contextvars.copy_context().run(_rerun, rerun.run, answers)
    except Exception as e:
        logger.debug("rerunning on ONNX values failed: %s", e)
        return f"rerun on ONNX values failed: {first_line(e, 120)}"
    return checks, answers, out


def set_local_error(row: Row, reference: np.ndarray, got: np.ndarray, verdict: Verdict) -> None:
    """Set ``row.local`` from a replayed value and the ONNX one (or say why their shapes differ)."""
    if reference.shape != got.shape:
        row.local_note = (
            f"replayed shape {list(reference.shape)} differs from ONNX {list(got.shape)}"
        )
        return
    row.local, _ = compare_arrays(
        reference,
        got,
        atol=row.atol,
        rtol=row.rtol,
        verdict=verdict,
        eps=dtype_eps(row.torch_dtype),
    )
    row.local_scope = "module"


@dataclasses.dataclass
class _Seen:
    """What the rerun saw: markers left unanswered, shapes that differ, execution positions."""

    unanswered: set[MarkerName]
    reshaped: Mapping[MarkerName, tuple[list[int], list[int]]]
    order: Sequence[MarkerName]
    passed_on: Callable[[MarkerName], list[MarkerName]]  # Answering.passed_on

    def __post_init__(self) -> None:
        self._index = {n: i for i, n in enumerate(self.order)}

    def position(self, name: MarkerName) -> int:
        """Execution index of a marker (final outputs come after every marker)."""
        return self._index.get(name, len(self.order))


class _Checks:
    """``marker -> Metrics`` of what the rerun computed there against the ONNX value."""

    def __init__(self, rows: Mapping[MarkerName, Row], verdict: Verdict) -> None:
        self.rows, self.verdict = rows, verdict
        self.metrics: dict[MarkerName, Metrics] = {}
        # An input marker is judged by the tolerance of its call's output row.
        self._call_rows = {n.call: r for n, r in rows.items()}

    def add(self, name: MarkerName, computed: torch.Tensor, onnx: np.ndarray) -> None:
        row = self.rows.get(name) or self._call_rows.get(name.call)
        if row is None:
            return  # a marker no row shows (a value compared in another batch is shown)
        self.metrics[name], _ = compare_arrays(
            to_numpy(computed),
            onnx,
            atol=row.atol,
            rtol=row.rtol,
            verdict=self.verdict,
            eps=dtype_eps(row.torch_dtype),
        )


def _owners(rerun: Rerun, rows: Mapping[MarkerName, Row]) -> dict[CallId | None, list[MarkerName]]:
    """``call -> input markers its own code computed`` (``None``: the model's own code).

    The recorded parent of a call is the innermost *marked call* open when it started; a block
    torch.fx inlined without marking its call lies between them by module path and owns the
    input instead (the deepest such block).
    """
    blocks = {n.call for n, r in rows.items() if r.kind == "block" and not n.is_input}
    unrecorded: dict[str, CallId] = {}
    for call in blocks:
        if call not in rerun.inputs:
            unrecorded.setdefault(call.module_path, call)
    owners: dict[CallId | None, list[MarkerName]] = {}
    for name in rerun.names:
        if not name.is_input:
            continue
        parent = rerun.parents.get(name.call)
        owner = _deepest_between(parent, name.call.module_path, unrecorded) or parent
        owners.setdefault(owner, []).append(name)
    return owners


def _deepest_between(
    parent: CallId | None, path: str, unrecorded: Mapping[str, CallId]
) -> CallId | None:
    """The deepest unrecorded block strictly between ``parent`` and the module at ``path``."""
    top = "" if parent is None else parent.module_path
    if top and not path.startswith(top + "."):
        return None  # called from elsewhere (a shared module): the recorded parent owns it
    parts = path.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        candidate = ".".join(parts[:depth])
        if len(candidate) <= len(top):
            break
        if candidate in unrecorded:
            return unrecorded[candidate]
    return None


def _set_introduced(
    name: MarkerName,
    row: Row,
    checks: _Checks,
    owners: Mapping[CallId | None, list[MarkerName]],
    seen: _Seen,
    rerun: Rerun,
) -> None:
    """A row's introduced error from the checks of its own code."""
    own = checks.metrics.get(name)
    if row.kind == "leaf":
        missing = [i for i in rerun.inputs.get(name.call, ()) if i in seen.unanswered]
        exact = [i for i in missing if _holds_onnx(i, seen)]  # an ONNX value handed on
        feeding = [_fed(i, seen, rerun) for i in missing if i not in exact]
        if own is not None and missing and all(feeding):
            if not feeding:  # what it reads there is the file's value, as it was handed on
                row.local, row.local_scope = own, "module"
                return
            # a submodule's output without ONNX value is all it reads there (a Conv fused
            # into this BatchNorm): this check measures the two together, nothing else
            shown = _shown(str(s) for s in feeding if s is not None)
            row.local, row.local_scope = own, "with_submodules"
            row.local_note = (
                f"includes the error of {shown} (its {_no_value(missing[0], rerun)}; the "
                "output it reads there, computed from ONNX values, is checked with its own)"
            )
            return
        if own is None or missing:
            what = missing[0] if missing else name
            row.local_note = f"{_no_value(what, rerun)}: no local error"
            if missing and row.failed:  # what reaches it is unchecked: it may carry the error
                row.local_note += ", and the error may come in with that input"
            return
        row.local, row.local_scope = own, "module"
        return
    code = None if row.kind == "output" else name.call
    handed = owners.get(code, [])  # the inputs its own code computed for the calls it made
    reshaped = [i for i in handed if i in seen.reshaped]
    if reshaped:
        got, want = seen.reshaped[reshaped[0]]
        row.local_note = f"its code hands {reshaped[0]} a {got} value where ONNX has {want}"
        row.break_at = seen.position(reshaped[0])
        return
    parts = [(seen.position(i), checks.metrics[i]) for i in handed if i in checks.metrics]
    if own is not None:
        parts.append((seen.position(name), own))
    gone = [i for i in handed if i in seen.unanswered]
    kinds = _kinds(code, gone, seen, rerun)
    through = _through(kinds, checks)
    parts.extend((seen.position(n), checks.metrics[n]) for n in through)
    broken = [at for at, m in parts if m.mismatched > 0]
    if own is None and not broken:  # its output part is unchecked: nothing to say it is right
        row.local_note = f"{_no_value(name, rerun)}: no self error"
        return
    row.local = _worst([m for _, m in parts])
    row.local_scope = "own_code"
    if broken:
        row.break_at = min(broken)
    # what a leaf reads unchanged of a recomputed output counts in that leaf's check, not here
    covered = {n.call for n in through}
    fed = [i for i in gone if kinds[i] == "fed" and i.call not in covered]
    taken = {m for i in fed for m in seen.passed_on(i)}
    made = {i.call for i in handed}
    recomputed = [  # reaching its output's check (none without an output)
        n
        for n in seen.unanswered
        if own is not None and not n.is_input and n.call in made and n not in taken
    ]
    in_checks = covered | {n.call for n in recomputed}
    unchecked = [i for i in gone if kinds[i] == "code" and i.call not in in_checks]
    notes = []
    if own is None:  # its code broke before its output, which the file does not hold
        notes.append(
            f"{_no_value(name, rerun)}: its self error is that of the values its code hands "
            "its submodules"
        )
    if recomputed:
        shown = _shown(_label(n) for n in recomputed)
        notes.append(f"includes the error of {shown} ({_no_value(recomputed[0], rerun)})")
    if through:
        entering = next(i for i in gone if i.call == through[0].call)
        notes.append(
            f"includes the error of {_shown(_label(n) for n in through)} (its "
            f"{_no_value(entering, rerun)}: its output, checked, holds the error of the "
            "code computing that input)"
        )
    if recomputed or through:
        row.local_scope = "with_submodules"
    if unchecked:
        notes.append(f"not checked: {_no_value(unchecked[0], rerun)}")
        if not broken:  # the part of its code that computes that input is unchecked
            row.local, row.local_scope, row.break_at = None, None, None
            notes[-1] += ": no self error (its code computing that input is unchecked)"
    if notes:
        row.local_note = "; ".join(notes)


def _kinds(
    code: CallId | None, gone: Sequence[MarkerName], seen: _Seen, rerun: Rerun
) -> dict[MarkerName, str]:
    """Where each input ``code`` handed a call without ONNX value got what it holds.

    ``"handed on"``: one of the caller's own inputs, unchanged (what came before the caller);
    ``"exact"``: an ONNX value handed on unchanged (a Dropout's input); ``"fed"``: the output
    of a leaf fused into the call reading it (:func:`_fed`: that leaf's check has it);
    ``"code"``: computed by the caller's code (or a submodule it recomputed).
    """
    own = set(rerun.inputs.get(code, ())) if code is not None else set()
    kinds: dict[MarkerName, str] = {}
    for i in gone:
        if not own.isdisjoint(seen.passed_on(i)):
            kinds[i] = "handed on"
        elif _holds_onnx(i, seen):
            kinds[i] = "exact"
        elif _fed(i, seen, rerun) is not None:
            kinds[i] = "fed"
        else:
            kinds[i] = "code"
    return kinds


def _through(kinds: Mapping[MarkerName, str], checks: _Checks) -> list[MarkerName]:
    """Checked outputs of the calls whose inputs the caller's code computed (:func:`_kinds`).

    The rerun goes on from such an input with the value computed there, so the check of the
    call's output measures that call *and* the code computing its input, unless the call
    also reads one of the caller's own inputs handed on (what came before the caller). Those
    checks belong to the caller's self error (``attn``'s inline attention math feeding
    ``c_proj``, whose input the file does not hold, is checked at ``c_proj``'s output).
    """
    by_call: dict[CallId, set[str]] = {}
    for i, kind in kinds.items():
        by_call.setdefault(i.call, set()).add(kind)
    calls = {c for c, k in by_call.items() if "code" in k and "handed on" not in k}
    return [n for n in checks.metrics if not n.is_input and n.call in calls]


def _fed(name: MarkerName, seen: _Seen, rerun: Rerun) -> CallId | None:
    """The call fused into ``name``'s whose output, computed from ONNX values, it holds.

    By tensor identity (:meth:`fxalign.markers.Answering.passed_on`): the rerun handed the
    output of that call, a leaf without ONNX value because the file computes it with the
    nodes of ``name``'s call (:attr:`Rerun.fused`: a Conv folded into the BatchNorm reading
    it), on to ``name`` as it was; every input of that call holds an ONNX value, so what
    ``name``'s call's check measures is the two fused modules and nothing else.
    """
    blocks = set(rerun.parents.values())
    for earlier in seen.passed_on(name):
        if earlier.is_input or earlier.call in blocks:
            continue  # a block returning it: the leaf inside that computed it is further back
        inputs = rerun.inputs.get(earlier.call)
        if earlier.call == name.call or not inputs or rerun.fused.get(earlier) != name.call:
            return None
        return earlier.call if all(_holds_onnx(i, seen) for i in inputs) else None
    return None


def _holds_onnx(name: MarkerName, seen: _Seen) -> bool:
    """Whether marker ``name`` answered, or holds unchanged a value an earlier one answered."""
    if name not in seen.unanswered:
        return True
    chain = seen.passed_on(name)
    return bool(chain) and chain[-1] not in seen.unanswered


def _shown(labels: Iterable[str]) -> str:
    modules = list(dict.fromkeys(labels))
    return ", ".join(modules[:3]) + (", ..." if len(modules) > 3 else "")


def _after_divergence(
    name: MarkerName,
    row: Row,
    rerun: Rerun,
    value_of: ValueOf,
    verdict: Verdict,
    diverted: str | None,
) -> None:
    """Rows the rerun did not reach on its recorded path: each call is replayed on its own."""
    why = f"the rerun on ONNX values took another path ({diverted})"
    got = value_of(name)
    if row.kind == "output" or rerun.replay is None or got is None:
        row.local_note = f"no introduced error: {why}"
        return
    outcome = rerun.replay(name.call)
    if isinstance(outcome, str):
        row.local_note = outcome
        return
    ref = outcome.get(name.leaf)
    if ref is None:
        row.local_note = "no such output"
        return
    set_local_error(row, to_numpy(ref), got, verdict)
    if row.kind == "block" and row.local is not None:
        row.local_scope = "with_submodules"
        row.local_note = f"rerun whole, with its submodules: {why}"


def _worst(metrics: Sequence[Metrics]) -> Metrics:
    """The metrics that break tolerance on the most elements, or else have the largest error."""
    return max(
        metrics, key=lambda m: (m.mismatched > 0, m.max_abs if m.max_abs == m.max_abs else 0)
    )


def _label(name: MarkerName) -> str:
    return f"input {name}" if name.is_input else str(name) or "output"


def _no_value(name: MarkerName, rerun: Rerun) -> str:
    why = rerun.reasons.get(name)
    return f"{_label(name)} has no ONNX value" + (f" ({why})" if why else "")


def _rerun(run: Callable[[], Any], answers: Answering) -> Any:
    new_forward_scope()
    with torch.no_grad(), torch.random.fork_rng(devices=[]), answering(answers):
        return run()


def _replay(
    instrumented: torch.nn.Module, record: CallRecord, value_of: ValueOf
) -> dict[LeafPath, torch.Tensor] | str:
    """Run the module of ``record`` on ONNX input values; return outputs by leaf, or why not."""
    leaves = []
    for leaf in record.leaves:
        if not isinstance(leaf, InputRef):
            leaves.append(leaf)
            continue
        value = value_of(leaf.name)
        if value is None:
            label = leaf_suffix(leaf.name.leaf) or "input"
            return f"input {label} is not in the ONNX graph (folded away by the exporter)"
        tensor = torch.from_numpy(np.array(value, copy=True))
        leaves.append(tensor.to(record.dtypes[leaf.name]))
    args, kwargs = pytree.tree_unflatten(leaves, record.spec)
    try:
        module = replay_module(instrumented, record.module_path)
    except AttributeError:
        return f"module {record.module_path!r} not found in the instrumented model"
    # A fresh context: the replay's own markers must not advance the run's call counters.
    try:
        out = contextvars.copy_context().run(_call, module, args, kwargs)
    except Exception as e:
        logger.debug("replaying %s failed: %s", record.module_path, e)
        return f"replay on ONNX inputs failed: {first_line(e, 120)}"
    return tensor_leaves(out)


def _call(module: torch.nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> object:
    new_forward_scope()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        return module(*args, **kwargs)
