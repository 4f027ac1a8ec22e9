"""The deploy side's parsers and records, in process: hosts file and ssh config, the agent's command line, the
probe's output, known_hosts, deployments.json, and the errors that cross the wire."""

from __future__ import annotations

import json
import pickle
import tomllib
from pathlib import Path

import pytest

from corral.console.deploy.hostkeys import KnownHosts, host_id
from corral.console.deploy.inventory import Entry, Host, Inventory, dump_hosts, load_hosts_file, parse_tags
from corral.console.deploy.records import Deployment, Deployments
from corral.console.deploy.remote import Launch, choose_python, parse_probe, remote_dir_expr
from corral.console.errors import DeployError, HostKeyChanged, HostKeyUnknown

ED25519 = "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"


@pytest.fixture
def ssh_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An ssh directory of the test's own (never ~/.ssh)."""
    ssh = tmp_path / "ssh"
    ssh.mkdir()
    (ssh / "config").write_text("")
    monkeypatch.setenv("CORRAL_SSH_CONFIG", str(ssh / "config"))
    monkeypatch.setenv("CORRAL_KNOWN_HOSTS", str(ssh / "known_hosts"))
    return ssh


# ---- corral's hosts file ------------------------------------------------------------------------

def test_the_hosts_file_round_trips_every_setting(tmp_path: Path) -> None:
    entries = [Entry("web-1", {"hostname": "h\"ost\\1", "port": 2222, "user": "ops", "identity": ["/k/a b"],
                               "slots": 4, "tags": ["a", "b:c"], "python": "/opt/pÿ/python3",
                               "remote_dir": "~/x", "direct": True, "proxy_jump": "bastion"})]
    text = dump_hosts(entries)
    assert tomllib.loads(text) == {"hosts": {"web-1": entries[0].values}}
    (tmp_path / "hosts.toml").write_text(text)
    assert [(e.alias, e.values) for e in load_hosts_file(tmp_path / "hosts.toml")] == [("web-1", entries[0].values)]


@pytest.mark.parametrize("text, message", [
    ("[hosts.a]\nslots = 0\n", "slots must be a whole number from 1 to 4096"),
    ("[hosts.a]\ndirect = 'yes'\n", "direct must be true or false"),
    ("[hosts.a]\nidentity = []\n", "identity must be a path"),
    ('[hosts.a]\nhostname = "two\\nlines"\n', "must be non-empty text on one line"),
    ("[hosts]\na = 1\n", "host 'a' must be a table of settings"),
])
def test_bad_hosts_file_values_are_one_line_each(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "hosts.toml").write_text(text)
    with pytest.raises(DeployError) as caught:
        load_hosts_file(tmp_path / "hosts.toml")
    assert message in caught.value.message and "\n" not in caught.value.message


def test_tags_are_sorted_deduplicated_and_checked() -> None:
    assert parse_tags("b, a,,b") == ("a", "b")
    with pytest.raises(DeployError, match="bad tag 'a b'"):
        parse_tags(["a b"])


def test_ssh_config_hosts_merge_with_corral_entries(tmp_path: Path, ssh_dir: Path) -> None:
    (ssh_dir / "config").write_text("Host web1\n  HostName 10.0.0.1\n  Port 2200\n  User deploy\n\n"
                                    "Host *\n  User fallback\n")
    inventory = Inventory(tmp_path / "home")
    assert [h.alias for h in inventory.hosts()] == ["web1"]
    (tmp_path / "home").mkdir()
    inventory.add("web1", {"slots": 2})
    inventory.add("db", {"hostname": "10.0.0.2"})
    web1, db = inventory.get("web1"), inventory.get("db")
    assert (web1.target, web1.slots, web1.source) == ("deploy@10.0.0.1:2200", 2, "corral+ssh_config")
    assert (db.target, db.source) == ("fallback@10.0.0.2:22", "corral")
    with pytest.raises(DeployError, match="unknown host 'nope'"):
        inventory.get("nope")


def test_a_host_crosses_the_wire_and_back() -> None:
    host = Host("h", "10.0.0.1", 2222, "ops", ("/k",), 3, ("a",), "/py", "/d", True, "j", ("/kh",), "corral")
    assert Host.from_wire(json.loads(json.dumps(host.to_wire()))) == host


# ---- the agent's command line and the probe ----------------------------------------------------

def test_launch_round_trips_through_its_command_line() -> None:
    launch = Launch(python="/usr/bin/python3", bundle="agent-0123456789ab.pyz", name="h1", slots=None,
                    tags=(), started_by="ssh:direct", connect="10.0.0.9:7000")
    argv = launch.argv("/srv/corral")
    assert argv[:2] == ["/usr/bin/python3", "/srv/corral/agent-0123456789ab.pyz"] and "--slots" not in argv
    assert Launch.parse(argv) == launch
    other = Launch.parse(["/usr/local/bin/python3.12", *argv[1:]])
    assert not launch.same_agent(other) and launch.same_agent(other, ("/usr/local/bin/python3.12",))
    assert Launch.parse([]) is None and Launch.parse(["python3"]) is None


