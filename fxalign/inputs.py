"""Build model inputs from command-line specs and files.

A spec is ``[NAME=]DIMS[:DTYPE[:LOW..HIGH]]``:

* ``1x3x224x224``: a float32 tensor from a seeded standard normal;
* ``x=1x3x224x224:float16``: the keyword input ``x``;
* ``ids=1x16:int64:0..1000``: integers drawn uniformly from ``[0, 1000)``;
* ``mask=1x16:bool``: random booleans;
* ``scale=scalar:int64:3..4``: a 0-d tensor holding 3.

Unnamed specs become positional arguments in order; named ones become keyword arguments.
"""

from __future__ import annotations

import inspect
import math
import os
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from fxalign.backends.feeds import input_leaf_names
from fxalign.errors import InputError

__all__ = [
    "InputSpec",
    "dynamic_export_kwargs",
    "input_files",
    "load_inputs",
    "make_inputs",
    "parse_input_spec",
]

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "double": torch.float64,
    "int64": torch.int64,
    "long": torch.int64,
    "int32": torch.int32,
    "int": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}

_SPEC_RE = re.compile(
    r"^(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)=)?(?P<dims>scalar|\d+(?:x\d+)*)"
    r"(?::(?P<dtype>[a-z0-9]+))?(?::(?P<low>-?[\d.]+)\.\.(?P<high>-?[\d.]+))?$"
)


@dataclass(frozen=True)
class InputSpec:
    """One parsed ``--input`` spec.

    Attributes:
        name: Keyword name, or ``None`` for a positional input.
        shape: Tensor shape (``()`` for a scalar).
        dtype: Element type.
        low: Lower bound of the uniform range (integers, floats when given).
        high: Upper bound (exclusive for integers).
    """

    name: str | None
    shape: tuple[int, ...]
    dtype: torch.dtype
    low: float | None = None
    high: float | None = None


def parse_input_spec(text: str) -> InputSpec:
    """Parse ``[NAME=]DIMS[:DTYPE[:LOW..HIGH]]``.

    Raises:
        InputError: The spec is malformed or names an unknown dtype.

    Example:
        >>> parse_input_spec("ids=1x16:int64:0..1000")
        InputSpec(name='ids', shape=(1, 16), dtype=torch.int64, low=0.0, high=1000.0)
    """
    match = _SPEC_RE.match(text.strip())
    if match is None:
        raise InputError(
            f"cannot parse input spec {text!r}",
            hint="use [NAME=]DIMS[:DTYPE[:LOW..HIGH]], e.g. 1x3x224x224 or ids=1x16:int64:0..1000",
        )
    dims = match.group("dims")
    shape = () if dims == "scalar" else tuple(int(d) for d in dims.split("x"))
    dtype_name = match.group("dtype") or "float32"
    if dtype_name not in _DTYPES:
        raise InputError(
            f"unknown dtype {dtype_name!r} in input spec {text!r}",
            hint=f"one of: {', '.join(sorted(_DTYPES))}",
        )
    low, high = match.group("low"), match.group("high")
    spec = InputSpec(
        match.group("name"),
        shape,
        _DTYPES[dtype_name],
        None if low is None else float(low),
        None if high is None else float(high),
    )
    if spec.low is not None and spec.high is not None and spec.high <= spec.low:
        raise InputError(f"empty range {low}..{high} in input spec {text!r}")
    return spec


def _make_tensor(spec: InputSpec, generator: torch.Generator) -> torch.Tensor:
    numel = math.prod(spec.shape)
    nbytes = numel * torch.empty((), dtype=spec.dtype).element_size()
    available = _available_memory()
    # Filling a tensor larger than free memory gets the process killed, not an exception.
    if available is not None and nbytes > available:
        raise InputError(
            f"input of shape {'x'.join(map(str, spec.shape))} needs {nbytes / 2**30:.1f} GiB, "
            f"more than the {available / 2**30:.1f} GiB of memory available",
            hint="use a smaller shape",
        )
    try:
        return _fill_tensor(spec, generator)
    except (RuntimeError, MemoryError) as e:
        if "memory" not in str(e).lower() and not isinstance(e, MemoryError):
            raise
        raise InputError(
            f"cannot allocate input of shape {'x'.join(map(str, spec.shape))} "
            f"({numel:,} elements, {nbytes / 2**30:.1f} GiB): {type(e).__name__}",
            hint="use a smaller shape",
        ) from e


def _available_memory() -> int | None:
    """Bytes of memory available now (``MemAvailable``, Linux); ``None`` where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _fill_tensor(spec: InputSpec, generator: torch.Generator) -> torch.Tensor:
    if spec.dtype == torch.bool:
        return torch.randint(0, 2, spec.shape, generator=generator).bool()
    if not spec.dtype.is_floating_point:
        low = int(spec.low) if spec.low is not None else 0
        high = int(spec.high) if spec.high is not None else 10
        return torch.randint(low, high, spec.shape, generator=generator, dtype=spec.dtype)
    if spec.low is not None and spec.high is not None:
        value = torch.rand(spec.shape, generator=generator, dtype=torch.float64)
        value = spec.low + (spec.high - spec.low) * value
    else:
        value = torch.randn(spec.shape, generator=generator, dtype=torch.float64)
    return value.to(spec.dtype)


def make_inputs(
    specs: Sequence[str | InputSpec], *, seed: int = 0
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Seeded random inputs from specs: unnamed ones positional, named ones keyword.

    Args:
        specs: Spec strings or parsed specs.
        seed: Seed of the generator; the same seed gives the same inputs.

    Returns:
        ``(args, kwargs)``.

    Raises:
        InputError: A spec is malformed, or a keyword is given twice.
    """
    generator = torch.Generator().manual_seed(seed)
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for item in specs:
        spec = parse_input_spec(item) if isinstance(item, str) else item
        tensor = _make_tensor(spec, generator)
        if spec.name is None:
            if kwargs:
                raise InputError(
                    "positional input spec after a named one",
                    hint="list unnamed (positional) inputs first",
                )
            args.append(tensor)
        elif spec.name in kwargs:
            raise InputError(f"input {spec.name!r} given twice")
        else:
            kwargs[spec.name] = tensor
    return tuple(args), kwargs


