"""The ``fxalign`` command line's arguments: one parser, built without importing torch.

``fxalign --help`` only needs this module, so it answers at once; the commands import what they
need when they run.
"""

from __future__ import annotations

import argparse

__all__ = ["build_parser"]

_BOTH = (
    "With --exporter both, each output file gets the exporter's name before its suffix: "
    "--json r.json writes r-dynamo.json and r-torchscript.json (likewise --html and --node-data)."
)


def _tolerance_override(text: str) -> tuple[str, dict[str, float]]:
    """Parse ``GLOB:ATOL[:RTOL]`` (argparse type)."""
    parts = text.split(":")
    try:
        if len(parts) not in (2, 3) or not parts[0]:
            raise ValueError
        values = [float(v) for v in parts[1:]]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected GLOB:ATOL[:RTOL], e.g. '*.attention.*:1e-3:1e-2'"
        ) from None
    return parts[0], dict(zip(("atol", "rtol"), values, strict=False))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _add_verbose(p: argparse.ArgumentParser, *, top: bool) -> None:
    # On a subcommand the flag must not reset a ``fxalign -v align ...`` given before it.
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="debug logs, tracebacks and the exporter's own output",
    )


def _add_renderings(p: argparse.ArgumentParser, json_help: str) -> None:
    p.add_argument("--json", metavar="PATH", help=json_help)
    p.add_argument("--html", metavar="PATH", help="also write a self-contained HTML report")
    p.add_argument(
        "--node-data",
        metavar="PATH",
        help="also write max_abs per ONNX node as Model Explorer node data (JSON)",
    )
    p.add_argument("--top", type=int, metavar="K", help="show only the K worst rows")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")


def _add_common(
    p: argparse.ArgumentParser, json_help: str = "also write the report as JSON"
) -> None:
    p.add_argument(
        "--atol", type=float, help="absolute tolerance (default: by dtype, 1e-4 for float32)"
    )
    p.add_argument(
        "--rtol", type=float, help="relative tolerance (default: by dtype, 1e-3 for float32)"
    )
    p.add_argument(
        "--tol",
        action="append",
        default=[],
        metavar="GLOB:ATOL[:RTOL]",
        type=_tolerance_override,
        help="tolerance for modules matching GLOB, e.g. '*.attention.*:1e-3:1e-2' (repeatable)",
    )
    _add_renderings(p, json_help)
    p.add_argument(
        "--tree", action="store_true", help="also print the module tree (worst error per subtree)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed for random inputs (default 0)")
    p.add_argument(
        "--no-fidelity",
        dest="fidelity",
        action="store_false",
        help="skip exporting the plain model to measure how far the debug model is from it",
    )
    _add_verbose(p, top=False)


def _add_align(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "align",
        help="align a model from a factory function",
        description="Export a model with markers, run it with ONNX Runtime and PyTorch and "
        "compare every module's output. Exit 0 aligned, 1 diverged, 2 usage or model error. "
        + _BOTH,
    )
    _add_align_inputs(p)
    _add_align_runtime(p)
    _add_align_comparison(p)
    _add_common(
        p,
        "also write the report as JSON (with --exporter both, r.json becomes r-dynamo.json "
        "and r-torchscript.json; likewise --html and --node-data)",
    )
    return p


def _add_align_inputs(p: argparse.ArgumentParser) -> None:
    """The model, its inputs and samples, and how it is exported."""
    p.add_argument("model", help="package.module:factory or path/to/file.py:factory")
    p.add_argument(
        "--input",
        "-i",
        action="append",
        default=[],
        metavar="SPEC",
        help="[NAME=]DIMS[:DTYPE[:LOW..HIGH]], e.g. 1x3x224x224 or ids=1x16:int64:0..1000; "
        "repeat per input",
    )
    p.add_argument(
        "--exporter",
        choices=["dynamo", "torchscript", "both"],
        help="default: torch.onnx.export's default; 'both' runs each and names every output "
        "file after its exporter (r.json: r-dynamo.json, r-torchscript.json)",
    )
    p.add_argument(
        "--provider",
        action="append",
        default=[],
        metavar="EP",
        help="ONNX Runtime execution provider (repeatable; default CPU)",
    )
    p.add_argument(
        "--inputs",
        metavar="PATH",
        help="a .npz/.pt file, or a folder of them: the first is exported with (unless --input "
        "is given), every other one is compared as a further sample",
    )
    p.add_argument(
        "--sample",
        action="append",
        default=[],
        metavar="SPECS",
        help="one more input sample, as space-separated --input specs, e.g. '4x3x64x64' "
        "(repeatable); the model is exported once",
    )
    p.add_argument(
        "--dynamic",
        action="store_true",
        help="export every input dimension that differs between the inputs and the samples as "
        "dynamic (dynamic_shapes / dynamic_axes)",
    )


