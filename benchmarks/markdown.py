"""Render benchmark results (plain data from :func:`benchmarks.harness.run_benchmarks`) as markdown.

Every number in the output comes from the results; the prose is fixed text about the method.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["TARGET_MODELS", "TARGETS", "render", "targets"]

TARGET_MODELS = ("resnet50", "bert-base")
"""The models the speed targets are stated for."""

TARGETS = {
    "export": 1.25,
    "align": 1.3,
    "verify": 20.0,
    "flat": 1.25,
}
"""Instrumented/plain export ratio, align/floor ratio, speedup over verify_onnx_program, and
the largest ratio of marginal per-module time (last size step over the first) still "flat"."""

_STAGES = ("instrument", "run_torch", "export", "extract", "run_onnx", "compare")


def _s(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def _x(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}x"


def _mb(x: float | None) -> str:
    return "—" if x is None else f"{x / 2**20:.0f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return [*out, ""]


def _each(results: dict[str, Any]) -> Iterable[tuple[dict[str, Any], str, dict[str, Any]]]:
    for model in results.get("models", []):
        for exporter, row in model.get("exporters", {}).items():
            yield model, exporter, row


def _flatness(
    scaling: list[dict[str, Any]], exporter: str, own: bool = False
) -> dict[str, Any] | None:
    """Marginal ms/module over the last step against the one over the first steps.

    With ``own``, the export stage (the exporter's own scaling) is left out: fxalign's stages.
    """
    points = sorted((p for p in scaling if p["exporter"] == exporter), key=lambda p: p["modules"])
    if len(points) < 3:
        return None

    def seconds(p: dict[str, Any]) -> float:
        if not own:
            return float(p["align_s"])
        return float(p["align_s"]) - float(p["stages"].get("export", 0.0))

    def slope(a: dict[str, Any], b: dict[str, Any]) -> float:
        return 1000 * (seconds(b) - seconds(a)) / (b["modules"] - a["modules"])

    first = slope(points[0], points[-2])
    last = slope(points[-2], points[-1])
    return {
        "first": first,
        "last": last,
        "ratio": last / first if first > 0 else None,
        "range": (points[0]["modules"], points[-2]["modules"], points[-1]["modules"]),
    }


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured value and whether it is met."""
    out: list[dict[str, Any]] = []
    for model, exporter, row in _each(results):
        if model["name"] not in TARGET_MODELS:
            continue
        exp, al = row.get("export"), row.get("align")
        if exp:
            out.append(
                {
                    "target": f"instrumented export <= {TARGETS['export']}x plain",
                    "model": model["name"],
                    "exporter": exporter,
                    "value": _x(exp["ratio"]),
                    "met": exp["ratio"] <= TARGETS["export"],
                }
            )
        if al:
            out.append(
                {
                    "target": f"align <= {TARGETS['align']}x floor",
                    "model": model["name"],
                    "exporter": exporter,
                    "value": _x(al["ratio"]),
                    "met": al["ratio"] <= TARGETS["align"],
                }
            )
            if al.get("no_local_ratio") is not None:
                out.append(
                    {
                        "target": f"align(local=False) <= {TARGETS['align']}x floor",
                        "model": model["name"],
                        "exporter": exporter,
                        "value": _x(al["no_local_ratio"]),
                        "met": al["no_local_ratio"] <= TARGETS["align"],
                    }
                )
        ver = row.get("verify")
        if ver and al and model["name"] == "resnet50":
            speedup = ver["total_s"] / al["align_s"]
            out.append(
                {
                    "target": f">= {TARGETS['verify']:.0f}x faster than verify_onnx_program",
                    "model": model["name"],
                    "exporter": exporter,
                    "value": f"{speedup:.1f}x",
                    "met": speedup >= TARGETS["verify"],
                }
            )
    for exporter, own in itertools.product(
        results.get("settings", {}).get("exporters", []), (False, True)
    ):
        flat = _flatness(results.get("scaling") or [], exporter, own)
        if flat and flat["ratio"] is not None:
            a, b, c = flat["range"]
            what = "align without the export stage" if own else "align"
            out.append(
                {
                    "target": f"flat time per module, {what} (marginal ms/module {b}->{c} over "
                    f"{a}->{b} <= {TARGETS['flat']})",
                    "model": "synthetic",
                    "exporter": exporter,
                    "value": f"{flat['last']:.2f} / {flat['first']:.2f} ms = {flat['ratio']:.2f}",
                    "met": flat["ratio"] <= TARGETS["flat"],
                }
            )
    return out


def _header(results: dict[str, Any]) -> list[str]:
    m = results["machine"]
    s = results["settings"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `{s['command']}` on {results['started']} "
        f"({results.get('duration_s', 0) / 60:.1f} min). Every number on this page was measured "
        "by that run and written by `benchmarks/markdown.py`; none is typed by hand. "
        f"Times are the best of {s['repeats']} run(s) in one process (the machine is shared: "
        "other work only adds time, so the minimum is the steadiest estimate); peak memory is "
        "measured in "
        "a fresh child process per measurement (`VmHWM`).",
        "",
        "## Machine",
        "",
    ]
    lines += _table(
        ["", ""],
        [
            ["CPU", m["cpu"]],
            [
                "cores",
                f"{m['cores']} (usable {m['usable_cores']}, torch threads {m['torch_threads']}), "
                "shared with other work",
            ],
            ["memory", f"{m['memory_gib']} GiB"],
            ["OS / Python", f"{m['os']} / {m['python']}"],
            ["versions", versions],
            ["fxalign commit", m.get("fxalign_commit") or "unknown"],
            [
                "load average (1, 5, 15 min)",
                f"{(results.get('load_average') or {}).get('start')} at the start, "
                f"{(results.get('load_average') or {}).get('end')} at the end",
            ],
        ],
    )
    return lines


def _targets_section(results: dict[str, Any]) -> list[str]:
    rows = targets(results)
    if not rows:
        return []
    lines = ["## Targets", ""]
    lines += _table(
        ["target", "model", "exporter", "measured", "met"],
        [
            [t["target"], t["model"], t["exporter"], t["value"], "yes" if t["met"] else "**no**"]
            for t in rows
        ],
    )
    return lines


def _models_section(results: dict[str, Any]) -> list[str]:
    lines = ["## Models", ""]
    lines += _table(
        ["model", "what", "modules", "parameters"],
        [
            [m["name"], m["description"], m["modules"], f"{m['parameters'] / 1e6:.1f} M"]
            for m in results.get("models", [])
        ],
    )
    return lines


def _op_changes(exp: dict[str, Any]) -> str:
    plain, instr, debug = exp["plain"]["ops"], exp["instrumented"]["ops"], exp["debug"]["ops"]
    ops = sorted(set(plain) | set(instr) | set(debug))
    changed = [
        f"{op} {plain.get(op, 0)}/{instr.get(op, 0)}/{debug.get(op, 0)}"
        for op in ops
        if not plain.get(op, 0) == instr.get(op, 0) == debug.get(op, 0)
    ]
    return ", ".join(changed) or "none"


def _export_section(results: dict[str, Any]) -> list[str]:
    rows = []
    ops = []
    for model, exporter, row in _each(results):
        exp = row.get("export")
        if not exp:
            continue
        rows.append(
            [
                model["name"],
                exporter,
                exp["instrumentation"],
                f"{exp['markers']} ({exp['instrumented']['ops'].get('fxalign::Debug', 0)})",
                _s(exp["plain_s"]),
                _s(exp["instrumented_s"]),
                _x(exp["ratio"]),
                f"{exp['plain']['nodes']} / {exp['instrumented']['nodes']} / "
                f"{exp['debug']['nodes']}",
                f"{_mb(exp['plain']['bytes'])} / {_mb(exp['instrumented']['bytes'])}",
                _s(exp["extract_s"]),
            ]
        )
        ops.append([model["name"], exporter, _op_changes(exp)])
    if not rows:
        return []
    lines = [
        "## Export: plain vs instrumented",
        "",
        "`markers` counts module outputs compared; `Debug` counts marker nodes in the exported "
        "graph (a value marked by several modules, such as a block's output that is its last "
        "layer's output, needs one node). Nodes: plain export / instrumented export / debug "
        "model after `extract`.",
        "",
    ]
    lines += _table(
        [
            "model",
            "exporter",
            "instrumentation",
            "markers (Debug)",
            "plain s",
            "instrumented s",
            "ratio",
            "nodes",
            "MB plain / instr.",
            "extract s",
        ],
        rows,
    )
    lines += ["Op types whose counts differ (plain / instrumented / debug):", ""]
    lines += _table(["model", "exporter", "op counts"], ops)
    return lines


def _ort_section(results: dict[str, Any]) -> list[str]:
    rows = []
    for model, exporter, row in _each(results):
        ort = row.get("ort")
        if not ort:
            continue
        p, d = ort["plain"], ort["debug"]
        rows.append(
            [
                model["name"],
                exporter,
                f"{_s(p['session_s'])} / {_s(d['session_s'])}",
                f"{_s(p['run_s'])} / {_s(d['run_s'])}",
                f"{_mb(p['peak_rss'])} / {_mb(d['peak_rss'])}",
                f"{_mb(p['peak_delta'])} / {_mb(d['peak_delta'])}",
                f"{p['outputs']} / {d['outputs']}",
                _mb(d["output_bytes"]),
            ]
        )
    if not rows:
        return []
    lines = [
        "## ONNX Runtime: plain vs debug model",
        "",
        "Each model runs in a fresh process (CPU provider, default options). Load = session "
        "creation; run = best `session.run` over every output; peak RSS = `VmHWM`; "
        "peak added = `VmHWM` minus the RSS before loading the model.",
        "",
    ]
    lines += _table(
        [
            "model",
            "exporter",
            "load s plain / debug",
            "run s plain / debug",
            "peak RSS MB plain / debug",
            "peak added MB",
            "outputs",
            "debug outputs MB",
        ],
        rows,
    )
    return lines


def _align_section(results: dict[str, Any]) -> list[str]:
    rows = []
    for model, exporter, row in _each(results):
        al = row.get("align")
        if not al:
            continue
        f = al["floor"]
        st = al["stages"]
        rows.append(
            [
                model["name"],
                exporter,
                f"{_s(al['floor_s'])} ≈ {_s(f['plain_export_s'])} + {_s(f['torch_forward_s'])}"
                f" + {_s(f['ort_s'])}",
                _s(al["align_s"]),
                _x(al["ratio"]),
                _s(al.get("no_local_s")),
                _x(al.get("no_local_ratio")),
                *(_s(st.get(k)) for k in _STAGES),
                f"{al['compared']}/{al['rows']}",
                al["instrumentation"],
            ]
        )
    if not rows:
        return []
    lines = [
        "## End to end: `align` vs the floor",
        "",
        "Floor = plain export + one PyTorch forward + one ONNX Runtime forward (session load "
        "and run) of the plain model: what checking only the final output costs. Each repeat "
        "measures the floor, then `align`; the floor is the best of the sums (its parts are "
        "bests too). `align` stages are the bests of its own `report.timings`; with the model "
        "eager-wrapped (`fallback`) `instrument` is the failed `torch.fx` attempt plus the "
        "wrapping. `run_onnx` spans the whole comparison stage: feeds, ONNX Runtime (session "
        "load and run) and `compare`, which includes the local-error replays. *local=False*: "
        "`align(local=False)` in the same repeat, without module inputs marked or replays.",
        "",
    ]
    lines += _table(
        [
            "model",
            "exporter",
            "floor s = export + torch + ORT",
            "align s",
            "ratio",
            "local=False s",
            "ratio",
            *_STAGES,
            "rows compared",
            "instrumentation",
        ],
        rows,
    )
    return lines + _attach_section(results)


def _attach_section(results: dict[str, Any]) -> list[str]:
    """The two attach modes beside the marker mode, from the same repeats."""
    rows = []
    for model, exporter, row in _each(results):
        at = (row.get("align") or {}).get("attach")
        if not at:
            continue
        rows.append(
            [
                model["name"],
                exporter,
                _s(row["align"]["align_s"]),
                f"{_s(at['onnx_s'])} ({_x(at['onnx_ratio'])} of {_s(at['onnx_floor_s'])})",
                f"{_s(at['export_attach_s'])} ({_x(at['export_attach_ratio'])})",
                f"{at['compared']}/{at['rows']}",
                "aligned" if at["passed"] else f"diverged at {at['first_divergence']}",
            ]
        )
    if not rows:
        return []
    lines = [
        "",
        "### The attach modes beside the marker mode",
        "",
        "Same repeats. *onnx=*: `align(onnx=the plain export)`, the user's own file, against "
        "its floor (one PyTorch forward + one ONNX Runtime forward with session load: no "
        "export). *attach=True*: export-and-attach (fxalign makes the plain export), against "
        "the floor above. Rows compared: module values that are distinct tensors of the file.",
        "",
    ]
    return lines + _table(
        [
            "model",
            "exporter",
            "markers s",
            "onnx= s (ratio)",
            "attach=True s (ratio)",
            "rows compared",
            "verdict",
        ],
        rows,
    )


_OVER_FLOOR = (
    ("export overhead", "export minus the floor's plain export"),
    ("compare", "metrics and local-error replays"),
    ("ONNX side", "run_onnx without compare, minus the floor's ORT run"),
    ("instrument", "the failed torch.fx attempt and the eager wrapping, or the FX pass"),
    ("extract", "graph surgery and saving the debug model"),
    ("PyTorch side", "run_torch minus the floor's forward"),
)


def _over_floor(al: dict[str, Any]) -> dict[str, float]:
    """Seconds ``align`` spends over its floor, by where they go (see ``_OVER_FLOOR``)."""
    st, f = al["stages"], al["floor"]
    parts = {
        "export overhead": st.get("export", 0.0) - f["plain_export_s"],
        "compare": st.get("compare", 0.0),
        "ONNX side": st.get("run_onnx", 0.0) - st.get("compare", 0.0) - f["ort_s"],
        "instrument": st.get("instrument", 0.0),
        "extract": st.get("extract", 0.0),
        "PyTorch side": st.get("run_torch", 0.0) - f["torch_forward_s"],
    }
    parts["rest"] = al["align_s"] - al["floor_s"] - sum(parts.values())
    return parts


def in_the_way_section(results: dict[str, Any]) -> list[str]:
    rows, missed = [], []
    for model, exporter, row in _each(results):
        al = row.get("align")
        if not al:
            continue
        parts = _over_floor(al)
        allowed = (TARGETS["align"] - 1) * al["floor_s"]
        local = al["align_s"] - al["no_local_s"] if al.get("no_local_s") is not None else None
        rows.append(
            [
                model["name"],
                exporter,
                _s(al["floor_s"]),
                _s(al["align_s"] - al["floor_s"]),
                _s(allowed),
                *(f"{parts[name]:+.3f}" for name, _ in (*_OVER_FLOOR, ("rest", ""))),
                "—" if local is None else f"{local:+.3f}",
            ]
        )
        if model["name"] in TARGET_MODELS and al["ratio"] > TARGETS["align"]:
            ranked = sorted(
                ((k, v) for k, v in parts.items() if k != "rest" and v > 0),
                key=lambda kv: -kv[1],
            )
            top = ", ".join(f"{k} {v:.2f} s" for k, v in ranked[:3])
            missed.append(
                f"* **{model['name']} / {exporter}**: {_s(al['align_s'] - al['floor_s'])} s "
                f"over the floor where {TARGETS['align']}x allows {_s(allowed)} s; largest "
                f"parts: {top}"
                + ("" if local is None else f"; local errors account for {local:.2f} s")
                + "."
            )
    if not rows:
        return []
    lines = [
        f"## What stands in the way of `align` <= {TARGETS['align']}x the floor",
        "",
        "The seconds `align` spends over its floor, split by where they go (from the bests "
        "of the end-to-end table above): "
        + "; ".join(f"*{name}*: {what}" for name, what in _OVER_FLOOR)
        + "; *rest*: what the stage bests do not account for. *Local errors* is `align` "
        "minus `align(local=False)`: the replays plus the module inputs they mark (which "
        "also enlarge the export). The export overhead is broken down by exporter phase "
        "in *Where the export time goes* below.",
        "",
    ]
    lines += _table(
        [
            "model",
            "exporter",
            "floor s",
            "over the floor s",
            "target allows s",
            *(name for name, _ in _OVER_FLOOR),
            "rest",
            "local errors",
        ],
        rows,
    )
    if missed:
        lines += ["Targets missed, and the largest parts of the excess:", "", *missed, ""]
    return lines


def _alternatives_section(results: dict[str, Any]) -> list[str]:
    rows = []
    for model, exporter, row in _each(results):
        side, ver, al = row.get("onnx_side"), row.get("verify"), row.get("align")
        if not side and not ver:
            continue
        speed = side["tutorial_s"] / side["fxalign_s"] if side else None
        rows.append(
            [
                model["name"],
                exporter,
                _s(side["fxalign_s"]) if side else "—",
                _s(side["tutorial_s"]) if side else "—",
                _x(speed),
                f"{side['rows_fxalign']} / {side['rows_tutorial']}" if side else "—",
                f"{side['max_value_difference']:.1e}" if side else "—",
                f"{_s(ver['total_s'])} = {_s(ver['export_s'])} + {_s(ver['verify_s'])}"
                if ver
                else "—",
                ver["values"] if ver else "—",
                _s(al["align_s"]) if al else "—",
                _x(ver["total_s"] / al["align_s"]) if ver and al else "—",
            ]
        )
    if not rows:
        return []
    lines = [
        "## The same report, other ways",
        "",
        "*ONNX side* starts from the same instrumented export. fxalign: `extract` "
        "(graphsurgeon) + one ORT run. Tutorial: Debug -> Identity, shape inference, "
        "`onnx.utils.Extractor(model).extract_model(inputs, outputs)` + one ORT run. Rows: "
        "values compared against one PyTorch run by each; max difference: largest "
        "|fxalign - tutorial| over all marked values (0: the same report). "
        "`verify_onnx_program(compare_intermediates=True)` (dynamo only) is timed with the "
        "plain export it needs and compares every intermediate value of the exported program.",
        "",
    ]
    lines += _table(
        [
            "model",
            "exporter",
            "fxalign ONNX side s",
            "tutorial ONNX side s",
            "tutorial / fxalign",
            "rows",
            "max difference",
            "verify s = export + verify",
            "values verified",
            "align s",
            "verify / align",
        ],
        rows,
    )
    return lines


def _scaling_section(results: dict[str, Any]) -> list[str]:
    points = results.get("scaling") or []
    if not points:
        return []
    rows = []
    previous: dict[str, dict[str, Any]] = {}
    for p in sorted(points, key=lambda p: (p["exporter"], p["modules"])):
        prev = previous.get(p["exporter"])
        marginal = []
        for key in (None, *_STAGES):
            if prev is None:
                marginal.append("—")
                continue
            a = prev["align_s"] if key is None else prev["stages"].get(key, 0.0)
            b = p["align_s"] if key is None else p["stages"].get(key, 0.0)
            marginal.append(f"{1000 * (b - a) / (p['modules'] - prev['modules']):.2f}")
            if key == "export":
                a, b = prev.get("plain_export_s"), p.get("plain_export_s")
                marginal.append(
                    "—"
                    if a is None or b is None
                    else f"{1000 * (b - a) / (p['modules'] - prev['modules']):.2f}"
                )
        if prev is None:
            marginal.append("—")
        rows.append(
            [
                p["exporter"],
                p["modules"],
                p["rows"],
                p["instrumentation"],
                _s(p["align_s"]),
                f"{p['per_module_ms']:.2f}",
                *marginal,
            ]
        )
        previous[p["exporter"]] = p
    lines = [
        "## Scaling with the number of modules",
        "",
        "Synthetic chains of `Linear(8, 8) + ReLU` blocks with one unused layer each (so a "
        "quarter of the modules are reported as not called). *Marginal* = extra milliseconds "
        "per extra module since the previous size, in total and per stage: a quadratic step "
        "shows as a marginal cost that grows with size. *Plain export* is `torch.onnx.export` "
        "of the same model without markers: where it grows too, the growth is the exporter's. "
        "Times are the best of the repeats.",
        "",
    ]
    lines += _table(
        [
            "exporter",
            "modules",
            "rows",
            "instrumentation",
            "align s",
            "ms/module",
            "marginal ms/module",
            *(
                name
                for k in _STAGES
                for name in (f"marginal {k}", "marginal plain export")
                if k == "export" or name != "marginal plain export"
            ),
        ],
        rows,
    )
    return lines


def _jit_cse_section(results: dict[str, Any]) -> list[str]:
    points = results.get("jit_cse") or []
    if not points:
        return []
    labels = ["distinct names", "one name", "no markers"]
    rows = [[p["markers"], *(_s(p[k]) for k in labels)] for p in points]
    return [
        "### TorchScript: the CSE pass and marker names",
        "",
        "The TorchScript exporter runs TorchScript's common-subexpression pass "
        "(`torch._C._jit_pass_cse`) on the traced graph, in which every marker call leaves its "
        "name as a string constant. Seconds for that pass alone on a traced chain of additions, "
        "each followed by a marker with its own name (what `instrument` produces), by markers "
        "sharing one name, or by nothing. Read the growth down each column (doubling the "
        "markers) and the columns against each other: distinct names are what `instrument` "
        "needs, so whatever the first column adds over the others is a cost inside the "
        "exporter's pass that only a change of marker naming could avoid.",
        "",
        *_table(["markers", *(f"{k} s" for k in labels)], rows),
        "",
    ]


def _memory_section(results: dict[str, Any]) -> list[str]:
    mem = results.get("memory")
    if not mem:
        return []
    rows = []
    for level in ("run_onnx", "align"):
        runs = mem.get(level)
        if not runs:
            continue
        for label in ("all", "split"):
            r = runs[label]
            rows.append(
                [
                    f"`{level}`",
                    r["max_outputs_per_run"] or "— (one run)",
                    _mb(r["peak_rss"]),
                    _mb(r["peak_delta"]),
                    _s(r["seconds"]),
                    "yes" if runs["identical"] else "**NO**",
                ]
            )
    lines = [
        "## Memory: `max_outputs_per_run`",
        "",
        f"{mem['model']} ({mem['exporter']}), each run in a fresh process. `run_onnx`: the "
        "debug model, every output read in order and dropped; `align`: the whole call, model "
        "building excluded from *peak added*; with the bound it compares a batch of values at "
        "a time, both models running once per batch. "
        "Identical: SHA-256 of every value (`run_onnx`) or of every report row (`align`) "
        "equal with and without the split.",
        "",
    ]
    lines += _table(
        ["level", "max_outputs_per_run", "peak RSS MB", "peak added MB", "seconds", "identical"],
        rows,
    )
    return lines


def _profile_section(results: dict[str, Any]) -> list[str]:
    profiles = results.get("profiles") or []
    if not profiles:
        return []
    lines = [
        "## Where the export time goes (cProfile)",
        "",
        "Cumulative time per exporter phase, plain vs instrumented export of the same model "
        "(profiling slows Python-heavy phases, so read the columns against each other). "
        "*Share* is the phase's part of the instrumented export's extra time.",
        "",
    ]
    for prof in profiles:
        phases = prof["phases"]
        extra = phases["total"]["instrumented"] - phases["total"]["plain"]
        rows = []
        for phase, v in phases.items():
            d = v["instrumented"] - v["plain"]
            share = f"{100 * d / extra:.0f}%" if extra > 0 and phase != "total" else ""
            rows.append([phase, _s(v["plain"]), _s(v["instrumented"]), f"{d:+.3f}", share])
        lines += [f"**{prof['model']} / {prof['exporter']}**", ""]
        lines += _table(["phase", "plain s", "instrumented s", "difference s", "share"], rows)
    return lines


_METHOD = """## Method

* One process runs everything (`python -m benchmarks.run`), after one
  warm-up export per exporter. Models are built from `transformers` configs with random
  weights (no download); Hugging Face models are called through a small adapter that passes
  the input tensors by keyword.
* **Plain export** is `torch.onnx.export(model, args, path, dynamo=...)`; **instrumented
  export** is `fxalign.export` of `fxalign.instrument_model(...)`'s module. They alternate
  within each repeat.
* **Floor** = plain export + one PyTorch forward (`no_grad`) + one ORT session load and run of
  the plain model. **align** is `fxalign.align(model, args, exporter=...)` with default options.
* The quick mode (`--quick`, used by the tests) runs tiny models once: its numbers say nothing
  about speed.
"""


def render(results: dict[str, Any]) -> str:
    """The whole markdown page."""
    lines = _header(results)
    lines += _targets_section(results)
    lines += _models_section(results)
    lines += _export_section(results)
    lines += _ort_section(results)
    lines += _align_section(results)
    lines += in_the_way_section(results)
    lines += _alternatives_section(results)
    lines += _scaling_section(results)
    lines += _jit_cse_section(results)
    lines += _memory_section(results)
    lines += _profile_section(results)
    lines += [*_METHOD.splitlines(), ""]
    errors = results.get("errors") or []
    if errors:
        lines += ["## Errors", "", *(f"* {e}" for e in errors), ""]
    return "\n".join(lines).rstrip() + "\n"
