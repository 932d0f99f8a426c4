"""fxalign's benchmark: what instrumenting, extracting and comparing cost on real models.

One process, one run: for each model and exporter it measures plain vs instrumented export,
ONNX Runtime on the plain vs the debug model, end-to-end :func:`fxalign.align` against the floor
(plain export + one PyTorch forward + one ORT forward), the seed tutorial's
``onnx.utils.Extractor`` approach and ``verify_onnx_program(compare_intermediates=True)`` on the
same model, scaling with the number of modules, and peak memory with and without
``max_outputs_per_run``. :func:`run_benchmarks` returns plain data;
:func:`benchmarks.markdown.render` turns it into ``docs/benchmarks.md``.

Entry point: ``python -m benchmarks.run`` (``make bench``).

Example:
    >>> from benchmarks.harness import run_benchmarks
    >>> results = run_benchmarks(["convblocks"], quick=True)  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.cases import REAL_MODELS, BenchCase, build_case, synthetic_case
from fxalign.options import Exporter

__all__ = [
    "DEFAULT_MODELS",
    "QUICK_MODELS",
    "add_arguments",
    "main",
    "run_benchmarks",
    "run_from_args",
]

logger = logging.getLogger(__name__)

DEFAULT_MODELS = ["resnet50", "bert-base", "vit-base", "gpt2"]
"""Real architectures measured by a full run."""
QUICK_MODELS = ["convblocks", "bert-tiny"]
"""Small models for ``--quick`` (CI smoke runs)."""
DEFAULT_SIZES = [100, 500, 1000, 5000]
QUICK_SIZES = [50, 100, 200]
EXPORTERS: list[Exporter] = ["dynamo", "torchscript"]


def _say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def invocation() -> str:
    """The command line this process was started with, as the user typed it."""
    script = Path(sys.argv[0])
    if script.name == "run.py" and script.parent.name == "benchmarks":
        program = "python -m benchmarks.run"
    else:
        program = script.name  # another caller (a test runner, a notebook)
    return " ".join([program, *sys.argv[1:]])


def _load() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (other work on the machine shows here)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _attempt(errors: list[str], what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Run one measurement; on failure record the error and go on with the others."""
    try:
        return fn(*args)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        errors.append(f"{what}: {type(e).__name__}: {first}")
        _say(f"FAILED {what}: {type(e).__name__}: {first}")
        traceback.print_exc(file=sys.stderr)
        return None


def run_benchmarks(
    models: Sequence[str] | None = None,
    exporters: Sequence[Exporter] = ("dynamo", "torchscript"),
    *,
    quick: bool = False,
    repeats: int | None = None,
    sizes: Sequence[int] | None = None,
    verify_models: Sequence[str] | None = None,
    profile_models: Sequence[str] | None = None,
    memory_model: str | None = None,
    max_outputs_per_run: int = 16,
    contention_model: str | None = None,
    burners: int | None = None,
) -> dict[str, Any]:
    """Measure everything; return plain, JSON-serialisable data.

    Args:
        models: Names from :data:`benchmarks.cases.REAL_MODELS` (default: the real
            architectures, or :data:`QUICK_MODELS` with ``quick``).
        exporters: Which exporters to measure.
        quick: Small models, one repeat, small scaling sizes: a smoke run.
        repeats: Timed repeats per measurement (the best is kept); default 3 (1 with ``quick``).
        sizes: Module counts of the synthetic scaling models; ``[]`` skips scaling.
        verify_models: Models to time ``verify_onnx_program(compare_intermediates=True)`` on
            (dynamo only); default: the first model.
        profile_models: Models whose exports are profiled by phase; default: the first two.
        memory_model: Model for the ``max_outputs_per_run`` memory measurement; default:
            ``resnet50-batch8`` (the first model with ``quick``); ``""`` skips it.
        max_outputs_per_run: The split used by the memory measurement.
        contention_model: Model of the loaded-machine case (:mod:`benchmarks.contention`);
            default ``resnet50`` (the first model with ``quick``); ``""`` skips it.
        burners: CPU-burning helper processes of the loaded case (default: usable cores).

    Returns:
        ``{"machine", "settings", "models", "scaling", "memory", "contention", "profiles",
        "errors", ...}``.
    """
    from benchmarks import measure

    models = list(models or (QUICK_MODELS if quick else DEFAULT_MODELS))
    repeats = repeats or (1 if quick else 3)
    sizes = list(QUICK_SIZES if quick else DEFAULT_SIZES) if sizes is None else list(sizes)
    verify_models = list(models[:1] if verify_models is None else verify_models)
    profile_models = list(models[:2] if profile_models is None else profile_models)
    if memory_model is None:
        memory_model = models[0] if quick else "resnet50-batch8"
    if contention_model is None:
        contention_model = models[0] if quick else "resnet50"
    errors: list[str] = []
    started = time.time()
    results: dict[str, Any] = {
        "machine": measure.machine_info(),
        "settings": {
            "quick": quick,
            "repeats": repeats,
            "models": models,
            "exporters": list(exporters),
            "sizes": sizes,
            "verify_models": verify_models,
            "profile_models": profile_models,
            "memory_model": memory_model,
            "max_outputs_per_run": max_outputs_per_run,
            "contention_model": contention_model,
            "burners": burners,
            "command": invocation(),
        },
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "load_average": {"start": _load()},
        "models": [],
        "scaling": [],
        "memory": None,
        "contention": None,
        "profiles": [],
        "errors": errors,
    }
    if not quick:
        _say("warming up both exporters on a tiny model")
        warm = build_case("convblocks")
        for exporter in exporters:
            _attempt(errors, f"warm-up {exporter}", _warm_up, warm, exporter)
    settings = results["settings"]
    _measure_models(results, settings)
    if memory_model:
        results["memory"] = _measure_memory(settings, errors)
    if sizes:
        _measure_scaling(results, settings)
    if contention_model:  # last: its helper processes load the machine
        results["contention"] = _measure_contention(settings, errors)
    results["load_average"]["end"] = _load()
    results["duration_s"] = time.time() - started
    _say(f"done in {results['duration_s']:.0f} s")
    return results


