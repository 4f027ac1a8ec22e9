"""The agent is what goes over the wire: stdlib only, and it runs on Python 3.8."""

from __future__ import annotations

import ast
import glob
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster import REPO, Cluster

AGENT_FILES = sorted((REPO / "agent").glob("*.py"))


def test_agent_imports_nothing_outside_the_stdlib() -> None:
    probe = (
        "import sys, corral.agent.runner, corral.agent.execute, corral.agent.protocol, corral.agent.statedir, corral.agent.__main__\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'paramiko', 'rich', 'console') or m.startswith('corral.console'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_agent_imports_only_stdlib_modules_by_name() -> None:
    stdlib = set(sys.stdlib_module_names)
    for path in AGENT_FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                root = name.split(".")[0]
                assert root in stdlib or root == "__future__", f"{path.name} imports {name}"


def test_agent_source_parses_as_python_3_8() -> None:
    for path in AGENT_FILES:
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, 8))


def _python38() -> str | None:
    found = sorted(glob.glob("/root/.pyenv/versions/3.8*/bin/python3.8")) + sorted(glob.glob("/usr/bin/python3.8"))
    return found[0] if found else None


@pytest.mark.skipif(_python38() is None, reason="no Python 3.8 interpreter on this machine (pyenv 3.8 not installed)")
def test_agent_runs_jobs_under_python_3_8(cluster: Cluster) -> None:
    python38 = _python38()
    log = open(cluster.logs / "agent-py38.log", "ab")
    proc = subprocess.Popen([python38, "-m", "corral.agent", "-v", "--name", "py38", "--slots", "2"], env=cluster.env,
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    cluster.agents["py38"] = proc
    from tests.cluster import wait_until

    with cluster.client() as c:
        wait_until(lambda: any(a["name"] == "py38" and a["python"].startswith("3.8") for a in c.agents()),
                 what="the 3.8 agent to register")
        shell = c.submit_command("echo from $(python3 --version 2>/dev/null || echo sh)")
        call = c.submit_call("tests.jobs:inc", (7,))
        timed = c.submit_command("sleep 20", timeout=0.5)
        assert c.wait([shell, call, timed], timeout=30) == {shell: "done", call: "done", timed: "timeout"}
        assert c.values([call]) == [8]


@pytest.mark.skipif(_python38() is None, reason="no Python 3.8 interpreter on this machine (pyenv 3.8 not installed)")
def test_shipped_code_and_pool_chunks_run_under_python_3_8(cluster: Cluster, tmp_path: Path) -> None:
    from corral import Pool
    from tests.cluster import wait_until
    from tests.shipkit import forget, import_from, write_module

    log = open(cluster.logs / "agent-py38.log", "ab")
    proc = subprocess.Popen([_python38(), "-m", "corral.agent", "-v", "--name", "py38", "--slots", "2", "--tags", "old"],
                            env=cluster.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    cluster.agents["py38"] = proc
    with cluster.client() as c:
        wait_until(lambda: any(a["name"] == "py38" for a in c.agents()), what="the 3.8 agent to register")
    write_module(tmp_path, "py38_helper", "def twice(x):\n    return 2 * x\n")
    write_module(tmp_path, "py38_task", "import sys\nimport py38_helper\n\ndef f(x):\n"
                 "    return py38_helper.twice(x), sys.version_info[:2]\n\ndef boom():\n    raise KeyError('k')\n")
    module = import_from(tmp_path, "py38_task")
    try:
        with Pool(home=cluster.home, tags=["old"]) as p:
            assert p.map(module.f, range(6), chunksize=3) == [(2 * x, (3, 8)) for x in range(6)]
            with pytest.raises(KeyError):
                p.apply(module.boom)
    finally:
        forget("py38_task", "py38_helper")
