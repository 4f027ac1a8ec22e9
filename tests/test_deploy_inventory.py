"""The deploy inventory, hosts file, bundle and the `corral hosts` command, without any SSH server."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from corral.console.errors import DeployError
from corral.console.deploy.bundle import AGENT_DIR, build
from corral.console.deploy.inventory import Entry, Inventory, dump_hosts, load_hosts_file
from corral.console.deploy.remote import Launch, remote_dir_expr
from tests.cluster import Cluster


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An ssh directory of the test's own: CORRAL_SSH_CONFIG points there, never at ~/.ssh."""
    ssh = tmp_path / "ssh"
    ssh.mkdir()
    (ssh / "config").write_text("")
    monkeypatch.setenv("CORRAL_SSH_CONFIG", str(ssh / "config"))
    monkeypatch.setenv("CORRAL_KNOWN_HOSTS", str(ssh / "known_hosts"))
    return ssh


def corral(tmp_path: Path, ssh: Path, *args: str) -> subprocess.CompletedProcess:
    cluster = Cluster(tmp_path / "home")
    cluster.env.update(CORRAL_SSH_CONFIG=str(ssh / "config"), CORRAL_KNOWN_HOSTS=str(ssh / "known_hosts"))
    return cluster.corral(*args)


def test_hosts_file_round_trips_through_our_writer_and_tomllib(tmp_path: Path) -> None:
    entries = [
        Entry("web-1.example", {"hostname": "127.0.0.2", "port": 2222, "user": "o'neil \"q\"",
                                "identity": ["/keys/a b\\c"], "slots": 4, "tags": ["gpu", "x:y"],
                                "python": "/opt/pÿthon/bin/python3", "remote_dir": "~/.cache/corral", "direct": True,
                                "proxy_jump": "bastion"}),
        Entry("a", {"hostname": "127.0.0.3"}),
    ]
    text = dump_hosts(entries)
    assert tomllib.loads(text) == {"hosts": {e.alias: e.values for e in entries}}
    path = tmp_path / "hosts.toml"
    path.write_text(text)
    assert sorted((e.alias, e.values) for e in load_hosts_file(path)) == sorted((e.alias, e.values) for e in entries)


@pytest.mark.parametrize("text, message", [
    ("[hosts.a]\nport = 'x'\nhostname = 'h'\n", "host 'a': port must be a whole number"),
    ("[hosts.a]\nhostname = 'h'\ncolour = 'red'\n", "host 'a': colour is not a setting"),
    ("[hosts.'bad alias']\nhostname = 'h'\n", "bad host alias 'bad alias'"),
    ("[hosts.a\n", "is not valid TOML"),
    ("title = 'x'\n", "must hold only [hosts.ALIAS] tables"),
])
def test_a_bad_hosts_file_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "hosts.toml"
    path.write_text(text)
    with pytest.raises(DeployError) as caught:
        load_hosts_file(path)
    assert message in caught.value.message and str(path) in caught.value.message


def test_ssh_config_hosts_are_listed_and_merged_with_corral_entries(tmp_path: Path, env: Path) -> None:
    key = env / "id_test"
    key.write_text("not really a key")
    (env / "config").write_text(
        "Host web1\n  HostName 10.1.2.3\n  Port 2200\n  User deploy\n  IdentityFile ~/keys/web\n\n"
        "Host web2 web3\n  HostName %h.internal\n\n"
        "Host *.example bastion-?\n  User nobody\n\n"
        f"Host *\n  User fallback\n  IdentityFile {key}\n  UserKnownHostsFile /tmp/kh1 /tmp/kh2\n")
    inventory = Inventory(tmp_path / "home")
    assert [h.alias for h in inventory.hosts()] == ["web1", "web2", "web3"], "wildcard patterns are not hosts"
    web1 = inventory.get("web1")
    assert (web1.hostname, web1.port, web1.user, web1.source) == ("10.1.2.3", 2200, "deploy", "ssh_config")
    assert web1.identity[0] == os.path.expanduser("~/keys/web")
    assert web1.known_hosts == ("/tmp/kh1", "/tmp/kh2")
    assert inventory.get("web2").hostname == "web2.internal" and inventory.get("web2").user == "fallback"

    (tmp_path / "home").mkdir()
    inventory.add("web1", {"slots": 8, "tags": "a,b", "remote_dir": "/srv/corral"})
    inventory.add("db", {"hostname": "127.0.0.9", "port": 22})
    web1 = inventory.get("web1")
    assert (web1.hostname, web1.port, web1.slots, web1.tags, web1.remote_dir, web1.source) == \
        ("10.1.2.3", 2200, 8, ("a", "b"), "/srv/corral", "corral+ssh_config")
    db = inventory.get("db")
    assert (db.hostname, db.user, db.identity, db.source) == ("127.0.0.9", "fallback", (str(key),), "corral")
    assert (tmp_path / "home" / "hosts.toml").stat().st_mode & 0o777 == 0o600