def _measure_models(results: dict[str, Any], settings: dict[str, Any]) -> None:
    """Each model with each exporter, appended to ``results["models"]``."""
    quick, repeats, errors = settings["quick"], settings["repeats"], results["errors"]
    for name in settings["models"]:
        _say(f"building {name}")
        case = build_case(name)
        entry: dict[str, Any] = {
            "name": name,
            "load_average": _load(),
            "description": case.description,
            "modules": case.modules,
            "parameters": case.parameters,
            "exporters": {},
        }
        results["models"].append(entry)
        for exporter in settings["exporters"]:
            entry["exporters"][exporter] = _measure_model(
                case,
                exporter,
                repeats=repeats,
                verify=exporter == "dynamo" and name in settings["verify_models"],
                profile_repeats=(1 if quick else 2) if name in settings["profile_models"] else 0,
                errors=errors,
                profiles=results["profiles"],
            )
        del case


def _measure_memory(settings: dict[str, Any], errors: list[str]) -> dict[str, Any] | None:
    """Peak RSS of the memory model with and without ``max_outputs_per_run``, or None."""
    from benchmarks.measure import new_workdir
    from benchmarks.memory import measure_memory

    memory_model, exporter = settings["memory_model"], settings["exporters"][0]
    max_outputs_per_run = settings["max_outputs_per_run"]
    _say(f"{memory_model}: peak RSS with and without max_outputs_per_run={max_outputs_per_run}")
    case = build_case(memory_model)
    with new_workdir() as tmp:
        memory = _attempt(
            errors,
            f"{memory_model} memory",
            measure_memory,
            case,
            exporter,
            max_outputs_per_run,
            Path(tmp),
        )
    del case
    if memory is None:
        return None
    return {"model": memory_model, "exporter": exporter, **memory}


def _measure_contention(settings: dict[str, Any], errors: list[str]) -> dict[str, Any] | None:
    """The loaded-machine case (:func:`benchmarks.contention.measure_contention`), or None."""
    from benchmarks.contention import measure_contention
    from benchmarks.measure import new_workdir

    name, exporter = settings["contention_model"], settings["exporters"][0]
    _say(f"{name}/{exporter}: align on a quiet and on a loaded machine")
    case = build_case(name)
    with new_workdir() as tmp:
        result: dict[str, Any] | None = _attempt(
            errors,
            f"{name} contention",
            measure_contention,
            case,
            exporter,
            settings["repeats"],
            Path(tmp),
            settings["burners"],
        )
    return result


def _measure_scaling(results: dict[str, Any], settings: dict[str, Any]) -> None:
    """The synthetic scaling models, and the TorchScript CSE pass, into ``results``."""
    from benchmarks.scaling import measure_jit_cse, measure_scaling

    sizes, exporters, repeats = settings["sizes"], settings["exporters"], settings["repeats"]
    errors = results["errors"]
    _say(f"scaling over {sizes} modules")
    results["scaling"] = (
        _attempt(
            errors,
            "scaling",
            measure_scaling,
            synthetic_case,
            sizes,
            list(exporters),
            repeats,
        )
        or []
    )
    if "torchscript" in exporters:
        _say("TorchScript CSE pass with string constants")
        results["jit_cse"] = (
            _attempt(errors, "jit_cse", measure_jit_cse, (1000, 2000, 4000), repeats) or []
        )


