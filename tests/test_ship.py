"""Code shipping on real agents that cannot import the code: siblings and packages, a changed module, no code leaking
from one job into the next, refusals in one line, `corral call --ship`, the limits, and the hash checked on arrival."""

from __future__ import annotations

import functools
import hashlib
import io
import os
import re
import threading
import types
import uuid
import zipfile
from pathlib import Path

import pytest

from corral import Client, Pool
from corral.agent.codecache import BadBundle, bundle_digest
from corral.agent.errors import BadJobSpec
from corral.agent.protocol import MAX_BUNDLE_UNPACKED, PROTOCOL_VERSION
from corral.console.errors import CannotShip, JobFailed
from tests.cluster import Cluster
from tests.shipkit import forget, import_from, pool_cluster, tasks, write_module  # noqa: F401 (fixtures)

FETCHED = re.compile(r"Fetched shipped code ([0-9a-f]{12})")


@pytest.fixture(scope="module")
def solo(pool_cluster: Cluster) -> str:  # noqa: F811
    """An agent of one slot (one pool worker: every job runs in the same process), reached by its tag."""
    pool_cluster.start_agent("solo", slots=1, tags="solo")
    return "solo"


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    return text


def test_a_shipped_module_imports_its_sibling(pool_cluster: Cluster, tasks: types.ModuleType) -> None:  # noqa: F811
    with Pool(home=pool_cluster.home) as p:
        assert p.map(tasks.sibling, range(5)) == [0, 2, 4, 6, 8]


def test_a_shipped_package_with_relative_imports(pool_cluster: Cluster, tmp_path: Path) -> None:  # noqa: F811
    name = unique("pkg")
    write_module(tmp_path / name, "__init__", "")
    write_module(tmp_path / name, "core", "from .util import scale\n\ndef work(x):\n    return scale(x)\n")
    write_module(tmp_path / name / "util", "__init__", "FACTOR = 3\n\ndef scale(x):\n    return FACTOR * x\n")
    module = import_from(tmp_path, f"{name}.core")
    try:
        with Pool(home=pool_cluster.home) as p:
            assert p.map(module.work, [1, 2]) == [3, 6]
    finally:
        forget(name)


def test_a_module_changed_between_two_pools_runs_its_new_code(pool_cluster: Cluster, solo: str, tmp_path: Path) -> None:  # noqa: F811
    name = unique("changing")
    path = write_module(tmp_path, name, "import os\n\ndef version():\n    return 'one', os.getpid()\n")
    module = import_from(tmp_path, name)
    try:
        with Pool(home=pool_cluster.home, tags=[solo]) as p:
            first, pid = p.apply(module.version)
        path.write_text("import os\n\ndef version():\n    return 'two', os.getpid()\n")
        with Pool(home=pool_cluster.home, tags=[solo]) as p:
            second, pid_again = p.apply(module.version)
        assert (first, second) == ("one", "two")
        assert pid_again == pid  # the same worker process had the old module loaded: it was forgotten
    finally:
        forget(name)


def test_shipped_code_never_leaks_into_the_next_job(pool_cluster: Cluster, solo: str, tmp_path: Path) -> None:  # noqa: F811
    name = unique("leaky")
    write_module(tmp_path, name, "import os\n\ndef pid():\n    return os.getpid()\n")
    module = import_from(tmp_path, name)
    try:
        with Pool(home=pool_cluster.home, tags=[solo]) as p:
            pid = p.apply(module.pid)
        with Client(home=pool_cluster.home) as c:  # by name, no code: the same worker must not find it
            job = c.submit_call(f"{name}:pid", tags=[solo])
            assert c.wait([job], 30) == {job: "failed"}
            record = c.job(job)
        assert f"No module named '{name}'" in record["error"] and record["attempt_list"][-1]["agent"] == solo
        with Pool(home=pool_cluster.home, tags=[solo]) as p:
            assert p.apply(module.pid) == pid  # same worker, and the shipped job still finds its code
    finally:
        forget(name)


