"""The ``fxalign`` command line.

Exit codes: 0 aligned, 1 diverged, 2 usage or model error (a :class:`~fxalign.errors.UserError`),
3 internal error (a bug in fxalign; the traceback is printed).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from fxalign.errors import FxalignError, InputError, InternalError, UserError
from fxalign.export import Exporter

__all__ = ["load_factory", "main"]

EXIT_ALIGNED, EXIT_DIVERGED, EXIT_USER_ERROR, EXIT_INTERNAL = 0, 1, 2, 3

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
        except Exception as e:
            raise UserError(f"importing {target!r} failed: {type(e).__name__}: {e}") from e
        finally:
            sys.path.pop(0)
    else:
        try:
            module = importlib.import_module(target)
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


def _build_model(factory_spec: str, input_specs: Sequence[str], seed: int) -> tuple[Any, Any, Any]:
    import torch

    from fxalign.inputs import make_inputs

    factory = load_factory(factory_spec)
    try:
        built = (
            factory() if callable(factory) and not isinstance(factory, torch.nn.Module) else factory
        )
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
    if not args and not kwargs:
        raise InputError(
            f"no inputs for {type(model).__name__}",
            hint="pass --input SHAPE[:DTYPE] (one per input) or return (model, args) from "
            "the factory",
        )
    return model, args, kwargs


def _exporters(value: str | None) -> list[Exporter | None]:
    if value is None:
        return [None]
    return ["dynamo", "torchscript"] if value == "both" else [cast(Exporter, value)]


def _write_outputs(report: Any, args: argparse.Namespace, suffix: str = "") -> None:
    from fxalign.render import print_report

    print_report(report, top=args.top)
    if args.json:
        path = Path(args.json)
        if suffix:
            path = path.with_name(f"{path.stem}-{suffix}{path.suffix}")
        _check_writable(path, args.overwrite)
        report.to_json(path)
        print(f"wrote {path}")


def _check_writable(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists", hint="pass --overwrite to replace it")


def _cmd_align(args: argparse.Namespace) -> int:
    from fxalign.pipeline import align

    model, margs, mkwargs = _build_model(args.model, args.input, args.seed)
    exporters = _exporters(args.exporter)
    code = EXIT_ALIGNED
    for exporter in exporters:
        report = align(
            model,
            margs,
            mkwargs,
            exporter=exporter,
            atol=args.atol,
            rtol=args.rtol,
            providers=args.provider or None,
            workdir=args.workdir,
            overwrite=args.overwrite,
            granularity=args.granularity,
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
            model, demo_inputs(args.seed), exporter=exporter, atol=args.atol, rtol=args.rtol
        )
        _write_outputs(report, args, report.exporter if args.exporter == "both" else "")
        print()
        if not report.passed:
            code = EXIT_DIVERGED
    return code


def _cmd_bench(args: argparse.Namespace) -> int:
    from fxalign.bench import run_from_args

    run_from_args(args)
    return EXIT_ALIGNED


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance (default 1e-4)")
    p.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance (default 1e-3)")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    p.add_argument("--top", type=int, metavar="K", help="show only the K worst rows")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--seed", type=int, default=0, help="seed for random inputs (default 0)")


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
    p.add_argument("--workdir", metavar="DIR", help="keep export.onnx and debug.onnx here")
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

    from fxalign.bench import add_arguments as add_bench_arguments

    p = sub.add_parser("bench", help="measure fxalign's cost; write docs/benchmarks.md")
    add_bench_arguments(p)
    p.set_defaults(func=_cmd_bench)
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
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return int(args.func(args))
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