def _warm_up(case: BenchCase, exporter: Exporter) -> None:
    """One plain and one full ``align`` run, so that one-time costs are not measured."""
    from benchmarks import measure

    with measure.new_workdir() as tmp:
        measure.plain_export(case, exporter, Path(tmp) / "warm.onnx")
    measure.quiet_align(case, exporter)


def _measure_model(
    case: BenchCase,
    exporter: Exporter,
    *,
    repeats: int,
    verify: bool,
    profile_repeats: int,
    errors: list[str],
    profiles: list[dict[str, Any]],
) -> dict[str, Any]:
    """Every per-model measurement for one exporter."""
    from benchmarks import alternatives, measure, memory
    from benchmarks.profile import profile_export

    name = f"{case.name}/{exporter}"
    row: dict[str, Any] = {}
    with measure.new_workdir() as tmp_name:
        tmp = Path(tmp_name)
        _say(f"{name}: plain vs instrumented export x{repeats}")
        exp = _attempt(
            errors, f"{name} export", measure.measure_export, case, exporter, repeats, tmp
        )
        row["export"] = exp
        if exp is None:
            return row
        plain, debug, instrumented = (
            tmp / "plain.onnx",
            tmp / "debug.onnx",
            tmp / "instrumented.onnx",
        )
        _say(f"{name}: ORT plain vs debug (child processes)")
        row["ort"] = _attempt(
            errors, f"{name} ort", memory.measure_ort, case, plain, debug, repeats, tmp
        )
        _say(f"{name}: align vs floor x{repeats}")
        row["align"] = _attempt(
            errors, f"{name} align", measure.measure_align, case, exporter, repeats, tmp
        )
        _say(f"{name}: cold align in each mode vs the cold floor (child processes)")
        row["cold"] = _attempt(
            errors, f"{name} cold", memory.measure_cold, case, exporter, tmp / "floor.onnx", tmp
        )
        _say(f"{name}: extract + run vs the tutorial's Extractor + run")
        row["onnx_side"] = _attempt(
            errors,
            f"{name} tutorial",
            alternatives.measure_onnx_side,
            case,
            instrumented,
            exp["aliases"],
            repeats,
            tmp,
        )
        if verify:
            _say(f"{name}: verify_onnx_program(compare_intermediates=True)")
            row["verify"] = _attempt(errors, f"{name} verify", alternatives.measure_verify, case)
        if profile_repeats:
            _say(f"{name}: export profile")
            prof = _attempt(
                errors, f"{name} profile", profile_export, case, exporter, profile_repeats, tmp
            )
            if prof is not None:
                profiles.append(prof)
    return row


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options (``python -m benchmarks.run --help``)."""
    known = ", ".join(REAL_MODELS)
    parser.add_argument("--quick", action="store_true", help="small models, one repeat (smoke)")
    parser.add_argument("--models", nargs="+", metavar="NAME", help=f"models ({known})")
    parser.add_argument("--exporters", nargs="+", choices=EXPORTERS, default=EXPORTERS)
    parser.add_argument(
        "--repeats", type=int, help="timed repeats per measurement (the best is kept)"
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="*",
        metavar="N",
        help="synthetic model sizes in modules (none: skip scaling)",
    )
    parser.add_argument(
        "--verify-models",
        nargs="*",
        metavar="NAME",
        help="models to run verify_onnx_program on (default: the first)",
    )
    parser.add_argument(
        "--profile-models",
        nargs="*",
        metavar="NAME",
        help="models whose exports are profiled (default: the first two)",
    )
    parser.add_argument(
        "--memory-model", metavar="NAME", help="model for the memory measurement ('' skips it)"
    )
    parser.add_argument("--max-outputs-per-run", type=int, default=16, metavar="K")
    parser.add_argument(
        "--contention-model",
        metavar="NAME",
        help="model for the loaded-machine case (default resnet50; '' skips it)",
    )
    parser.add_argument(
        "--burners", type=int, metavar="N", help="CPU-burning helpers (default: usable cores)"
    )
    parser.add_argument(
        "--out",
        default="docs/benchmarks.md",
        metavar="PATH",
        help="markdown report (default docs/benchmarks.md)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the raw results as JSON")


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Run with parsed :func:`add_arguments` options; write the markdown (and JSON)."""
    from benchmarks.markdown import render

    results = run_benchmarks(
        args.models,
        args.exporters,
        quick=args.quick,
        repeats=args.repeats,
        sizes=args.sizes,
        verify_models=args.verify_models,
        profile_models=args.profile_models,
        memory_model=args.memory_model,
        max_outputs_per_run=args.max_outputs_per_run,
        contention_model=args.contention_model,
        burners=args.burners,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(results))
    _say(f"wrote {out}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
        _say(f"wrote {args.json}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.run``: parse options, run, write the report; exit status 0."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    run_from_args(args)
    return 0