def test_a_callable_jobs_cwd_and_code_lead_its_sys_path(pool_cluster: Cluster, tasks: types.ModuleType, tmp_path: Path) -> None:  # noqa: F811
    with Client(home=pool_cluster.home) as c:
        job = c.submit_call(tasks.where, cwd=str(tmp_path))
        assert c.wait([job], 30) == {job: "done"}
        cwd, head, where = c.values([job])[0]
    assert cwd == str(tmp_path) and head[1] == str(tmp_path)
    assert head[0].endswith("/code-cache/" + os.path.basename(head[0])) and where.startswith(head[0])


class CallableObject:
    def __call__(self, x: int) -> int:
        return x


def test_a_lambda_is_refused_with_one_line_and_nothing_is_queued(pool_cluster: Cluster, tasks: types.ModuleType) -> None:  # noqa: F811
    def nested(x: int) -> int:
        return x

    class Unpicklable:
        def __init__(self) -> None:
            self.lock = threading.Lock()

        def method(self, x: int) -> int:
            return x

    with Client(home=pool_cluster.home) as c:
        before = c.status()["counts"]
        with Pool(home=pool_cluster.home) as p:
            with pytest.raises(CannotShip) as caught:
                p.map(lambda x: x, [1, 2])
            assert one_line(caught.value).startswith("cannot send lambda")
            with pytest.raises(CannotShip, match="defined inside another function"):
                p.apply(nested, (1,))
            with pytest.raises(CannotShip, match="the object it is bound to does not pickle"):
                p.apply(Unpicklable().method, (1,))
            with pytest.raises(CannotShip, match="lambda"):
                list(p.imap(lambda x: x, [1]))
            with pytest.raises(CannotShip, match="lambda"):
                p.apply(functools.partial(lambda x: x, 1))
        with pytest.raises(CannotShip, match="lambda"):
            c.map(lambda x: x, [1])
        with pytest.raises(CannotShip, match="callable object"):
            c.submit_call(CallableObject())
        assert c.status()["counts"] == before


def test_client_map_and_submit_call_take_function_objects(pool_cluster: Cluster, tasks: types.ModuleType) -> None:  # noqa: F811
    with Client(home=pool_cluster.home) as c:
        assert c.map(tasks.sqr, range(4)) == [0, 1, 4, 9]
        job = c.submit_call(tasks.mul, (6, 7))
        assert c.wait([job], 30) == {job: "done"} and c.values([job]) == [42]
        names = [j["name"] for j in c.jobs(limit=6)]
    batch = [n for n in names if re.fullmatch(r"map-\d+", n)]
    assert len(batch) == 4 and len(set(batch)) == 1  # one batch, one shared name


def test_corral_call_ship_and_cwd(pool_cluster: Cluster, tmp_path: Path) -> None:  # noqa: F811
    name = unique("clitask")
    write_module(tmp_path / "src", name, "import helper_cli\n\ndef square(x):\n    return helper_cli.one() * x * x\n")
    write_module(tmp_path / "src", "helper_cli", "def one():\n    return 1\n")
    shipped = pool_cluster.corral("call", "--ship", str(tmp_path / "src"), "--wait", f"{name}:square", "3")
    assert shipped.returncode == 0, shipped.stdout + shipped.stderr
    assert shipped.stdout.strip().splitlines()[-1] == "9"
    by_cwd = pool_cluster.corral("call", "--cwd", str(tmp_path / "src"), "--wait", f"{name}:square", "4")
    assert by_cwd.returncode == 0, by_cwd.stdout + by_cwd.stderr
    assert by_cwd.stdout.strip().splitlines()[-1] == "16"
    # A command gets the shipped code on its PYTHONPATH.
    shell = pool_cluster.corral("submit", "--ship", str(tmp_path / "src"), "--wait", "--",
                                "python3", "-c", f"import {name}; print({name}.square(5))")
    assert shell.returncode == 0, shell.stdout + shell.stderr
    assert "25" in shell.stdout


