"""The ``fxalign`` command line.

Exit codes: 0 aligned, 1 diverged, 2 usage or model error (a :class:`~fxalign.errors.UserError`),
3 internal error (a bug in fxalign; the traceback is printed), 130 interrupted (Ctrl-C), 143
terminated (SIGTERM); temporary folders are removed either way.

Only the argument parser is imported up front (``fxalign --help`` needs no torch); each command
imports what it runs.
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
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from fxalign.cli_outputs import check_outputs, suffixed, write_outputs
from fxalign.cli_parser import build_parser
from fxalign.errors import ExportError, FxalignError, InputError, InternalError, UserError

if TYPE_CHECKING:
    from fxalign.options import Exporter

__all__ = ["build_parser", "load_factory", "main"]

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
    if not target or not attr:
        raise UserError(
            f"model spec {spec!r} names no {'module or file' if not target else 'factory'}",
            hint="use package.module:factory or path/to/file.py:factory",
        )
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
        if not built or not isinstance(built[0], torch.nn.Module) or len(built) > 3:
            raise UserError(
                f"{factory_spec}() must return a module or (module, args[, kwargs]), got a "
                f"tuple of {len(built)}: ({', '.join(type(b).__name__ for b in built[:4])})"
            )
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
    if model.training:
        # A model class, or a factory that builds one, starts in training mode: compare it in
        # eval mode, as it is deployed (the Python API warns instead; this model is our own).
        logger.info("%s is in training mode; comparing it in eval mode", type(model).__name__)
        model.eval()
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
    return ["dynamo", "torchscript"] if value == "both" else [cast("Exporter", value)]


def _workdirs(args: argparse.Namespace, exporters: Sequence[Exporter | None]) -> list[Path]:
    """One model folder per exporter: ``DIR`` itself, or ``DIR/dynamo`` and ``DIR/torchscript``."""
    if not args.workdir:
        return []
    if len(exporters) == 1:
        return [Path(args.workdir)]
    return [Path(args.workdir) / str(e) for e in exporters]


def _repro_folders(args: argparse.Namespace, exporters: Sequence[Exporter | None]) -> list[Path]:
    """``--repro DIR`` per exporter (``DIR/dynamo``, ``DIR/torchscript`` for both), checked now."""
    from fxalign.options import repro_folder

    if not args.repro:
        return []
    folders = (
        [Path(args.repro)]
        if len(exporters) == 1
        else [Path(args.repro) / str(e) for e in exporters]
    )
    for folder in folders:
        repro_folder(folder, overwrite=args.overwrite)
    return folders


def _cmd_align(args: argparse.Namespace) -> int:
    from fxalign.pipeline import align

    exporters = _exporters(args.exporter)
    suffixes = [str(e) if len(exporters) > 1 else "" for e in exporters]
    workdirs = _workdirs(args, exporters)
    check_outputs(args, suffixes, workdirs)
    repros = _repro_folders(args, exporters)
    model, margs, mkwargs = _build_model(args.model, args.input, args.seed, args.inputs)
    samples = _samples(args)
    code = EXIT_ALIGNED
    for k, exporter in enumerate(exporters):
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
            workdir=workdirs[k] if workdirs else None,
            overwrite=args.overwrite,
            granularity=args.granularity,
            fidelity=args.fidelity,
            samples=samples or None,
            export_kwargs=export_kwargs,
            runner=_runner(args),
            local=args.local,
            max_outputs_per_run=args.max_outputs_per_run,
            verdict=args.verdict,
            onnx=args.onnx,
            attach=args.attach,
            drill_down=args.drill_down,
            repro=repros[k] if repros else None,
        )
        write_outputs(report, args, suffixes[k])
        if not report.passed:
            code = EXIT_DIVERGED
    return code


def _cmd_demo(args: argparse.Namespace) -> int:
    """Both demo models with each exporter; 0 when they behave as the demo expects."""
    import torch

    from fxalign import demo
    from fxalign.pipeline import align

    exporters = [str(e) for e in _exporters(args.exporter)]
    check_outputs(args, [f"{part}-{e}" for part in demo.PARTS for e in exporters])
    reports: dict[tuple[str, str], Any] = {}
    for part, (title, make, inputs) in demo.PARTS.items():
        print(f"== {title}\n")
        for exporter in exporters:
            torch.manual_seed(args.seed)
            report = align(
                make().eval(),
                inputs(args.seed),
                exporter=cast("Exporter", exporter),
                atol=args.atol,
                rtol=args.rtol,
                tolerances=dict(args.tol),
                fidelity=args.fidelity and part == "convblocks",
                export_kwargs=demo.export_kwargs(part, exporter),
            )
            write_outputs(report, args, f"{part}-{exporter}")
            if part == "softclip":
                code = EXIT_ALIGNED if report.passed else EXIT_DIVERGED
                print("\n".join(demo.explain(report, code)))
            print()
            reports[part, exporter] = report
    problems = [
        problem
        for e in exporters
        for problem in demo.unexpected(reports["convblocks", e], reports["softclip", e])
    ]
    for problem in problems:
        print(f"fxalign demo: unexpected: {problem}", file=sys.stderr)
    return EXIT_DIVERGED if problems else EXIT_ALIGNED


def _read_report(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        siblings = [suffixed(path, s) for s in ("dynamo", "torchscript")]
        found = [str(p) for p in siblings if p.is_file()]
        hint = (
            f"--exporter both wrote one report per exporter: {' and '.join(found)}; pass one"
            if found
            else "pass a file written by --json"
        )
        raise UserError(f"cannot read report {str(path)!r}: no such file", hint=hint) from e
    except OSError as e:
        raise UserError(f"cannot read report {str(path)!r}: {e.strerror or e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(
            f"{str(path)!r} is not a JSON file: {e}", hint="pass a file written by --json"
        ) from e


def _cmd_report(args: argparse.Namespace) -> int:
    from fxalign.report.model import Report

    check_outputs(args)
    path = Path(args.report)
    data = _read_report(path)
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
    write_outputs(report, args)
    return EXIT_ALIGNED if report.passed else EXIT_DIVERGED


_COMMANDS = {"align": _cmd_align, "demo": _cmd_demo, "report": _cmd_report}


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.captureWarnings(True)
    if verbose:  # fxalign's own debug lines; the libraries' (thousands from onnxscript) not
        logging.getLogger("fxalign").setLevel(logging.DEBUG)
    else:
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
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("fxalign: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _Terminated:
        print("fxalign: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except UserError as e:
        if args.verbose:
            traceback.print_exc()
            if isinstance(e, ExportError) and e.exporter_output:
                print(f"the exporter printed:\n{e.exporter_output}\n", file=sys.stderr)
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
