"""Study sections of the benchmark page: alternatives, scaling, CSE, memory, profile."""

from __future__ import annotations

from typing import Any

from benchmarks.formatting import STAGES, each_row, fmt_mb, fmt_s, fmt_x, table

__all__ = [
    "alternatives_section",
    "contention_section",
    "jit_cse_section",
    "memory_section",
    "profile_section",
    "scaling_section",
]


def alternatives_section(results: dict[str, Any]) -> list[str]:
    rows = []
    for model, exporter, row in each_row(results):
        side, ver, al = row.get("onnx_side"), row.get("verify"), row.get("align")
        if not side and not ver:
            continue
        speed = side["tutorial_s"] / side["fxalign_s"] if side else None
        rows.append(
            [
                model["name"],
                exporter,
                fmt_s(side["fxalign_s"]) if side else "—",
                fmt_s(side["tutorial_s"]) if side else "—",
                fmt_x(speed),
                f"{side['rows_fxalign']} / {side['rows_tutorial']}" if side else "—",
                f"{side['max_value_difference']:.1e}" if side else "—",
                f"{fmt_s(ver['total_s'])} = {fmt_s(ver['export_s'])} + {fmt_s(ver['verify_s'])}"
                if ver
                else "—",
                ver["values"] if ver else "—",
                fmt_s(al["align_s"]) if al else "—",
                fmt_x(ver["total_s"] / al["align_s"]) if ver and al else "—",
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
    lines += table(
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


def scaling_section(results: dict[str, Any]) -> list[str]:
    points = results.get("scaling") or []
    if not points:
        return []
    rows = []
    previous: dict[str, dict[str, Any]] = {}
    for p in sorted(points, key=lambda p: (p["exporter"], p["modules"])):
        prev = previous.get(p["exporter"])
        marginal = []
        for key in (None, *STAGES):
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
                fmt_s(p["align_s"]),
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
    lines += table(
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
                for k in STAGES
                for name in (f"marginal {k}", "marginal plain export")
                if k == "export" or name != "marginal plain export"
            ),
        ],
        rows,
    )
    return lines


def jit_cse_section(results: dict[str, Any]) -> list[str]:
    points = results.get("jit_cse") or []
    if not points:
        return []
    labels = ["distinct names", "one name", "no markers"]
    rows = [[p["markers"], *(fmt_s(p[k]) for k in labels)] for p in points]
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
        *table(["markers", *(f"{k} s" for k in labels)], rows),
        "",
    ]


def memory_section(results: dict[str, Any]) -> list[str]:
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
                    fmt_mb(r["peak_rss"]),
                    fmt_mb(r["peak_delta"]),
                    fmt_s(r["seconds"]),
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
    lines += table(
        ["level", "max_outputs_per_run", "peak RSS MB", "peak added MB", "seconds", "identical"],
        rows,
    )
    return lines


def profile_section(results: dict[str, Any]) -> list[str]:
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
            rows.append([phase, fmt_s(v["plain"]), fmt_s(v["instrumented"]), f"{d:+.3f}", share])
        lines += [f"**{prof['model']} / {prof['exporter']}**", ""]
        lines += table(["phase", "plain s", "instrumented s", "difference s", "share"], rows)
    return lines


def contention_section(results: dict[str, Any]) -> list[str]:
    """Stage times on a quiet and on a loaded machine (:mod:`benchmarks.contention`)."""
    from benchmarks.contention import CONDITIONS
    from benchmarks.targets import TARGETS

    c = results.get("contention")
    if not c:
        return []
    quiet, loaded, bounded = (c["conditions"][k] for k in CONDITIONS)
    keys = ["plain export", "torch forward", "align", *(s for s in STAGES if s in quiet)]
    rows = [
        [
            key,
            fmt_s(quiet.get(key)),
            fmt_s(loaded.get(key)),
            fmt_x(c["slowdown"].get(key)),
            fmt_x(c["relative"].get(key)),
            fmt_s(bounded.get(key)),
            fmt_x(c["bounded_slowdown"].get(key)),
        ]
        for key in keys
    ]
    lines = [
        "## On a loaded machine",
        "",
        f"{c['model']} / {c['exporter']}: the plain export, one PyTorch forward and "
        f"`align` (with its stages from `report.timings`) on the quiet machine, then with "
        f"{c['burners']} CPU-burning helper processes running ({c['usable_cpus']} usable "
        "cores), best of the repeats each. *Relative* is a stage's slowdown over the plain "
        "export's (mostly single-threaded Python): near 1, the stage slows down as Python does; "
        f"the target is <= {TARGETS['contention']}x. *Bounded*: `align` inside "
        "`fxalign.threads.torch_threads()` (PyTorch's intra-op threads bounded by the CPUs "
        "other runnable tasks leave free), as the pipeline would run it with them bounded. "
        "`run_onnx` includes `compare`, which includes the local-error replays (PyTorch).",
        "",
    ]
    return lines + table(
        [
            "stage",
            "quiet s",
            "loaded s",
            "slowdown",
            "relative",
            "loaded, bounded s",
            "slowdown",
        ],
        rows,
    )
