"""A host as OpenSSH resolves it: `ssh -G` (ssh's own answer, Match and Include included), the tokens it leaves
unexpanded, the literal Host aliases of the config (following Include), and paramiko's reader where ssh is missing."""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DeployError

log = logging.getLogger(__name__)

SSH_G_TIMEOUT = 15.0  # `Match exec` runs the user's commands: give them time
# What ssh tries when no IdentityFile is set (OpenSSH 9's order); `ssh -G` lists them itself.
DEFAULT_KEY_NAMES = ("id_rsa", "id_ecdsa", "id_ecdsa_sk", "id_ed25519", "id_ed25519_sk", "id_xmss", "id_dsa")
_MULTI = ("identityfile", "certificatefile")  # keys `ssh -G` prints once per value
_warned_fallback = False


def ssh_home() -> str:
    """The home directory ssh means by `~` and %d: the user's passwd entry (not $HOME, as in ssh)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:  # pragma: no cover - a uid without a passwd entry
        return os.path.expanduser("~")


def ssh_binary() -> str | None:
    return shutil.which("ssh")


@dataclass(frozen=True)
class Resolved:
    """The settings corral uses of one host, as ssh would use them (paths and tokens expanded)."""

    hostname: str
    port: int
    user: str
    identity_files: tuple[str, ...] = ()
    default_identities: bool = True  # identity_files are ssh's defaults (none was configured)
    identities_only: bool = False
    identity_agent: str = ""  # "": $SSH_AUTH_SOCK; "none": no agent; else the agent's socket
    proxy_jump: str = ""  # "a,user@b:port": the hops, nearest last
    proxy_command: str = ""  # expanded, as ssh runs it
    user_known_hosts: tuple[str, ...] = ()  # () when the config leaves ssh's default
    global_known_hosts: tuple[str, ...] = ()
    host_key_alias: str = ""
    via: str = "ssh -G"  # or "paramiko" (the fallback)


# ---- tokens --------------------------------------------------------------------------------------

def tokens(original: str, hostname: str, port: int, user: str, proxy_jump: str = "", host_key_alias: str = "") -> dict[str, str]:
    """The %-tokens ssh expands in IdentityFile, UserKnownHostsFile, IdentityAgent and ProxyCommand."""
    local = socket.gethostname()
    me = pwd.getpwuid(os.getuid()).pw_name
    connection = hashlib.sha1(f"{local}{hostname}{port}{user}{proxy_jump}".encode()).hexdigest()
    return {"%": "%", "C": connection, "d": ssh_home(), "h": hostname, "i": str(os.getuid()), "j": proxy_jump,
            "k": host_key_alias or hostname, "L": local.split(".")[0], "l": local, "n": original, "p": str(port),
            "r": user, "u": me}


def expand(text: str, values: dict[str, str], what: str = "") -> str:
    """ssh's percent_expand: every %x replaced, an unknown one an error (as ssh refuses it)."""
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch != "%":
            out.append(ch)
            i += 1
            continue
        key = text[i + 1: i + 2]
        if key not in values:
            raise DeployError(f"unknown token %{key} in {what or text!r}", "see TOKENS in man ssh_config")
        out.append(values[key])
        i += 2
    return "".join(out)


def expand_path(text: str, values: dict[str, str], what: str = "") -> str:
    """A path as ssh opens it: a leading ~ (or ~user) is that home directory, then the tokens."""
    if text.startswith("~"):
        name, _, rest = text[1:].partition("/")
        try:
            home = pwd.getpwnam(name).pw_dir if name else ssh_home()
        except KeyError:
            home = "~" + name
        text = home + ("/" + rest if rest or text.endswith("/") else "")
    return expand(text, values, what)


# ---- ssh -G ---------------------------------------------------------------------------------------

