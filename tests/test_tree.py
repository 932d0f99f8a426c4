import math

from fixtures.reports import planted_report
from fxalign import Metrics, Row
from fxalign.report.tree import module_tree, worse


def _row(name, max_abs, *, passed=True, local=None):
    metrics = None if max_abs is None else Metrics(max_abs, 0, 0, 0, 1, 0, 0 if passed else 1, 4)
    return Row(
        name,
        name.split("#")[0],
        0,
        "T",
        "leaf",
        "ok" if passed else "diverged",
        None if max_abs is None else passed,
        1e-4,
        1e-3,
        metrics=metrics,
        local=None if local is None else Metrics(local, 0, 0, 0, 1, 0, 0, 4),
    )


def test_worse_orders_none_numbers_inf_nan():
    assert worse(None, None) is None
    assert worse(None, 0.0) == 0.0
    assert worse(2.0, 1.0) == 2.0
    assert worse(1e300, math.inf) == math.inf
    assert math.isnan(worse(math.inf, math.nan))
    assert math.isnan(worse(math.nan, 3.0))


def test_tree_groups_by_path_and_aggregates_the_worst_error():
    report = planted_report()
    root = module_tree(
        report.rows,
        first_divergence=report.first_divergence,
        unmarked=report.coverage.unmarked,
    )
    assert [(d, n.path) for d, n in root.walk()] == [
        (0, ""),
        (1, "first"),
        (1, "mid"),
        (2, "mid.lin"),
        (2, "mid.clamp"),
        (1, "unused"),
        (1, "x"),
        (2, "x.y"),
    ]
    mid = root.find("mid")
    assert mid is not None
    assert mid.worst == 7.15 and mid.own_worst == 7.15 and mid.module_type == "Mid"
    assert mid.failed == 2 and mid.compared == 3
    assert mid.has_first_divergence and not mid.is_first_divergence
    clamp = root.find("mid.clamp")
    assert clamp is not None and clamp.is_first_divergence and clamp.rows == [2]
    assert root.find("first").worst == 0.0
    assert root.find("unused").worst is None and root.find("unused").rows == [4]
    # intermediate node created for the unmarked module, without rows of its own
    assert root.find("x").rows == [] and root.find("x.y").unmarked == "called 0 times"
    # the model's own outputs sit at the root; the root sees everything
    assert root.rows == [5] and root.worst == 7.15 and root.failed == 3
    assert not root.find("first").has_first_divergence


def test_tree_takes_the_worst_over_calls_and_local_errors():
    rows = [
        _row("blk.shared", 1e-6, local=1e-7),
        _row("blk.shared#1", 3.0, passed=False, local=2.0),
        _row("blk.other", None),
        _row("blk.bad", math.inf, passed=False),
    ]
    root = module_tree(rows, first_divergence="blk.shared#1")
    shared = root.find("blk.shared")
    assert shared.rows == [0, 1] and shared.worst == 3.0 and shared.local == 2.0
    assert shared.is_first_divergence
    assert root.find("blk").worst == math.inf
    assert root.find("blk").local is None  # local errors are the node's own, not aggregated
    assert root.find("blk.other").worst is None and root.find("blk.other").compared == 0


def test_tree_of_no_rows_is_a_bare_root():
    root = module_tree([])
    assert root.path == "" and root.children == [] and root.worst is None