def _add_align_runtime(p: argparse.ArgumentParser) -> None:
    """How the ONNX side is run: backend, optimization, files, memory bound."""
    p.add_argument(
        "--runner",
        choices=["onnxruntime", "onnxruntime-noopt"],
        default="onnxruntime",
        help="ONNX backend: ONNX Runtime, or ONNX Runtime with graph optimizations disabled",
    )
    p.add_argument(
        "--graph-optimization",
        choices=["ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"],
        help="ONNX Runtime graph optimization level (default: ONNX Runtime's)",
    )
    p.add_argument(
        "--workdir",
        metavar="DIR",
        help="keep the models fxalign makes here: plain.onnx, and export.onnx and debug.onnx "
        "when the marker mode runs (with --exporter both: in DIR/dynamo and DIR/torchscript)",
    )
    p.add_argument(
        "--onnx",
        metavar="FILE",
        help="compare this ONNX file (the one you deploy, exported by either exporter, possibly "
        "simplified or converted to float16) instead of a debug model with markers; it is "
        "never written",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--attach",
        action="store_const",
        const=True,
        dest="attach",
        help="export-and-attach only: export the model plainly (no markers) and compare that "
        "exact graph, module by module, never the marker mode",
    )
    mode.add_argument(
        "--markers",
        action="store_const",
        const=False,
        dest="attach",
        help="the marker mode only: compare a debug model with a marker after every module "
        "call (every module's value, fused ones too), without checking the plain export first",
    )
    p.add_argument(
        "--max-outputs-per-run",
        type=_positive_int,
        metavar="K",
        help="bound memory: compare at most K ONNX values at a time (both models run once per "
        "batch; same report)",
    )


def _add_align_comparison(p: argparse.ArgumentParser) -> None:
    """What is compared and how a value passes."""
    p.add_argument(
        "--local",
        dest="local",
        choices=["failing", "all"],
        default="failing",
        help="rows that get an introduced error: those that break tolerance (default) or all",
    )
    p.add_argument(
        "--no-local",
        dest="local",
        action="store_const",
        const=False,
        help="skip introduced errors (no module replays on ONNX inputs; no culprit beyond "
        "the first value that breaks tolerance)",
    )
    p.add_argument(
        "--no-drill-down",
        dest="drill_down",
        action="store_false",
        help="do not drill into the culprit module (by default it is exported alone, op by op, "
        "to name the op and source line that break tolerance)",
    )
    p.add_argument(
        "--repro",
        metavar="DIR",
        help="write the culprit's standalone repro bundle (module.pt2, inputs.pt, module.onnx, "
        "repro.py: needs only torch, onnx and onnxruntime) into DIR and run it once (with "
        "--exporter both: DIR/dynamo and DIR/torchscript)",
    )
    p.add_argument(
        "--verdict",
        choices=["roundoff", "allclose"],
        default="roundoff",
        help="how a value passes: within atol + rtol*|torch| plus the round-off its dtype allows "
        "at the tensor's magnitude (roundoff, default), or plain numpy.allclose",
    )
    p.add_argument(
        "--granularity",
        choices=["all", "leaf"],
        default="all",
        help="mark blocks and leaf modules (all) or leaf modules only",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests); each command is ``func``."""
    parser = argparse.ArgumentParser(
        prog="fxalign",
        description="Find the first PyTorch module whose exported ONNX version disagrees.",
        epilog="Exit codes: 0 aligned, 1 diverged, 2 usage or model error, 3 internal error.",
    )
    _add_verbose(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_align(sub)

    p = sub.add_parser(
        "demo",
        help="align two built-in models: four conv blocks (aligned) and one with a planted "
        "divergence",
        description="Align the built-in four-block conv net (every module aligned) and a small "
        "net whose custom op has a wrong ONNX translation (the divergence is found and "
        "explained), with each exporter. Exit 0 when both behave as expected. Output files "
        "are named after the model and the exporter: --json r.json writes "
        "r-convblocks-dynamo.json, r-softclip-dynamo.json, ...",
    )
    p.add_argument("--exporter", choices=["dynamo", "torchscript", "both"], default="both")
    _add_common(p)

    p = sub.add_parser(
        "report",
        help="re-render a saved JSON report (exit 0 aligned, 1 diverged)",
        description="Print a report saved with --json; optionally write it as HTML or JSON. "
        "A run with --exporter both saved one report per exporter (r-dynamo.json, "
        "r-torchscript.json).",
    )
    p.add_argument("report", metavar="RUN.json", help="a report written by --json")
    _add_renderings(p, "write the report as JSON (current schema)")
    _add_verbose(p, top=False)
    return parser