def test_corral_hosts_add_list_remove(tmp_path: Path, env: Path) -> None:
    key = env / "id"
    key.write_text("k")
    added = corral(tmp_path, env, "hosts", "add", "h1", "--hostname", "127.0.0.2", "--port", "2222", "--user", "ops",
                   "--identity", str(key), "--slots", "3", "--tags", "red,blue", "--python", "/usr/bin/python3",
                   "--remote-dir", "/tmp/r", "--direct")
    assert added.returncode == 0, added.stderr
    assert added.stdout.startswith("added h1: ops@127.0.0.2:2222")
    listing = corral(tmp_path, env, "hosts")
    header, row = listing.stdout.splitlines()
    assert header.split() == ["ALIAS", "TARGET", "SLOTS", "TAGS", "PYTHON", "REMOTE", "DIR", "MODE", "DEPLOYED", "SOURCE"]
    assert row.split() == ["h1", "ops@127.0.0.2:2222", "3", "blue,red", "/usr/bin/python3", "/tmp/r", "direct", "-", "corral"]
    as_json = corral(tmp_path, env, "hosts", "--json")
    (record,) = json.loads(as_json.stdout)
    assert record["slots"] == 3 and record["tags"] == ["blue", "red"] and record["identity"] == [str(key)]
    removed = corral(tmp_path, env, "hosts", "remove", "h1")
    assert removed.returncode == 0 and removed.stdout == "removed h1\n"
    assert "no hosts" in corral(tmp_path, env, "hosts").stdout


@pytest.mark.parametrize("args, message", [
    (["hosts", "add", "bad alias", "--hostname", "x"], "corral hosts: bad host alias 'bad alias'"),
    (["hosts", "add", "h1"], "corral hosts: host 'h1' needs --hostname"),
    (["hosts", "add", "h1", "--hostname", "x", "--identity", "/nonexistent/key"],
     "corral hosts: host 'h1': the identity file /nonexistent/key does not exist"),
    (["hosts", "add", "h1", "--hostname", "x", "--tags", "a b"], "corral hosts: corral hosts add: host 'h1': tags: bad tag 'a b'"),
    (["hosts", "add", "h1", "--hostname", "x", "--port", "70000"], "corral hosts add: argument --port: must be a port number"),
    (["hosts", "add", "h1", "--hostname", "x", "--slots", "0"], "corral hosts add: argument --slots: must be a whole number"),
    (["hosts", "remove", "ghost"], "corral hosts: unknown host 'ghost'"),
    (["deploy", "h1", "--tags", "a b"], "corral deploy: --tags: bad tag 'a b'"),
    (["stop", "h1", "--timeout", "5"], "corral stop: --timeout only applies with --drain"),
])
def test_bad_input_is_one_line_and_a_non_zero_exit(tmp_path: Path, env: Path, args: list[str], message: str) -> None:
    done = corral(tmp_path, env, *args)
    assert done.returncode != 0
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith(message), done.stderr


def test_adding_an_alias_twice_needs_replace(tmp_path: Path, env: Path) -> None:
    assert corral(tmp_path, env, "hosts", "add", "h1", "--hostname", "127.0.0.2").returncode == 0
    again = corral(tmp_path, env, "hosts", "add", "h1", "--hostname", "127.0.0.3")
    assert again.returncode == 1 and "already in" in again.stderr and "--replace" in again.stderr
    assert corral(tmp_path, env, "hosts", "add", "h1", "--hostname", "127.0.0.3", "--replace").returncode == 0
    assert "127.0.0.3" in corral(tmp_path, env, "hosts").stdout


