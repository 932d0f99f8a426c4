"""Thread pools sized for a machine shared with other work (issue 14.5): never timings."""

import onnxruntime as ort
import pytest
import torch

from fxalign import threads
from fxalign.backends import OrtRunner
from fxalign.backends.ort import NO_SPINNING, SPINNING_STOP, threading_options


def test_usable_cpus_follow_affinity_and_the_cgroup_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(threads, "_CGROUP_CPU_MAX", cpu_max)
    assert threads.usable_cpus() == 4  # no cgroup file
    cpu_max.write_text("max 100000\n")
    assert threads.usable_cpus() == 4
    cpu_max.write_text("150000 100000\n")  # 1.5 CPUs of quota
    assert threads.usable_cpus() == 2
    cpu_max.write_text("20000 100000\n")
    assert threads.usable_cpus() == 1


def test_free_cpus_count_what_other_runnable_tasks_leave(monkeypatch):
    monkeypatch.setattr(threads, "usable_cpus", lambda: 4)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 4)
    assert threads.free_cpus(runnable=1, own=1) == 4  # this process alone
    assert threads.free_cpus(runnable=3, own=1) == 2
    assert threads.free_cpus(runnable=40, own=1) == 1  # never below one
    # This process's own workers still spinning after an operator are no other work.
    assert threads.free_cpus(runnable=3, own=3) == 4
    assert threads.free_cpus(runnable=5, own=3) == 2
    assert threads.free_cpus(runnable=1, own=0) == 4  # the asking thread counts once
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 64)  # a container on a big host
    assert threads.free_cpus(runnable=30, own=1) == 4


def test_free_cpus_read_proc_loadavg(tmp_path, monkeypatch):
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    loadavg = tmp_path / "loadavg"
    monkeypatch.setattr(threads, "_LOADAVG", loadavg)
    monkeypatch.setattr(threads, "own_running_threads", lambda: 1)
    loadavg.write_text("2.50 1.00 0.50 3/120 4242\n")
    assert threads.free_cpus() == 1
    loadavg.write_text("0.10 0.10 0.10 1/120 4242\n")
    assert threads.free_cpus() == 2
    loadavg.unlink()
    assert threads.free_cpus() == 2  # unreadable: every usable CPU


def test_own_running_threads_read_this_process_from_proc(tmp_path, monkeypatch):
    tasks = tmp_path / "task"
    for tid, state in [(10, "R"), (11, "S"), (12, "R"), (13, "D")]:
        (tasks / str(tid)).mkdir(parents=True)
        # A thread name may hold spaces and parentheses: the state follows the last ")".
        (tasks / str(tid) / "stat").write_text(f"{tid} (pt (main) 1) {state} 1 2 3\n")
    monkeypatch.setattr(threads, "_OWN_TASKS", tasks)
    assert threads.own_running_threads() == 2
    monkeypatch.setattr(threads, "_OWN_TASKS", tmp_path / "missing")
    assert threads.own_running_threads() == 1  # unreadable: the asking thread


def test_torch_threads_are_bounded_in_the_block_and_put_back():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with threads.torch_threads(1) as inside:
            assert inside == torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with threads.torch_threads(8) as inside:  # never raised above the caller's
            assert inside == torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), threads.torch_threads(1):
            raise RuntimeError("the block fails")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_ort_sessions_get_an_explicit_pool_that_spins_only_on_an_idle_machine(monkeypatch):
    monkeypatch.setattr("fxalign.backends.ort.usable_cpus", lambda: 3)
    monkeypatch.setattr("fxalign.backends.ort.free_cpus", lambda: 1)  # other work runs
    options = threading_options(ort.SessionOptions())
    assert options.intra_op_num_threads == 3  # explicit: ONNX Runtime pins no thread
    for key in NO_SPINNING:
        assert options.get_session_config_entry(key) == "0"
    assert options.get_session_config_entry(SPINNING_STOP) == "1"
    runner = OrtRunner(graph_optimization_level="ORT_DISABLE_ALL")
    options = runner.session_options()
    assert options.intra_op_num_threads == 3
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert options.get_session_config_entry(NO_SPINNING[0]) == "0"
    monkeypatch.setattr("fxalign.backends.ort.free_cpus", lambda: 3)  # nothing else runs
    options = runner.session_options()
    assert options.get_session_config_entry(NO_SPINNING[0]) == "1"  # during a run only
    assert options.get_session_config_entry(NO_SPINNING[1]) == "0"
    assert options.get_session_config_entry(SPINNING_STOP) == "1"
    forced = threading_options(ort.SessionOptions(), spin=False)
    assert forced.get_session_config_entry(NO_SPINNING[0]) == "0"