def ssh_g(alias: str, config: Path | None, options: dict[str, str] | None = None) -> dict[str, list[str]]:
    """`ssh -G [-F config] [-o K=V...] alias`: each setting's values (lower-case keys, as ssh prints them)."""
    ssh = ssh_binary()
    assert ssh is not None
    argv = [ssh, "-G"] + (["-F", str(config)] if config is not None else [])
    for key, value in (options or {}).items():
        argv += ["-o", f"{key}={value}"]
    try:
        done = subprocess.run([*argv, alias], capture_output=True, text=True, timeout=SSH_G_TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise DeployError(f"{alias}: `ssh -G` took over {SSH_G_TIMEOUT:g}s (a slow Match exec?)",
                          host=alias, step="inventory") from None
    if done.returncode != 0:
        why = [line for line in done.stderr.splitlines() if line.strip()]
        raise DeployError(f"{alias}: ssh cannot read its config: {why[-1] if why else f'exit {done.returncode}'}",
                          f"fix {config or '~/.ssh/config'} (try `ssh -G {alias}`)", host=alias, step="inventory")
    values: dict[str, list[str]] = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition(" ")
        if key in _MULTI:
            values.setdefault(key, []).append(value)
        else:
            values[key] = [value]
    return values


def _one(values: dict[str, list[str]], key: str, default: str = "") -> str:
    found = values.get(key)
    return found[0] if found else default


def _none(value: str) -> str:
    return "" if value.lower() == "none" else value


def resolve(alias: str, config: Path | None, hostname: str = "", port: int = 0, user: str = "",
            proxy_jump: str = "") -> Resolved:
    """The host `alias` as ssh resolves it; hostname, port, user and proxy_jump (corral's own entry) win, as
    ssh's command-line options would. Falls back to paramiko (with a warning) where ssh is missing."""
    options = {k: str(v) for k, v in (("HostName", hostname), ("Port", port), ("User", user),
                                      ("ProxyJump", proxy_jump)) if v}
    if ssh_binary() is None:
        return _resolve_paramiko(alias, config, options)
    values = ssh_g(alias, config, options)
    real = _one(values, "hostname", alias)
    real_port = int(_one(values, "port", "22"))
    real_user = _one(values, "user")
    jump = _none(_one(values, "proxyjump"))
    key_alias = _none(_one(values, "hostkeyalias"))
    marks = tokens(alias, real, real_port, real_user, jump, key_alias)
    files = values.get("identityfile", [])
    defaults = [f"~/.ssh/{name}" for name in DEFAULT_KEY_NAMES]
    user_files = _one(values, "userknownhostsfile").split()
    default_user = [f"{ssh_home()}/.ssh/known_hosts", f"{ssh_home()}/.ssh/known_hosts2"]
    return Resolved(
        hostname=real, port=real_port, user=real_user,
        identity_files=tuple(expand_path(f, marks, "IdentityFile") for f in files),
        default_identities=files == defaults,
        identities_only=_one(values, "identitiesonly") == "yes",
        identity_agent=_one(values, "identityagent"),  # ssh -G has expanded it
        proxy_jump=jump,
        proxy_command=expand(_none(_one(values, "proxycommand")), marks, "ProxyCommand"),
        user_known_hosts=() if user_files == default_user else tuple(user_files),
        global_known_hosts=tuple(_one(values, "globalknownhostsfile").split()),
        host_key_alias=key_alias,
    )


def _resolve_paramiko(alias: str, config: Path | None, options: dict[str, str]) -> Resolved:
    """Without ssh: paramiko's SSHConfig, which knows no Include nor Match exec, nor every token."""
    global _warned_fallback
    import paramiko

    path = config or Path(ssh_home()) / ".ssh" / "config"
    if not _warned_fallback:
        _warned_fallback = True
        log.warning("corral: `ssh` (openssh-client) is not on PATH: reading %s with paramiko, "
                    "which does not follow Include or Match exec", path)
    try:
        parsed = paramiko.SSHConfig.from_text(_without_include_and_exec(path.read_text()) if path.is_file() else "")
        found = parsed.lookup(alias)
    except Exception as exc:  # paramiko raises several kinds for what it cannot read
        raise DeployError(f"{alias}: cannot read the ssh config {path}: {exc}", "fix the file",
                          host=alias, step="inventory") from None
    hostname = options.get("HostName") or found.get("hostname") or alias
    port = int(options.get("Port") or found.get("port") or 22)
    user = options.get("User") or found.get("user") or pwd.getpwuid(os.getuid()).pw_name
    jump = options.get("ProxyJump") or _none(found.get("proxyjump", ""))
    marks = tokens(alias, hostname, port, user, jump)
    files = found.get("identityfile") or [f"~/.ssh/{name}" for name in DEFAULT_KEY_NAMES]
    known = found.get("userknownhostsfile", "")
    return Resolved(
        hostname=hostname, port=port, user=user,
        identity_files=tuple(expand_path(f, marks, "IdentityFile") for f in files),
        default_identities="identityfile" not in found,
        identities_only=found.get("identitiesonly", "no") == "yes",
        identity_agent=expand_path(found.get("identityagent", ""), marks, "IdentityAgent"),
        proxy_jump=jump,
        proxy_command=expand(_none(found.get("proxycommand", "")), marks, "ProxyCommand") if not jump else "",
        user_known_hosts=tuple(expand_path(p, marks) for p in known.split()),
        global_known_hosts=("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2"),
        host_key_alias=found.get("hostkeyalias", ""),
        via="paramiko",
    )


def _without_include_and_exec(text: str) -> str:
    """The config as paramiko can read it: no comments (paramiko keeps a trailing one in the value), no
    Include lines, no `Match exec` blocks (it would run them through a shell of its own choosing)."""
    out, skipping = [], False
    for line in text.splitlines():
        words = _words(line)
        key = words[0].lower() if words else ""
        if key in ("host", "match"):
            skipping = key == "match" and any(w.lower() == "exec" for w in words[1:])
        if skipping or key == "include" or not words:
            continue
        out.append(" ".join(f'"{w}"' if " " in w else w for w in words))  # trailing comments gone
    return "\n".join(out) + "\n"


# ---- the config's own hosts: a scan of Host lines, following Include ------------------------------

@dataclass
class Scan:
    """What the config files name: literal Host aliases, and every Host line's patterns."""

    aliases: list[str] = field(default_factory=list)
    patterns: list[list[str]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def matches(self, name: str) -> bool:
        """Whether a Host line other than a bare `*` matches this name (negations honoured, as ssh does)."""
        for line in self.patterns:
            if all(p.lstrip("!") == "*" for p in line):
                continue
            if _host_line_matches(line, name):
                return True
        return False


def match_pattern(name: str, pattern: str) -> bool:
    """ssh's match_pattern: `*` any run, `?` any one character, everything else itself (no [classes]), any case."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, name, re.IGNORECASE | re.DOTALL) is not None


def _host_line_matches(patterns: list[str], name: str) -> bool:
    matched = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if match_pattern(name, pattern.lstrip("!")):
            if negated:
                return False
            matched = True
    return matched


def _words(line: str) -> list[str]:
    """A config line's words: `#` starts a comment, quotes group, `=` may join keyword and value."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        words = line.split("#", 1)[0].split()
    if words and "=" in words[0]:
        key, _, value = words[0].partition("=")
        words = [key, *([value] if value else []), *words[1:]]
    elif len(words) > 1 and words[1].startswith("="):
        words = [words[0], *([words[1][1:]] if words[1] != "=" else []), *words[2:]]
    return words


def scan(config: Path, depth: int = 0, found: Scan | None = None) -> Scan:
    """The Host aliases of `config` and of every file it includes (relative paths are in ~/.ssh, as for ssh)."""
    found = found if found is not None else Scan()
    if depth > 16:  # ssh's own limit on nested Include
        return found
    try:
        text = config.read_text(errors="replace")
    except OSError:
        return found
    found.files.append(str(config))
    for line in text.splitlines():
        words = _words(line)
        if not words:
            continue
        key = words[0].lower()
        if key == "host":
            found.patterns.append(words[1:])
            for name in words[1:]:
                if not set(name) & set("*?!") and name not in found.aliases:
                    found.aliases.append(name)
        elif key == "include":
            for pattern in words[1:]:
                path = expand_path(pattern, {"%": "%"}) if pattern.startswith("~") else pattern
                if not os.path.isabs(path):
                    path = os.path.join(ssh_home(), ".ssh", path)
                for included in sorted(glob.glob(path)):
                    scan(Path(included), depth + 1, found)
    return found
