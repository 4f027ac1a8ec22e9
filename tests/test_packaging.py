"""The wheel installs one import name, `corral`, and a package that owns another top-level name breaks nothing."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.cluster import REPO

pytestmark = pytest.mark.packaging


def run(*argv: str | Path, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, argv))}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, REPO)
    (built,) = out.glob("corral-*.whl")
    return built


def test_the_wheel_holds_one_top_level_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
        top_level = next((n for n in names if n.endswith(".dist-info/top_level.txt")), None)
        listed = z.read(top_level).decode().split() if top_level else []
    assert tops == {"corral"}, tops
    assert listed in ([], ["corral"]), listed
    # Both wings, the console's styles, and none of the repository's tools.
    assert "corral/agent/runner.py" in names and "corral/console/client.py" in names
    assert "corral/console/tui/corral.tcss" in names
    assert not [n for n in names if n.startswith(("corral/scripts", "corral/tests", "corral/bench"))]


def test_another_packages_console_beside_it_breaks_nothing(tmp_path: Path, wheel: Path) -> None:
    """`pip install console` (an unrelated ANSI library on the index) used to overwrite corral's files."""
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    python, corral = venv / "bin" / "python", venv / "bin" / "corral"
    run(python, "-m", "pip", "install", "-q", wheel)
    run(python, "-m", "pip", "install", "-q", "console")
    home = tmp_path / "home"
    status = subprocess.run([corral, "--home", str(home), "status"], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path)
    assert status.returncode == 1 and status.stderr.startswith("corral status: no master is recorded in"), status.stderr
    probe = ("import corral, corral.console.cli, corral.agent.runner, console; "
             "print(corral.__file__, console.__file__)")
    paths = run(python, "-c", probe, cwd=tmp_path).stdout.split()
    assert "site-packages/corral/" in paths[0] and "site-packages/console/" in paths[1], paths
    run(python, "-m", "pip", "uninstall", "-y", "-q", "console")
    run(python, "-c", "import corral.console.cli, corral.agent.__main__", cwd=tmp_path)
    agent = subprocess.run([python, "-m", "corral.agent", "--connect", "nowhere"], capture_output=True, text=True,
                           timeout=60, cwd=tmp_path)
    assert agent.returncode == 2 and agent.stderr.startswith("corral agent: bad address"), agent.stderr
