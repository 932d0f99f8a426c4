"""How many CPU threads fxalign's stages may use, so that thread pools hold up under contention.

On a machine shared with other CPU-bound work (a CI runner, a laptop building something), a
thread pool sized for an idle machine collapses rather than slows down:

* ONNX Runtime's default intra-op pool has one thread per physical core, each *pinned* to its
  core, and its workers spin while they wait: a pinned worker whose core another process holds
  cannot move, and every operator of the run waits for it.
* PyTorch's OpenMP pool splits each operator statically between its threads and ends it with a
  barrier: when one thread is descheduled, the others spin at the barrier until it comes back,
  once per operator. A forward of many small operators (the local-error replays run one module
  at a time) pays that once per operator.

:func:`usable_cpus` is what the process may run on (affinity and the cgroup CPU quota), the
thread count :class:`~fxalign.backends.OrtRunner` gives ONNX Runtime (an explicit count also
turns its pinning off). :func:`free_cpus` reads how many of those are not taken by other
runnable tasks right now, and :func:`torch_threads` bounds PyTorch's intra-op threads by it for
a block of code, putting the caller's setting back afterwards.

Example:
    >>> import torch
    >>> with torch_threads(1):
    ...     inside = torch.get_num_threads()
    >>> inside
    1
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["free_cpus", "own_running_threads", "torch_threads", "usable_cpus"]

logger = logging.getLogger(__name__)

_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
_LOADAVG = Path("/proc/loadavg")
_OWN_TASKS = Path("/proc/self/task")


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, bounded by a cgroup v2 CPU quota.

    Example:
        >>> usable_cpus() >= 1
        True
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = _CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def free_cpus(runnable: int | None = None, own: int | None = None) -> int:
    """How many of the :func:`usable_cpus` other runnable tasks leave to this process, right now.

    Read from the instantaneous count of runnable tasks in ``/proc/loadavg`` (the whole
    machine's), less this process's own running threads (:func:`own_running_threads`: a
    PyTorch or ONNX Runtime worker still spinning after an operator is no other work), against
    the machine's CPUs. Where it cannot be read, every usable CPU counts as free.

    Args:
        runnable: The machine's runnable-task count to judge (default: read it now).
        own: How many of them are this process's (default: read it now; at least 1).

    Example:
        >>> free_cpus(runnable=1, own=1) == usable_cpus()  # only this process runs
        True
        >>> free_cpus(runnable=3, own=3) == usable_cpus()  # its own workers spinning
        True
    """
    usable = usable_cpus()
    if runnable is None:
        try:
            runnable = int(_LOADAVG.read_text().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return usable
    if own is None:
        own = own_running_threads()
    machine = max(os.cpu_count() or usable, usable)
    others = max(0, runnable - max(1, own))
    return max(1, min(usable, machine - others))


def own_running_threads() -> int:
    """This process's threads running or runnable now (state ``R``), read from ``/proc``; 1 if not.

    Example:
        >>> own_running_threads() >= 1  # the thread asking runs
        True
    """
    running = 0
    try:
        stats = list(_OWN_TASKS.glob("*/stat"))
    except OSError:
        return 1
    for stat in stats:
        try:
            text = stat.read_text()
        except OSError:  # the thread ended meanwhile
            continue
        end = text.rfind(")")  # the name in parentheses may itself hold ")"
        running += text[end + 2 : end + 3] == "R"
    return max(1, running)


@contextlib.contextmanager
def torch_threads(limit: int | None = None) -> Iterator[int]:
    """PyTorch's intra-op threads bounded by ``limit`` (default :func:`free_cpus`) in the block.

    Never raises the count the caller set; puts it back on leaving, however the block ends.

    Yields:
        The thread count in effect inside the block.
    """
    import torch  # here: the stages below torch (compare) use the CPU counts alone

    before = torch.get_num_threads()
    threads = max(1, min(before, free_cpus() if limit is None else limit))
    if threads != before:
        logger.debug("PyTorch intra-op threads %d -> %d for this stage", before, threads)
        torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
