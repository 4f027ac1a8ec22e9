"""A corpus of ssh_config files, resolved by corral and by OpenSSH itself: for every alias, the hostname, user,
port, identity files, proxy route and known-hosts files must be ssh's. `ssh -G` is the oracle, and for the
identity files (which -G prints unexpanded) `ssh -v` with a do-nothing ProxyCommand, which shows the paths
ssh really opens. Nothing leaves the machine, and the machine's ~/.ssh is never read."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from corral.console.deploy import sshconfig
from corral.console.deploy.hostkeys import KnownHosts
from corral.console.deploy.inventory import Inventory

SSH = shutil.which("ssh")
if SSH is None and os.environ.get("CORRAL_REQUIRE_SSHD") == "1":
    raise RuntimeError("ssh (openssh-client) is missing, and CORRAL_REQUIRE_SSHD=1 says these tests must run")
pytestmark = pytest.mark.skipif(SSH is None, reason="ssh (openssh-client) is missing; CI installs it")

# Every alias of the corpus that corral must resolve as ssh does (literal names and pattern-matched ones).
ALIASES = ["web1", "web2", "api.prod", "db.prod", "jumped", "chain", "uri", "nojump", "cmd", "keys", "only",
           "kh", "alias", "exec-host", "matched", "nobody-box", "inc1", "inc2", "commented", "eq", "first",
           "mh", "mh-other"]


def corpus(root: Path) -> Path:
    (root / "conf.d").mkdir(parents=True)
    (root / "conf.d" / "10-inc.conf").write_text("Host inc1\n  HostName 10.9.0.1\n  Port 2201\n")
    (root / "conf.d" / "20-inc.conf").write_text("Host inc2\n  HostName 10.9.0.2\n  User incuser\n")
    (root / "conf.d" / "ignored.txt").write_text("Host never\n  HostName 10.9.9.9\n")
    config = root / "config"
    config.write_text(f"""# a corpus of habits
