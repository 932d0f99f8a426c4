"""The ``fxalign`` command line.

Exit codes: 0 aligned, 1 diverged, 2 usage or model error (a :class:`~fxalign.errors.UserError`),
3 internal error (a bug in fxalign; the traceback is printed), 130 interrupted (Ctrl-C), 143
terminated (SIGTERM); temporary folders are removed either way.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

from fxalign.errors import FxalignError, InputError, InternalError, UserError
from fxalign.options import Exporter

__all__ = ["load_factory", "main"]

EXIT_ALIGNED, EXIT_DIVERGED, EXIT_USER_ERROR, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # 128 + SIGINT, 128 + SIGTERM, as shells report

logger = logging.getLogger(__name__)


def load_factory(spec: str) -> Any:
    """Import ``package.module:function`` or ``path/to/file.py:function`` and return the callable.

    Raises:
        UserError: The module, file or attribute cannot be found.
    """
    if ":" not in spec:
        raise UserError(
            f"model spec {spec!r} has no ':'",
            hint="use package.module:factory or path/to/file.py:factory",
        )
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_file():
            raise UserError(f"model file {target!r} not found")
        name = f"fxalign_user_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise UserError(f"cannot import {target!r}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        sys.path.insert(0, str(path.parent.resolve()))
        try:
            module_spec.loader.exec_module(module)
        except SystemExit as e:
            raise UserError(
                f"importing {target!r} called sys.exit({e.code!r})",
                hint="guard the file's script part with: if __name__ == '__main__':",
            ) from e
        except Exception as e:
            raise UserError(f"importing {target!r} failed: {type(e).__name__}: {e}") from e
        finally:
            sys.path.pop(0)
    else:
        try:
            module = importlib.import_module(target)
        except SystemExit as e:
            raise UserError(f"importing {target!r} called sys.exit({e.code!r})") from e
        except ImportError as e:
            raise UserError(
                f"cannot import module {target!r}: {e}",
                hint="is it on PYTHONPATH? a file path (ending in .py) also works",
            ) from e
    try:
        return getattr(module, attr)
    except AttributeError as e:
        public = sorted(n for n in vars(module) if not n.startswith("_"))[:20]
        raise UserError(
            f"{target!r} has no attribute {attr!r}", hint=f"it defines: {', '.join(public)}"
        ) from e


def _build_model(
    factory_spec: str, input_specs: Sequence[str], seed: int, inputs_path: str | None = None
) -> tuple[Any, Any, Any]:
    import torch

    from fxalign.inputs import make_inputs

    factory = load_factory(factory_spec)
    try:
        built = (
            factory() if callable(factory) and not isinstance(factory, torch.nn.Module) else factory
        )
    except SystemExit as e:
        raise UserError(f"{factory_spec}() called sys.exit({e.code!r})") from e
    except Exception as e:
        raise UserError(f"{factory_spec}() raised {type(e).__name__}: {e}") from e
    args: Any = ()
    kwargs: Any = {}
    if isinstance(built, tuple):
        if not built or not isinstance(built[0], torch.nn.Module):
            raise UserError(f"{factory_spec}() must return a module or (module, args[, kwargs])")
        model = built[0]
        args = built[1] if len(built) > 1 else ()
        kwargs = built[2] if len(built) > 2 else {}
    else:
        model = built
    if not isinstance(model, torch.nn.Module):
        raise UserError(
            f"{factory_spec} gave a {type(model).__name__}, not a torch.nn.Module",
            hint="the factory must return a module or (module, args[, kwargs])",
        )
    if input_specs:
        args, kwargs = make_inputs(input_specs, seed=seed)
    elif inputs_path:
        from fxalign.inputs import input_files, load_inputs

        args, kwargs = load_inputs(input_files(inputs_path)[0])
    if not args and not kwargs:
        raise InputError(
            f"no inputs for {type(model).__name__}",
            hint="pass --input SHAPE[:DTYPE] (one per input) or return (model, args) from "
            "the factory",
        )
    return model, args, kwargs


def _samples(args: argparse.Namespace) -> list[Any]:
    """Samples from ``--sample`` specs and the files of ``--inputs`` (after the export one)."""
    from fxalign.inputs import input_files, load_inputs, make_inputs
    from fxalign.samples import Sample

    samples: list[Any] = []
    for k, text in enumerate(args.sample, start=1):
        sample_args, sample_kwargs = make_inputs(text.split(), seed=args.seed + k)
        samples.append(Sample(sample_args, sample_kwargs))
    if args.inputs:
        files = input_files(args.inputs)
        for file in files if args.input else files[1:]:
            samples.append(Sample(*load_inputs(file)))
    return samples


def _runner(args: argparse.Namespace) -> Any:
    from fxalign.backends import OrtRunner, builtin_runners

    if args.graph_optimization and args.runner == "onnxruntime":
        return OrtRunner(args.provider or None, graph_optimization_level=args.graph_optimization)
    return builtin_runners(args.provider or None)[args.runner]


def _exporters(value: str | None) -> list[Exporter | None]:
    if value is None:
        return [None]
    return ["dynamo", "torchscript"] if value == "both" else [cast(Exporter, value)]


def _write_outputs(report: Any, args: argparse.Namespace, suffix: str = "") -> None:
    from fxalign.report.html import write_html
    from fxalign.report.model_explorer import write_node_data
    from fxalign.report.text import print_report

    writers: list[tuple[str | None, Callable[[Path], object]]] = [
        (args.json, report.to_json),
        (getattr(args, "html", None), lambda path: write_html(report, path)),
        (getattr(args, "node_data", None), lambda path: write_node_data(report, path)),
    ]
    planned = []
    for target, write in writers:
        if target:
            path = Path(target)
            if suffix:
                path = path.with_name(f"{path.stem}-{suffix}{path.suffix}")
            _check_writable(path, args.overwrite)
            planned.append((path, write))
    print_report(report, top=args.top, tree=getattr(args, "tree", False))
    for path, write in planned:
        try:
            write(path)
        except OSError as e:
            raise UserError(f"cannot write {path}: {e.strerror or e}") from e
        print(f"wrote {path}")


def _check_writable(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists", hint="pass --overwrite to replace it")


def _cmd_align(args: argparse.Namespace) -> int:
    from fxalign.pipeline import align

    model, margs, mkwargs = _build_model(args.model, args.input, args.seed, args.inputs)
    samples = _samples(args)
    exporters = _exporters(args.exporter)
    code = EXIT_ALIGNED
    for exporter in exporters:
        export_kwargs = {}
        if args.dynamic:
            from fxalign.inputs import dynamic_export_kwargs
            from fxalign.options import default_exporter

            export_kwargs = dynamic_export_kwargs(
                exporter or default_exporter(),
                model.forward,
                (margs, mkwargs),
                [(s.args, s.kwargs) for s in samples],
            )
        report = align(
            model,
            margs,
            mkwargs,
            exporter=exporter,
            atol=args.atol,
            rtol=args.rtol,
            tolerances=dict(args.tol),
            providers=args.provider or None,
            workdir=args.workdir,
            overwrite=args.overwrite,
            granularity=args.granularity,
            fidelity=args.fidelity,
            samples=samples or None,
            export_kwargs=export_kwargs,
            runner=_runner(args),
            local=args.local,
            max_outputs_per_run=args.max_outputs_per_run,
            onnx=args.onnx,
            attach=args.attach,
        )
        _write_outputs(report, args, report.exporter if len(exporters) > 1 else "")
        if not report.passed:
            code = EXIT_DIVERGED
    return code


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from fxalign.demo import ConvBlocks, demo_inputs
    from fxalign.pipeline import align

    torch.manual_seed(args.seed)
    model = ConvBlocks().eval()
    code = EXIT_ALIGNED
    for exporter in _exporters(args.exporter):
        report = align(
            model,
            demo_inputs(args.seed),
            exporter=exporter,
            atol=args.atol,
            rtol=args.rtol,
            tolerances=dict(args.tol),
            fidelity=args.fidelity,
        )
        _write_outputs(report, args, report.exporter if args.exporter == "both" else "")
        print()
        if not report.passed:
            code = EXIT_DIVERGED
    return code


def _cmd_report(args: argparse.Namespace) -> int:
    from fxalign.report.model import Report

    path = Path(args.report)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read report {str(path)!r}: {e.strerror or e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(
            f"{str(path)!r} is not a JSON file: {e}", hint="pass a file written by --json"
        ) from e
    if not isinstance(data, dict):
        raise UserError(f"{str(path)!r} is not an fxalign report (expected a JSON object)")
    try:
        report = Report.from_dict(data)
    except ValueError as e:  # a newer schema
        raise UserError(str(e)) from e
    except (TypeError, KeyError, AttributeError) as e:
        raise UserError(
            f"{str(path)!r} is not an fxalign report: {e}", hint="pass a file written by --json"
        ) from e
    _write_outputs(report, args)
    return EXIT_ALIGNED if report.passed else EXIT_DIVERGED


def _add_renderings(p: argparse.ArgumentParser) -> None:
    p.add_argument("--html", metavar="PATH", help="also write a self-contained HTML report")
    p.add_argument(
        "--node-data",
        metavar="PATH",
        help="also write max_abs per ONNX node as Model Explorer node data (JSON)",
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


def _add_common(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    p.add_argument("--top", type=int, metavar="K", help="show only the K worst rows")
    p.add_argument(
        "--tree", action="store_true", help="also print the module tree (worst error per subtree)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--seed", type=int, default=0, help="seed for random inputs (default 0)")
    p.add_argument(
        "--no-fidelity",
        dest="fidelity",
        action="store_false",
        help="skip exporting the plain model to measure how far the debug model is from it",
    )
    _add_renderings(p)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog="fxalign",
        description="Find the first PyTorch module whose exported ONNX version disagrees.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs, tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("align", help="align a model from a factory function")
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
        help="default: torch.onnx.export's default",
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
    p.add_argument("--workdir", metavar="DIR", help="keep export.onnx and debug.onnx here")
    p.add_argument(
        "--onnx",
        metavar="FILE",
        help="compare this ONNX file (the one you deploy, exported by either exporter, possibly "
        "simplified or converted to float16) instead of a debug model with markers; it is "
        "never written",
    )
    p.add_argument(
        "--attach",
        action="store_true",
        help="export-and-attach: export the model plainly (no markers) and compare that exact "
        "graph, module by module",
    )
    p.add_argument(
        "--max-outputs-per-run",
        type=_positive_int,
        metavar="K",
        help="bound memory: compare at most K ONNX values at a time (both models run once per "
        "batch; same report)",
    )
    p.add_argument(
        "--no-local",
        dest="local",
        action="store_false",
        help="skip the local error (no module replays on ONNX inputs; faster)",
    )
    p.add_argument(
        "--granularity",
        choices=["all", "leaf"],
        default="all",
        help="mark blocks and leaf modules (all) or leaf modules only",
    )
    _add_common(p)
    p.set_defaults(func=_cmd_align)

    p = sub.add_parser("demo", help="align the built-in four-block conv net")
    p.add_argument("--exporter", choices=["dynamo", "torchscript", "both"], default="both")
    _add_common(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "report",
        help="re-render a saved JSON report (exit 0 aligned, 1 diverged)",
        description="Print a report saved with --json; optionally write it as HTML or JSON.",
    )
    p.add_argument("report", metavar="RUN.json", help="a report written by --json")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON (current schema)")
    p.add_argument("--top", type=int, metavar="K", help="show only the K worst rows")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    _add_renderings(p)
    p.set_defaults(func=_cmd_report)
    return parser


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.captureWarnings(True)
    if not verbose:
        # The dynamo exporter logs a warning per missing optional op library (torchvision).
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        # onnxscript's optimizer logs constant-folding attempts it skips; they change nothing.
        logging.getLogger("onnxscript").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every ``finally`` runs (temporary folders)."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("fxalign: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _Terminated:
        print("fxalign: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except UserError as e:
        if args.verbose:
            traceback.print_exc()
        print(f"fxalign: error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"  hint: {e.hint}", file=sys.stderr)
        if e.__cause__ is not None and not args.verbose:
            print("  (run with --verbose for the full cause)", file=sys.stderr)
        return EXIT_USER_ERROR
    except (InternalError, FxalignError, Exception):
        traceback.print_exc()
        print(
            "fxalign: internal error: this is a bug in fxalign, please report it with the "
            "traceback above",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