def test_the_shipped_code_is_the_jobs_code_field_not_its_environment(pool_cluster: Cluster, tmp_path: Path) -> None:  # noqa: F811
    import json

    name = unique("fieldtask")
    write_module(tmp_path / "src", name, "import os\n\ndef env():\n    return sorted(k for k in os.environ if k.startswith('CORRAL_C'))\n")
    queued = pool_cluster.corral("call", "--ship", str(tmp_path / "src"), f"{name}:env")
    assert queued.returncode == 0, queued.stderr
    job = int(queued.stdout.strip())
    with Client(home=pool_cluster.home) as c:
        assert c.wait([job], 30) == {job: "done"} and c.values([job]) == [[]]  # nothing in the job's environment
    shown = json.loads(pool_cluster.corral("show", str(job), "--json").stdout)
    digest = bundle_digest([(f"{name}.py", (tmp_path / "src" / f"{name}.py").read_bytes())])
    assert shown["code"] == digest and shown["env"] == {}
    assert f"code      {digest} (shipped)" in pool_cluster.corral("show", str(job)).stdout


def test_shipping_over_the_limits_is_refused_with_one_line(pool_cluster: Cluster, tmp_path: Path) -> None:  # noqa: F811
    big = tmp_path / "big"
    big.mkdir()
    (big / "data.bin").write_bytes(os.urandom(MAX_BUNDLE_UNPACKED + 1024))
    (big / "task.py").write_text("def f():\n    return 1\n")
    done = pool_cluster.corral("call", "--ship", str(big), "task:f")
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "the code to ship" in lines[0] and "the limit" in lines[0], done.stderr
    many = tmp_path / "many"
    many.mkdir()
    for i in range(2001):
        (many / f"m{i}.py").write_text("")
    done = pool_cluster.corral("call", "--ship", str(many), "m1:f")
    assert done.returncode == 1 and "over 2000 files" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def _zip(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return out.getvalue()


def test_the_master_checks_what_it_stores(pool_cluster: Cluster) -> None:  # noqa: F811
    with Client(home=pool_cluster.home) as c:
        store = c._code_store()
        good = {"mod.py": b"x = 1\n"}
        with pytest.raises(BadBundle, match="does not hash"):
            store.put(bundle_digest(list(good.items())), _zip({"mod.py": b"x = 2\n"}))
        for evil in ("../escape.py", "/etc/evil.py", "a/../../b.py", "a\\b.py"):
            files = {evil: b"print('boo')\n"}
            with pytest.raises(BadBundle, match="not a plain relative path"):
                store.put(bundle_digest(list(files.items())), _zip(files))
        with pytest.raises(BadBundle, match="is not a code bundle.s name"):
            store.put("../../authkey", _zip(good))
        with pytest.raises(BadBundle, match="is not a code bundle.s name"):
            store.get("../authkey")
        with pytest.raises(BadBundle, match="at most"):
            store.put(hashlib.sha256(b"").hexdigest(), b"\0" * (8 * 1024 * 1024 + 1))
        with pytest.raises(BadBundle, match="not a readable zip"):
            store.put(hashlib.sha256(b"").hexdigest(), b"not a zip")
        assert store.missing([bundle_digest(list(good.items()))]) == [bundle_digest(list(good.items()))]
        assert c.hello()["protocol"] == PROTOCOL_VERSION  # and the master still serves
    assert not list((pool_cluster.home / "shipped").glob("*escape*"))


def test_the_agent_checks_the_hash_of_what_it_fetches(pool_cluster: Cluster, solo: str, tmp_path: Path) -> None:  # noqa: F811
    name = unique("tampered")
    write_module(tmp_path, name, "def f():\n    return 'genuine'\n")
    module = import_from(tmp_path, name)
    try:
        from corral.console import ship
        from corral.console.callables import describe

        bundle = ship.bundle_for(describe(module.f))
        assert bundle is not None
        with Client(home=pool_cluster.home) as c:
            c.ship(bundle)
            # Someone with the state directory swaps the stored file: the agent must not run it.
            stored = pool_cluster.home / "shipped" / f"{bundle.digest}.zip"
            stored.write_bytes(_zip({f"{name}.py": b"def f():\n    return 'forged'\n"}))
            job = c.submit_call(module.f, tags=[solo])
            assert c.wait([job], 30) == {job: "failed"}
            error = c.job(job)["error"]
        assert "cannot get the job's shipped code" in error and "does not hash to" in error
    finally:
        forget(name)


def test_concurrent_jobs_needing_a_new_bundle_fetch_it_once_per_host(pool_cluster: Cluster, tmp_path: Path) -> None:  # noqa: F811
    name = unique("once")
    # Two agents of their own (one slot each, reached by a tag only they have), so that both are sure to
    # take some of the jobs at once whatever the module's shared agents did before: this test is about
    # two agents of one host wanting the same new bundle together, not about how a burst is spread.
    pair = unique("pair")
    for agent in ("b1", "b2"):
        pool_cluster.start_agent(agent, slots=1, tags=pair)
    write_module(tmp_path, name, "import time\n\ndef slow(x):\n    time.sleep(0.3)\n    return x\n")
    module = import_from(tmp_path, name)
    try:
        with Pool(home=pool_cluster.home, tags=[pair]) as p:
            digest = p._template(module.slow).wire["code"]
            assert p.map(module.slow, range(8), chunksize=1) == list(range(8))
            with pool_cluster.client() as c:
                ran = [j["agent"] for j in c.jobs(limit=8) if j["name"].startswith(p.name + " ")]
        logs = {a: pool_cluster.agent_log(a) for a in ("a1", "a2", "solo", "b1", "b2") if a in pool_cluster.agents}
        assert sorted(set(ran)) == ["b1", "b2"], f"jobs ran on {ran}; agent logs:\n" + "\n".join(
            f"--- {a}\n{text[-3000:]}" for a, text in logs.items() if a in ("b1", "b2"))
        fetched = [m for text in logs.values() for m in FETCHED.findall(text)]
        assert fetched.count(digest[:12]) == 1  # one fetch on this host (the agents share its cache)
        assert (pool_cluster.home / "code-cache" / digest / f"{name}.py").is_file()
    finally:
        forget(name)
        for agent in ("b1", "b2"):
            pool_cluster.agents[agent].terminate()
            assert pool_cluster.agent_exit(agent, 30) == 0


def test_a_job_whose_bundle_is_gone_fails_with_the_reason(pool_cluster: Cluster, solo: str) -> None:  # noqa: F811
    missing = hashlib.sha256(b"never shipped").hexdigest()
    with Client(home=pool_cluster.home) as c:
        job = c.submit([{"func": "nowhere:f", "code": missing, "tags": [solo]}])[0]
        assert c.wait([job], 30) == {job: "failed"}
        assert f"the master holds no code bundle {missing[:12]}" in c.job(job)["error"]
        # A reference that is not a bundle's name is the job spec's fault: refused at submit, by the master too.
        with pytest.raises(BadJobSpec, match="code must name a shipped code bundle"):
            c.submit([{"func": "nowhere:f", "code": "../../etc", "tags": [solo]}])
        with pytest.raises(BadJobSpec, match="code must name a shipped code bundle"):
            c._call("submit", [{"func": "nowhere:f", "code": "../../etc", "tags": [solo]}])
    with Pool(home=pool_cluster.home, tags=[solo]) as p:  # the agent is fine
        assert p.apply(pow, (2, 3)) == 8


def test_a_failed_task_whose_exception_cannot_come_back_is_jobfailed(pool_cluster: Cluster, tmp_path: Path) -> None:  # noqa: F811
    name = unique("oddexc")
    write_module(tmp_path, name, "class Odd(Exception):\n    def __init__(self, a, b):\n        super().__init__(a)\n\n"
                                 "def f():\n    raise Odd(1, 2)\n")
    module = import_from(tmp_path, name)
    try:
        with Pool(home=pool_cluster.home) as p:
            with pytest.raises(JobFailed, match="Odd") as caught:
                p.apply(module.f)
        assert "raise Odd(1, 2)" in caught.value.__cause__.tb
    finally:
        forget(name)


def test_corral_show_json_of_a_failed_callable_has_no_value(pool_cluster: Cluster, tasks: types.ModuleType) -> None:  # noqa: F811
    import json

    with Client(home=pool_cluster.home) as c:
        job = c.submit_call(tasks.raising)
        assert c.wait([job], 30) == {job: "failed"}
    shown = json.loads(pool_cluster.corral("show", str(job), "--json").stdout)
    assert shown["state"] == "failed" and shown["value"] is None and "KeyError" in shown["error"]