Include {root}/conf.d/*.conf

Host web1 # the first web server
  HostName 10.0.0.1   # trailing comments are not values
  Port 2200
  User deploy

Host web2
  HostName %h.internal
  IdentityFile {root}/keys/%r@%h:%p-%n-%%-%u-%d
  IdentityFile ~/keys/second

Host *.prod !db.prod
  User produser
  Port 2222

Host db.prod
  HostName 10.0.2.2

Host jumped
  HostName 10.0.3.1
  ProxyJump bastion

Host chain
  HostName 10.0.3.2
  ProxyJump a.example,ops@b.example:2022

Host uri
  ProxyJump ssh://jumper@j.example:2200

Host nojump
  ProxyJump none
  ProxyCommand nc %h %p

Host cmd
  HostName 10.0.4.1
  ProxyCommand {sys.executable} -c "print('%h %p %r %n %%')"

Host keys
  IdentityFile {root}/keys/a
  IdentityFile {root}/keys/b
  IdentityFile {root}/keys/%C

Host only
  IdentityFile {root}/keys/only
  IdentitiesOnly yes
  IdentityAgent none

Host kh
  UserKnownHostsFile ~/kh/one {root}/kh/%h
  GlobalKnownHostsFile {root}/global_kh

Host alias
  HostName 10.0.5.1
  HostKeyAlias build-box

Match exec "test %n = exec-host"
  HostName 10.0.6.1

Match originalhost matched
  HostName 10.0.7.1
  User matcheduser

Host nobody-box
  User nobody
Match user nobody
  Port 2299

Host commented
  HostName "10.0.8.1"
  User "quoted user"

Host eq
  HostName=10.0.9.1
  Port = 2333

Host first
  User firstuser
Host first
  User seconduser
  Port 2444

Host mh-other
  HostName 10.0.10.2
Host mh mh-other
  HostName 10.0.10.1
Match host 10.0.10.*,!10.0.10.2
  Port 2555
  User hostmatched

Match all
  IdentityFile {root}/keys/common
  UserKnownHostsFile {root}/kh/default

Host *
  User fallback
  GlobalKnownHostsFile {root}/global_default
""")
    return config


def ssh_g(config: Path, alias: str) -> dict[str, list[str]]:
    done = subprocess.run([SSH, "-G", "-F", str(config), alias], capture_output=True, text=True, check=True,
                          stdin=subprocess.DEVNULL)
    values: dict[str, list[str]] = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition(" ")
        values.setdefault(key, []).append(value)
    return values


def ssh_identity_files(config: Path, alias: str) -> list[str]:
    """The identity files ssh opens for this alias (its -v lines), certificates aside."""
    done = subprocess.run([SSH, "-v", "-F", str(config), "-o", "BatchMode=yes", "-o", "ProxyCommand=true",
                           "-o", "ProxyJump=none", alias, "true"], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=30)
    files = [line.split("identity file ", 1)[1].rsplit(" type ", 1)[0] for line in done.stderr.splitlines()
             if "debug1: identity file " in line]
    return [f for f in files if not f.endswith("-cert")]


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = corpus(tmp_path / "ssh")
    monkeypatch.setenv("CORRAL_SSH_CONFIG", str(path))
    monkeypatch.delenv("CORRAL_KNOWN_HOSTS", raising=False)  # ssh's own defaults, compared, never read
    return path


@pytest.mark.parametrize("alias", ALIASES)
def test_corral_resolves_every_alias_as_ssh_does(config: Path, tmp_path: Path, alias: str) -> None:
    host = Inventory(tmp_path / "home").get(alias)
    ssh = ssh_g(config, alias)
    assert host.hostname == ssh["hostname"][0]
    assert host.user == ssh["user"][0]
    assert host.port == int(ssh["port"][0])
    assert host.proxy_jump == ssh.get("proxyjump", [""])[0]
    command = ssh.get("proxycommand", [""])[0]
    assert host.proxy_command == ("" if host.proxy_jump else sshconfig.expand(command, sshconfig.tokens(
        alias, host.hostname, host.port, host.user)))
    assert host.identities_only == (ssh["identitiesonly"][0] == "yes")
    assert host.identity_agent == ssh.get("identityagent", [""])[0]
    assert host.host_key_alias == ssh.get("hostkeyalias", [""])[0]
    assert list(host.identity) == ssh_identity_files(config, alias)
    files = KnownHosts(tmp_path / "corral_known_hosts").files(host)[:-1]  # corral's own file is the last
    assert [str(f) for f in files] == ssh["userknownhostsfile"][0].split() + ssh["globalknownhostsfile"][0].split()


def test_corral_hosts_lists_the_literal_aliases_found_through_include(config: Path, tmp_path: Path) -> None:
    names = [h.alias for h in Inventory(tmp_path / "home").hosts()]
    assert "inc1" in names and "inc2" in names and "never" not in names, "Include follows the glob, *.conf only"
    assert "api.prod" not in names and "*.prod" not in names, "patterns are not hosts (but match them)"
    assert {"web1", "alias", "first", "nobody-box"} <= set(names)


def test_names_no_pattern_matches_are_unknown(config: Path, tmp_path: Path) -> None:
    from corral.console.errors import DeployError

    with pytest.raises(DeployError, match="unknown host 'typo'"):
        Inventory(tmp_path / "home").get("typo")  # `Host *` alone does not make every name a host


def test_the_proxy_command_tokens_are_expanded_as_ssh_runs_them(config: Path, tmp_path: Path) -> None:
    host = Inventory(tmp_path / "home").get("cmd")
    assert host.proxy_command == f"""{sys.executable} -c "print('10.0.4.1 22 fallback cmd %')\""""


def test_without_ssh_paramiko_reads_the_config_with_a_one_line_warning(
        config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    bare = tmp_path / "bin"  # a PATH without ssh
    bare.mkdir()
    monkeypatch.setenv("PATH", str(bare))
    monkeypatch.setattr(sshconfig, "_warned_fallback", False)
    with caplog.at_level(logging.WARNING):
        web1 = Inventory(tmp_path / "home").get("web1")
        Inventory(tmp_path / "home").get("db.prod")
    assert (web1.hostname, web1.port, web1.user) == ("10.0.0.1", 2200, "deploy")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"corral: `ssh` (openssh-client) is not on PATH: reading {config} with paramiko, "
                        "which does not follow Include or Match exec"]


def test_the_cli_without_ssh_warns_once_and_lists_the_hosts(config: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bin"
    bare.mkdir()
    env = dict(os.environ, PATH=str(bare), CORRAL_HOME=str(tmp_path / "home"), CORRAL_SSH_CONFIG=str(config),
               PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    done = subprocess.run([sys.executable, "-m", "corral", "hosts"], env=env, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [f"corral: `ssh` (openssh-client) is not on PATH: reading {config} with "
                                        "paramiko, which does not follow Include or Match exec"]
    assert "web1" in done.stdout