def test_a_host_from_ssh_config_is_not_removed_by_corral(tmp_path: Path, env: Path) -> None:
    (env / "config").write_text("Host web1\n  HostName 127.0.0.2\n")
    done = corral(tmp_path, env, "hosts", "remove", "web1")
    assert done.returncode == 1
    assert done.stderr == f"corral hosts: host 'web1' comes from {env / 'config'}, which corral does not edit — remove it from that file yourself\n"


def test_removing_a_deployed_host_without_a_master_is_refused_unless_forced(tmp_path: Path, env: Path) -> None:
    assert corral(tmp_path, env, "hosts", "add", "h1", "--hostname", "127.0.0.2").returncode == 0
    (tmp_path / "home" / "deployments.json").write_text('{"h1": {"pid": 12, "mode": "tunnel"}}')
    done = corral(tmp_path, env, "hosts", "remove", "h1")
    assert done.returncode == 1 and "has an agent deployed, and no master is running" in done.stderr
    assert "--force" in done.stderr
    forced = corral(tmp_path, env, "hosts", "remove", "h1", "--force")
    assert forced.returncode == 0 and forced.stdout == "removed h1\n"
    assert json.loads((tmp_path / "home" / "deployments.json").read_text()) == {}


def test_the_bundle_is_named_by_its_content_and_holds_only_the_agent(tmp_path: Path) -> None:
    bundle = build()
    assert build() is bundle
    with zipfile.ZipFile(io.BytesIO(bundle.data)) as z:
        names = sorted(n for n in z.namelist() if not n.endswith("/"))
    assert names == sorted(["__main__.py", "corral/__init__.py"] + [f"corral/agent/{p.name}" for p in AGENT_DIR.glob("*.py")])
    assert bundle.data.startswith(b"#!/usr/bin/env python3\n")
    copy = tmp_path / "agent"
    shutil.copytree(AGENT_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert build(copy).name == bundle.name, "the same sources give the same name"
    (copy / "protocol.py").write_text((copy / "protocol.py").read_text() + "\n# changed\n")
    assert build(copy).name != bundle.name, "changed sources give a new name"


# This Python always; the oldest and newest supported ones too where pyenv has them (no skips: CI forbids them).
PYTHONS = [sys.executable] + [exe for exe in (f"/root/.pyenv/versions/{v}/bin/python3" for v in ("3.8.18", "3.13.0"))
                              if os.path.exists(exe)]


@pytest.mark.parametrize("exe", PYTHONS)
def test_the_bundle_runs_on_old_and_new_pythons(tmp_path: Path, exe: str) -> None:
    path = tmp_path / build().name
    path.write_bytes(build().data)
    done = subprocess.run([exe, str(path), "--authkey-file", str(tmp_path / "none"), "--connect", "127.0.0.1:9"],
                          capture_output=True, text=True, timeout=60, env={"PATH": os.environ["PATH"]})
    assert done.returncode == 2 and done.stderr.startswith("corral agent: no authkey at"), done.stderr
    assert "paramiko" not in done.stderr


def test_launch_reads_back_the_command_line_it_writes() -> None:
    launch = Launch(python="/usr/bin/python3", bundle="agent-0123456789ab.pyz", name="h1", slots=4,
                    tags=("a", "b"), started_by="ssh:tunnel", connect="127.0.0.1:4000")
    argv = launch.argv("/home/x/.cache/corral")
    assert Launch.parse(argv) == launch
    assert launch.same_agent(Launch.parse(argv))
    assert not launch.same_agent(Launch.parse(argv[:1] + ["/d/agent-ffffffffffff.pyz"] + argv[2:]))
    assert Launch.parse(["/usr/bin/python3", "-c", "pass"]) is None


def test_remote_dir_expressions_expand_only_the_home() -> None:
    assert remote_dir_expr("~/.cache/corral") == '"$HOME"/.cache/corral'
    assert remote_dir_expr("~") == '"$HOME"'
    assert remote_dir_expr("/srv/a b") == "'/srv/a b'"
    assert remote_dir_expr("~/$(rm -rf x)") == '"$HOME"/\'$(rm -rf x)\''


def test_the_master_starts_without_importing_paramiko() -> None:
    """The deploy service is registered at import, but SSH is loaded only when something is deployed."""
    code = "import sys, console.master.server; print('paramiko' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr
