"""The test commands: `make test` skips the slow group, `make test-slow` runs it, CI runs both."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _fake(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(0o755)


@pytest.fixture
def fake_bin(tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    _fake(folder, "chromium", "exit 0")  # so that .ci/run does not try to install one
    return folder


def _ci(fake_bin: Path, failing: str) -> tuple[int, list[str]]:
    """Run .ci/run with a ``make`` that logs its target and fails for ``failing``."""
    log = fake_bin / "log"
    _fake(fake_bin, "make", f'echo "$1" >> {log}\n[ "$1" != "{failing}" ]')
    env = {"PATH": f"{fake_bin}:/usr/bin:/bin", "HOME": str(fake_bin)}
    done = subprocess.run(["bash", str(ROOT / ".ci" / "run")], env=env, check=False)
    return done.returncode, log.read_text().split()


def test_ci_runs_both_groups_and_fails_when_either_fails(fake_bin):
    assert _ci(fake_bin, failing="none") == (0, ["test", "test-slow", "lint"])
    (fake_bin / "log").unlink()
    code, targets = _ci(fake_bin, failing="test")
    assert code != 0 and targets == ["test", "test-slow", "lint"]  # the slow group still ran
    (fake_bin / "log").unlink()
    assert _ci(fake_bin, failing="test-slow")[0] != 0


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
@pytest.mark.parametrize(("target", "marker"), [("test", "not slow"), ("test-slow", "slow")])
def test_make_targets_select_their_group_and_fail_when_pytest_collects_nothing(
    fake_bin, target, marker
):
    log = fake_bin / "log"
    # pip succeeds; pytest exits 5, as it does when it collects no test
    _fake(fake_bin, "python", f'echo "$*" >> {log}\n[ "$2" = pip ] || exit 5')
    done = subprocess.run(
        ["make", "-s", "-C", str(ROOT), target, f"PYTHON={fake_bin / 'python'}"],
        capture_output=True,
        check=False,
    )
    assert done.returncode != 0
    assert f"-m pytest -m {marker}" in log.read_text().splitlines()[-1]


def test_the_slow_group_holds_the_long_and_large_tests():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert any(m.startswith("slow:") for m in config["tool"]["pytest"]["ini_options"]["markers"])
    for path, name in [
        ("tests/test_large.py", "def test_model_over_2gb"),
        ("tests/test_bench.py", "def test_every_measurement_is_there(smoke)"),
    ]:
        lines = (ROOT / path).read_text().splitlines()
        index = next(i for i, line in enumerate(lines) if line.startswith(name))
        assert any("pytest.mark.slow" in line for line in lines[max(0, index - 3) : index])