def test_remote_dir_expr_quotes_all_but_the_home() -> None:
    assert remote_dir_expr("~/a b") == "\"$HOME\"/'a b'"
    assert remote_dir_expr("~") == '"$HOME"'
    assert remote_dir_expr("~user/x") == "'~user/x'"
    assert remote_dir_expr("/x;y") == "'/x;y'"


def test_the_probe_output_is_read_into_facts_and_the_python_chosen() -> None:
    found = parse_probe("dir /home/u/.cache/corral\nbundle agent-aaaaaaaaaaaa.pyz\npid 42\n"
                        "argv /usr/bin/python3\x1f/d/agent-aaaaaaaaaaaa.pyz\x1f--name\x1fh\x1f\n"
                        "python /usr/bin/python3 3.6.9 /usr/bin/python3.6\n"
                        "python /usr/local/bin/python3.11 3.11.2 /opt/py/bin/python3.11\nnoise\n")
    assert (found.dir, found.bundles, found.pid) == ("/home/u/.cache/corral", ["agent-aaaaaaaaaaaa.pyz"], 42)
    assert found.argv == ["/usr/bin/python3", "/d/agent-aaaaaaaaaaaa.pyz", "--name", "h"]
    host = Host("h", "10.0.0.1")
    chosen = choose_python(host, found)
    assert (chosen.version, chosen.executable) == ("3.11.2", "/opt/py/bin/python3.11"), "the interpreter past its shim"
    only_old = parse_probe("python /usr/bin/python3 3.6.9 /usr/bin/python3\n")
    with pytest.raises(DeployError, match=r"no Python 3.8 or newer on the host \(/usr/bin/python3 is 3.6.9\)"):
        choose_python(host, only_old)
    with pytest.raises(DeployError, match="no Python on the host"):
        choose_python(host, parse_probe(""))


# ---- known_hosts ------------------------------------------------------------------------------

def test_known_hosts_names_hosts_as_ssh_does_and_accepted_keys_go_to_corrals_file(tmp_path: Path) -> None:
    assert host_id(Host("a", "10.0.0.1")) == "10.0.0.1"
    assert host_id(Host("a", "10.0.0.1", 2222)) == "[10.0.0.1]:2222"
    user = tmp_path / "user_known_hosts"
    user.write_text(f"[10.0.0.1]:2222 ssh-ed25519 {ED25519}\n")
    known = KnownHosts(tmp_path / "corral" / "known_hosts", [user])
    assert known.holder(Host("a", "10.0.0.1", 2222)) == str(user)
    assert known.holder(Host("b", "10.0.0.2")) == str(known.corral_file), "an unknown host: where it would go"
    known.add("10.0.0.2", "ssh-ed25519", ED25519)
    known.add("10.0.0.2", "ssh-ed25519", ED25519)
    assert known.corral_file.read_text() == f"10.0.0.2 ssh-ed25519 {ED25519}\n"
    assert known.corral_file.stat().st_mode & 0o777 == 0o600
    assert known.holder(Host("b", "10.0.0.2")) == str(known.corral_file)
    assert user.read_text().count("\n") == 1, "the user's file is only read"


# ---- deployments.json and the errors -----------------------------------------------------------

def test_deployments_are_written_atomically_and_read_back(tmp_path: Path) -> None:
    records = Deployments(tmp_path)
    assert records.all() == {}
    record = Deployment(host={"alias": "h1"}, mode="tunnel", remote_port=4000, pid=7, dir="/d", python="/py")
    records.put("h1", record)
    records.put("h2", Deployment(pid=8))
    assert records.get("h1") == record and set(records.all()) == {"h1", "h2"}
    assert records.path.stat().st_mode & 0o777 == 0o600
    records.mark_stopped("h1", 123.0)
    stopped = records.get("h1")
    assert stopped is not None and (stopped.stopped, stopped.pid, stopped.remote_port, stopped.dir) == (123.0, 0, None, "/d")
    records.drop("h2")
    assert set(json.loads(records.path.read_text())) == {"h1"}
    assert not list(tmp_path.glob("*.tmp")), "no temporary file is left behind"


def test_partial_unknown_and_broken_records_are_tolerated(tmp_path: Path) -> None:
    records = Deployments(tmp_path)
    records.path.write_text('{"h1": {"pid": 12, "mode": "tunnel", "future": 1}, "h2": "garbage"}')
    assert records.all() == {"h1": Deployment(pid=12, mode="tunnel")}
    records.path.write_text("{not json")
    assert records.all() == {}


def test_deploy_errors_cross_the_wire_with_their_fields() -> None:
    unknown = HostKeyUnknown.at("h1", "hostkey", "unknown host key", "accept it", host_id="[10.0.0.1]:2222",
                                key_type="ssh-ed25519", key_base64=ED25519, fingerprint="SHA256:x")
    for error in (unknown, DeployError.at("h1", "ready", "never ready", "see its log", log_tail="boom\n"),
                  HostKeyChanged.at("h1", "hostkey", "changed")):
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error) and vars(again) == vars(error) and str(again) == str(error)
    assert str(unknown) == "h1: hostkey: unknown host key (accept it)"
    assert unknown.host == "h1" and unknown.step == "hostkey" and unknown.fingerprint == "SHA256:x"
