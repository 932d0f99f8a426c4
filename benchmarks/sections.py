"""Per-model sections of the benchmark page: models, export, ORT, end to end, attach, overhead."""

from __future__ import annotations

from typing import Any

from benchmarks.formatting import STAGES, each_row, fmt_mb, fmt_s, fmt_x, table
from benchmarks.targets import TARGET_MODELS, TARGETS

__all__ = [
    "align_section",
    "attach_section",
    "export_section",
    "in_the_way_section",
    "onnx_in_the_way_section",
    "models_section",
    "ort_section",
]


def models_section(results: dict[str, Any]) -> list[str]:
    lines = ["## Models", ""]
    lines += table(
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


def export_section(results: dict[str, Any]) -> list[str]:
    rows = []
    ops = []
    for model, exporter, row in each_row(results):
        exp = row.get("export")
        if not exp:
            continue
        rows.append(
            [
                model["name"],
                exporter,
                exp["instrumentation"],
                f"{exp['markers']} ({exp['instrumented']['ops'].get('fxalign::Debug', 0)})",
                fmt_s(exp["plain_s"]),
                fmt_s(exp["instrumented_s"]),
                fmt_x(exp["ratio"]),
                f"{exp['plain']['nodes']} / {exp['instrumented']['nodes']} / "
                f"{exp['debug']['nodes']}",
                f"{fmt_mb(exp['plain']['bytes'])} / {fmt_mb(exp['instrumented']['bytes'])}",
                fmt_s(exp["extract_s"]),
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
    lines += table(
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
    lines += table(["model", "exporter", "op counts"], ops)
    return lines


def ort_section(results: dict[str, Any]) -> list[str]:
    rows = []
    for model, exporter, row in each_row(results):
        ort = row.get("ort")
        if not ort:
            continue
        p, d = ort["plain"], ort["debug"]
        rows.append(
            [
                model["name"],
                exporter,
                f"{fmt_s(p['session_s'])} / {fmt_s(d['session_s'])}",
                f"{fmt_s(p['run_s'])} / {fmt_s(d['run_s'])}",
                f"{fmt_mb(p['peak_rss'])} / {fmt_mb(d['peak_rss'])}",
                f"{fmt_mb(p['peak_delta'])} / {fmt_mb(d['peak_delta'])}",
                f"{p['outputs']} / {d['outputs']}",
                fmt_mb(d["output_bytes"]),
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
    lines += table(
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


def align_section(results: dict[str, Any]) -> list[str]:
    rows = []
    for model, exporter, row in each_row(results):
        al = row.get("align")
        if not al:
            continue
        f = al["floor"]
        st = al["stages"]
        rows.append(
            [
                model["name"],
                exporter,
                f"{fmt_s(al['floor_s'])} ≈ {fmt_s(f['plain_export_s'])} + "
                f"{fmt_s(f['torch_forward_s'])} + {fmt_s(f['ort_s'])}",
                fmt_s(al["align_s"]),
                fmt_x(al["ratio"]),
                fmt_s(al.get("no_local_s")),
                fmt_x(al.get("no_local_ratio")),
                *(fmt_s(st.get(k)) for k in STAGES),
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
        "wrapping. In the marker mode `run_onnx` spans the whole comparison stage: feeds, ONNX "
        "Runtime (session load and run) and `compare`, which includes the local-error replays; "
        "in the attach mode (`instrumentation` attach: default options on an aligned model) it "
        "is the session run alone, `load`, `locate` and `local` being stages of their own "
        "(in the JSON). *local=False*: "
        "`align(local=False)` in the same repeat, without module inputs marked or replays.",
        "",
    ]
    lines += table(
        [
            "model",
            "exporter",
            "floor s = export + torch + ORT",
            "align s",
            "ratio",
            "local=False s",
            "ratio",
            *STAGES,
            "rows compared",
            "instrumentation",
        ],
        rows,
    )
    return lines + attach_section(results)


def attach_section(results: dict[str, Any]) -> list[str]:
    """The two attach modes beside the marker mode, from the same repeats."""
    rows = []
    for model, exporter, row in each_row(results):
        at = (row.get("align") or {}).get("attach")
        if not at:
            continue
        al, cold = row["align"], row.get("cold") or {}
        rows.append(
            [
                model["name"],
                exporter,
                f"{fmt_s(al['align_s'])} ({fmt_x(al['ratio'])} of {fmt_s(al['floor_s'])})",
                _warm(al, "markers"),
                f"{fmt_s(at['onnx_s'])} ({fmt_x(at['onnx_ratio'])} of {fmt_s(at['onnx_floor_s'])})",
                f"{fmt_s(at['export_attach_s'])} ({fmt_x(at['export_attach_ratio'])})",
                *(_cold(cold.get(mode)) for mode in ("default", "markers", "onnx", "attach")),
                f"{at['compared']}/{at['rows']}",
                "aligned" if at["passed"] else f"diverged at {at['first_divergence']}",
            ]
        )
    if not rows:
        return []
    lines = [
        "",
        "### Each mode",
        "",
        "Same repeats. *default*: `align` with default options (the plain export attached to "
        "first; the marker mode as well only when it does not align), as in the table above. "
        "*markers*: `align(attach=False)`, the marker mode alone (the default before the "
        "plain export was checked first). *onnx=*: `align(onnx=the plain export)`, the user's "
        "own file, against "
        "its floor (one PyTorch forward + one ONNX Runtime forward with session load: no "
        "export). *attach=True*: export-and-attach (fxalign makes the plain export), against "
        "the floor above. *Cold*: the first `align` in a fresh process, as the CLI runs it "
        "(modules imported, nothing run yet), against its floor measured the same way in "
        "another fresh process (`benchmarks/child.py`), one run each. Targets: `onnx=` <= "
        f"{TARGETS['onnx']}x, `attach=True` <= {TARGETS['attach']}x their floors, warm and "
        "cold. Rows compared: module values that are distinct tensors of the file.",
        "",
    ]
    return lines + table(
        [
            "model",
            "exporter",
            "default s (ratio)",
            "markers s (ratio)",
            "onnx= s (ratio)",
            "attach=True s (ratio)",
            "cold default s (ratio)",
            "cold markers s (ratio)",
            "cold onnx= s (ratio)",
            "cold attach=True s (ratio)",
            "rows compared",
            "verdict",
        ],
        rows,
    )


def _warm(al: dict[str, Any], mode: str) -> str:
    seconds = al.get(f"{mode}_s")
    if seconds is None:
        return "—"
    return f"{fmt_s(seconds)} ({fmt_x(al[f'{mode}_ratio'])})"


def _cold(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "—"
    return f"{fmt_s(entry['align_s'])} ({fmt_x(entry['ratio'])} of {fmt_s(entry['floor_s'])})"


_OVER_FLOOR = (
    ("export overhead", "export minus the floor's plain export"),
    ("compare", "metrics and local-error replays"),
    (
        "ONNX side",
        "run_onnx without compare (with load in the attach mode), minus the floor's ORT run",
    ),
    ("instrument", "the failed torch.fx attempt and the eager wrapping, or the FX pass"),
    (
        "extract",
        "graph surgery and saving the debug model; in the attach mode (default options "
        "on an aligned model) locating the modules in the file",
    ),
    ("PyTorch side", "run_torch minus the floor's forward"),
)


def _over_floor(al: dict[str, Any]) -> dict[str, float]:
    """Seconds ``align`` spends over its floor, by where they go (see ``_OVER_FLOOR``)."""
    st, f = al["stages"], al["floor"]
    if "locate" in st:  # the attach source: ORT load and run, and compare, are stages apart
        onnx_side = st.get("load", 0.0) + st.get("run_onnx", 0.0) - f["ort_s"]
    else:  # the marker source: run_onnx spans the session load, the run and compare
        onnx_side = st.get("run_onnx", 0.0) - st.get("compare", 0.0) - f["ort_s"]
    parts = {
        "export overhead": st.get("export", 0.0) - f["plain_export_s"],
        "compare": st.get("compare", 0.0) + st.get("local", 0.0),
        "ONNX side": onnx_side,
        "instrument": st.get("instrument", 0.0),
        "extract": st.get("extract", st.get("locate", 0.0)),
        "PyTorch side": st.get("run_torch", 0.0) - f["torch_forward_s"],
    }
    parts["rest"] = al["align_s"] - al["floor_s"] - sum(parts.values())
    return parts


def in_the_way_section(results: dict[str, Any]) -> list[str]:
    rows, missed = [], []
    for model, exporter, row in each_row(results):
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
                fmt_s(al["floor_s"]),
                fmt_s(al["align_s"] - al["floor_s"]),
                fmt_s(allowed),
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
                f"* **{model['name']} / {exporter}**: {fmt_s(al['align_s'] - al['floor_s'])} s "
                f"over the floor where {TARGETS['align']}x allows {fmt_s(allowed)} s; largest "
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
    lines += table(
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


_ONNX_OVER_FLOOR = (
    ("capture", "run_torch minus the floor's forward: forward hooks, the write guard, clones"),
    ("locate", "reading the file's scopes and pairing module calls with its values"),
    ("ONNX side", "load and run of the promoted copy, minus the floor's ORT session load and run"),
    ("compare", "metrics, with the local-error replays"),
)


def _onnx_over_floor(at: dict[str, Any]) -> dict[str, float]:
    """Seconds ``align(onnx=file)`` spends over its floor, by where they go."""
    st, f = at["onnx_stages"], at["onnx_floor"]
    parts = {
        "capture": st.get("run_torch", 0.0) - f["torch_forward_s"],
        "locate": st.get("locate", 0.0),
        "ONNX side": st.get("load", 0.0) + st.get("run_onnx", 0.0) - f["ort_s"],
        "compare": st.get("compare", 0.0) + st.get("local", 0.0),
    }
    parts["rest"] = at["onnx_s"] - at["onnx_floor_s"] - sum(parts.values())
    return parts


def _alone(parts: list[str]) -> str:
    if not parts:
        return ""
    which = parts[0] if len(parts) == 1 else "each of " + ", ".join(parts)
    return f"; {which} alone takes more than that"


def onnx_in_the_way_section(results: dict[str, Any]) -> list[str]:
    """Where ``align(onnx=file)`` spends the seconds over its floor (warm bests)."""
    rows, missed = [], []
    for model, exporter, row in each_row(results):
        at = (row.get("align") or {}).get("attach")
        if not at or "onnx_stages" not in at:
            continue
        parts = _onnx_over_floor(at)
        floor = at["onnx_floor_s"]
        allowed = (TARGETS["onnx"] - 1) * floor
        elements = at.get("elements_compared") or 0
        per_element = parts["compare"] / elements * 1e9 if elements else None
        rows.append(
            [
                model["name"],
                exporter,
                fmt_s(floor),
                fmt_s(at["onnx_s"] - floor),
                fmt_s(allowed),
                *(f"{parts[name]:+.3f}" for name, _ in (*_ONNX_OVER_FLOOR, ("rest", ""))),
                f"{elements / 1e6:.1f} M",
                "—" if per_element is None else f"{per_element:.1f}",
            ]
        )
        if model["name"] in TARGET_MODELS and at["onnx_ratio"] > TARGETS["onnx"]:
            over = [k for k, v in parts.items() if k != "rest" and v > allowed]
            missed.append(
                f"* **{model['name']} / {exporter}**: {fmt_s(at['onnx_s'] - floor)} s over "
                f"a floor of {fmt_s(floor)} s where {TARGETS['onnx']}x allows "
                f"{fmt_s(allowed)} s" + _alone(over) + "."
            )
    if not rows:
        return []
    lines = [
        f"## What stands in the way of `align(onnx=file)` <= {TARGETS['onnx']}x its floor",
        "",
        "The seconds `align(onnx=the plain export)` spends over its floor (one PyTorch "
        "forward + one ORT session load and run of the file), from the bests of its own "
        "`report.timings` in the repeats above: "
        + "; ".join(f"*{name}*: {what}" for name, what in _ONNX_OVER_FLOOR)
        + "; *rest*: what the stage bests do not account for. *Elements*: the elements of "
        "every module value compared (both sides are read in full); *ns / element*: compare "
        "over elements, the cost of the exact metrics (float64 sums, every element checked "
        "against its tolerance) on this machine.",
        "",
    ]
    lines += table(
        [
            "model",
            "exporter",
            "floor s",
            "over the floor s",
            "target allows s",
            *(name for name, _ in _ONNX_OVER_FLOOR),
            "rest",
            "elements",
            "ns / element",
        ],
        rows,
    )
    if missed:
        lines += [
            "Targets missed, and the parts that alone exceed what they allow:",
            "",
            *missed,
            "",
        ]
    return lines