_INPUT_SUFFIXES = (".npz", ".pt", ".pth")


def load_inputs(path: str | os.PathLike[str]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Read one sample's inputs from a file.

    * ``.npz``: arrays named ``arg0``, ``arg1``, ... (or ``0``, ``1``, ...) are positional, in
      that order; any other name is a keyword input.
    * ``.pt``/``.pth`` (``torch.save``, loaded with ``weights_only=True``): a tensor (one
      positional input), a tuple or list (positional inputs), a dict (keyword inputs), or
      ``{"args": [...], "kwargs": {...}}``.

    Raises:
        InputError: The file is missing, of another type, or holds something else.
    """
    file = Path(path)
    if not file.is_file():
        raise InputError(f"input file {str(file)!r} not found")
    if file.suffix == ".npz":
        import numpy as np

        try:
            with np.load(file, allow_pickle=False) as data:
                arrays = {k: torch.from_numpy(np.array(data[k])) for k in data.files}
        except (OSError, ValueError, EOFError, KeyError, TypeError, zipfile.BadZipFile) as e:
            raise InputError(
                f"cannot read {str(file)!r} as .npz: {type(e).__name__}: {e}",
                hint="write it with numpy.savez(path, arg0=..., name=...)",
            ) from e
        positional = sorted(
            (k for k in arrays if re.fullmatch(r"(arg)?\d+", k)),
            key=lambda k: int(k.removeprefix("arg")),
        )
        return tuple(arrays[k] for k in positional), {
            k: v for k, v in arrays.items() if k not in positional
        }
    if file.suffix in (".pt", ".pth"):
        try:
            value = torch.load(file, weights_only=True)
        except Exception as e:
            raise InputError(f"cannot load {str(file)!r}: {e}") from e
        if isinstance(value, dict) and set(value) <= {"args", "kwargs"} and value:
            return tuple(value.get("args", ())), dict(value.get("kwargs", {}))
        if isinstance(value, dict):
            return (), dict(value)
        if isinstance(value, (tuple, list)):
            return tuple(value), {}
        if isinstance(value, torch.Tensor):
            return (value,), {}
        raise InputError(f"{str(file)!r} holds a {type(value).__name__}, not model inputs")
    raise InputError(
        f"unsupported input file {str(file)!r}", hint=f"use one of {', '.join(_INPUT_SUFFIXES)}"
    )


def input_files(path: str | os.PathLike[str]) -> list[Path]:
    """A file, or the input files of a folder in name order.

    Raises:
        InputError: Nothing usable at ``path``.
    """
    root = Path(path)
    if root.is_dir():
        files = sorted(p for p in root.iterdir() if p.suffix in _INPUT_SUFFIXES)
        if not files:
            raise InputError(
                f"no input files in {str(root)!r}", hint=f"expected {', '.join(_INPUT_SUFFIXES)}"
            )
        return files
    if not root.exists():
        raise InputError(f"input path {str(root)!r} not found")
    return [root]


def dynamic_export_kwargs(
    exporter: str,
    forward: Any,
    example: tuple[tuple[Any, ...], dict[str, Any]],
    samples: Sequence[tuple[tuple[Any, ...], dict[str, Any]]],
) -> dict[str, Any]:
    """Export options that make every input dimension dynamic that differs among the inputs.

    For the dynamo exporter, ``dynamic_shapes`` by parameter name with ``Dim.DYNAMIC``; for the
    TorchScript exporter, ``dynamic_axes`` by the input names fxalign exports with.

    Args:
        exporter: ``"dynamo"`` or ``"torchscript"``.
        forward: The model's ``forward``.
        example: ``(args, kwargs)`` the model is exported with.
        samples: Other ``(args, kwargs)`` it will be checked on.

    Returns:
        Options for ``export_kwargs`` (empty when all shapes agree).
    """

    def shapes(sample: tuple[tuple[Any, ...], dict[str, Any]]) -> list[tuple[int, ...]]:
        leaves = pytree.tree_leaves((tuple(sample[0]), dict(sample[1])))
        return [tuple(v.shape) for v in leaves if isinstance(v, torch.Tensor)]

    base = shapes(example)
    varying: list[set[int]] = [set() for _ in base]
    for sample in samples:
        for i, shape in enumerate(shapes(sample)[: len(base)]):
            if len(shape) == len(base[i]):
                varying[i] |= {
                    d for d, (a, b) in enumerate(zip(shape, base[i], strict=True)) if a != b
                }
    if not any(varying):
        return {}
    names = input_leaf_names(forward, *example)
    if exporter == "torchscript":
        return {
            "input_names": names,
            # Named axes: given bare indices, the exporter warns that it made names up.
            "dynamic_axes": {
                n: {d: f"{n}_dim{d}" for d in sorted(v)}
                for n, v in zip(names, varying, strict=True)
                if v
            },
        }
    signature = inspect.signature(forward)
    bound = signature.bind(*example[0], **example[1])
    by_name = dict(zip(names, varying, strict=True))
    dynamic: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if isinstance(value, torch.Tensor) and by_name.get(name):
            dynamic[name] = {d: torch.export.Dim.DYNAMIC for d in sorted(by_name[name])}
        else:
            dynamic[name] = None
    return {"dynamic_shapes": dynamic}
