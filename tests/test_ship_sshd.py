"""Code shipped to an agent deployed over SSH to a real sshd host: fetched through the tunnel once, cached in the
host's remote directory beside the agent's zipapp, and run from there."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from corral import Executor, Pool
from tests.cluster import Cluster
from tests.shipkit import forget, import_from, write_module
from scripts.sshlab import SshLab

pytestmark = pytest.mark.sshd

TASK = '''
import os
import sys

from corral import Pool  # noqa: F401 - the agent's host has no corral.console: importing the name still works

import {helper} as helper


def visit(x):
    """Where it ran: the host's remote directory (the agent's cwd), its sys.path head, and this file."""
    return helper.twice(x), os.getcwd(), sys.path[0], __file__
'''


def test_code_is_shipped_once_to_an_agent_on_a_real_sshd_host(ssh_cluster: Cluster, lab: SshLab, tmp_path: Path) -> None:  # noqa: F811
    host = lab.add_host("h1", "127.0.0.2")
    added = ssh_cluster.corral(*lab.host_args(host, "--tags", "far", "--slots", "2"))
    assert added.returncode == 0, added.stderr
    done = ssh_cluster.corral("deploy", "h1", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr

    name, helper = f"far_{uuid.uuid4().hex[:8]}", f"farhelper_{uuid.uuid4().hex[:8]}"
    write_module(tmp_path / "mods", helper, "def twice(x):\n    return 2 * x\n")
    write_module(tmp_path / "mods", name, TASK.format(helper=helper))
    module = import_from(tmp_path / "mods", name)
    try:
        with Pool(home=ssh_cluster.home, tags=["far"]) as p:
            digest = p._template(module.visit).wire["code"]
            results = p.map(module.visit, range(6), chunksize=1)
            with ssh_cluster.client() as c:
                agents = {j["agent"] for j in c.jobs(limit=20) if j["name"].startswith(p.name + " ")}
        assert agents == {"h1"}
        remote = host.remote_dir.resolve()
        cached = remote / "code" / digest
        assert [r[0] for r in results] == [0, 2, 4, 6, 8, 10]
        assert {r[1] for r in results} == {str(remote)}
        assert {r[2] for r in results} == {str(cached)} and {r[3] for r in results} == {str(cached / f"{name}.py")}
        assert (cached / f"{helper}.py").is_file()
        unpacked = os.stat(cached).st_ino

        # Again, from another executor: the host's copy is used as it is (not fetched and unpacked anew).
        with Executor(home=ssh_cluster.home, tags=["far"]) as ex:
            assert ex.submit(module.visit, 7).result(timeout=60)[0] == 14
        assert os.stat(cached).st_ino == unpacked
        assert sorted(p.name for p in (remote / "code").iterdir()) == [digest, f"{digest}.lock"]
    finally:
        forget(name, helper)
