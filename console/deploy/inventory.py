"""Hosts from the user's ~/.ssh/config (as `ssh -G` resolves them) and corral's TOML hosts file in the state directory."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import DeployError
from . import sshconfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

HOSTS_NAME = "hosts.toml"
KNOWN_HOSTS_NAME = "known_hosts"
DEFAULT_REMOTE_DIR = "~/.cache/corral"
ALIAS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
TAG_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_write_lock = threading.Lock()


# ---- where the user's SSH files are -------------------------------------------------------

def ssh_config_path() -> Path:
    """$CORRAL_SSH_CONFIG, else ~/.ssh/config (ssh's ~: the passwd entry's home)."""
    explicit = os.environ.get("CORRAL_SSH_CONFIG")
    return Path(explicit).expanduser() if explicit else Path(sshconfig.ssh_home()) / ".ssh" / "config"


def user_known_hosts() -> list[Path]:
    """The user's known_hosts files where the config names none: $CORRAL_KNOWN_HOSTS (os.pathsep-separated),
    else ssh's defaults, ~/.ssh/known_hosts and known_hosts2."""
    explicit = os.environ.get("CORRAL_KNOWN_HOSTS")
    if explicit:
        return [Path(p).expanduser() for p in explicit.split(os.pathsep) if p]
    home = Path(sshconfig.ssh_home()) / ".ssh"
    return [home / "known_hosts", home / "known_hosts2"]


# ---- a host ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Host:
    """One deployable host, with every setting resolved (corral's file over ~/.ssh/config over defaults)."""

    alias: str
    hostname: str
    port: int = 22
    user: str = ""
    identity: tuple[str, ...] = ()
    slots: int | None = None  # None: the agent uses the host's CPU count
    tags: tuple[str, ...] = ()
    python: str = ""  # "": find a Python >= 3.8 on the host
    remote_dir: str = DEFAULT_REMOTE_DIR
    direct: bool = False
    proxy_jump: str = ""  # ProxyJump: "a,user@b:port", the hop nearest the host last
    known_hosts: tuple[str, ...] = ()  # UserKnownHostsFile, if the config names one (it replaces ssh's default)
    source: str = "corral"  # "corral", "ssh_config" or "corral+ssh_config"
    proxy_command: str = ""  # ProxyCommand, expanded (used only without a ProxyJump, as ssh does)
    identities_only: bool = False
    identity_agent: str = ""  # IdentityAgent: "" the caller's SSH_AUTH_SOCK, "none", or a socket path
    default_identities: bool = False  # `identity` is ssh's default list (missing ones are skipped silently)
    global_known_hosts: tuple[str, ...] = ()  # GlobalKnownHostsFile
    host_key_alias: str = ""  # HostKeyAlias: the name its key goes by in known_hosts

    @property
    def target(self) -> str:
        return f"{self.user}@{self.hostname}:{self.port}"

    def to_wire(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self)}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Host:
        """The host of to_wire()'s dict (settings it does not know, from another version, are ignored)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in fields}
        return cls(**values)


@dataclass
class Entry:
    """What corral's hosts file says about one alias: only the settings given (None = not set)."""

    alias: str
    values: dict[str, Any] = field(default_factory=dict)


# ---- validation: one clear line for each bad value ------------------------------------------

_FIELDS = ("hostname", "port", "user", "identity", "slots", "tags", "python", "remote_dir", "direct", "proxy_jump")


def check_alias(alias: str) -> str:
    if not isinstance(alias, str) or not ALIAS_RE.match(alias):
        raise DeployError(f"bad host alias {alias!r}",
                          "use letters, digits, '.', '_' and '-' (at most 64), starting with a letter or digit")
    return alias


def parse_tags(text: str | list[Any] | tuple[Any, ...], where: str = "tags") -> tuple[str, ...]:
    items = text.split(",") if isinstance(text, str) else list(text)
    tags = []
    for item in items:
        if not isinstance(item, str):
            raise DeployError(f"{where}: a tag must be text, not {item!r}")
        item = item.strip()
        if not item:
            continue
        if not TAG_RE.match(item):
            raise DeployError(f"{where}: bad tag {item!r}", "use letters, digits, '.', '_', ':' and '-'")
        tags.append(item)
    return tuple(sorted(set(tags)))


def check_values(alias: str, values: dict[str, Any], where: str) -> dict[str, Any]:
    """Validate the settings of one host entry; returns them normalised, or raises DeployError."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        label = f"{where}: host {alias!r}: {key}"
        if key not in _FIELDS:
            raise DeployError(f"{label} is not a setting", f"known settings: {', '.join(_FIELDS)}")
        if key in ("hostname", "user", "python", "remote_dir", "proxy_jump"):
            if not isinstance(value, str) or not value.strip() or any(c in value for c in "\n\r\0"):
                raise DeployError(f"{label} must be non-empty text on one line, not {value!r}")
            out[key] = value.strip()
        elif key == "port":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
                raise DeployError(f"{label} must be a whole number from 1 to 65535, not {value!r}")
            out[key] = value
        elif key == "slots":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 4096:
                raise DeployError(f"{label} must be a whole number from 1 to 4096, not {value!r}")
            out[key] = value
        elif key == "direct":
            if not isinstance(value, bool):
                raise DeployError(f"{label} must be true or false, not {value!r}")
            out[key] = value
        elif key == "identity":
            files = [value] if isinstance(value, str) else value
            if not isinstance(files, list) or not files or not all(isinstance(f, str) and f.strip() for f in files):
                raise DeployError(f"{label} must be a path (or a list of paths), not {value!r}")
            out[key] = [f.strip() for f in files]
        elif key == "tags":
            out[key] = list(parse_tags(value, label))
    return out


# ---- corral's hosts file: read with tomllib, written by a writer of our own -------------------

def _toml_string(text: str) -> str:
    out = ['"']
    for ch in text:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def dump_hosts(entries: list[Entry]) -> str:
    """The hosts file's text: one [hosts."alias"] table per entry, settings in a fixed order."""
    lines = ["# corral's hosts: written by `corral hosts add`; edit freely (TOML).",
             "# Settings: hostname, port, user, identity, slots, tags, python, remote_dir, direct, proxy_jump.", ""]
    for entry in sorted(entries, key=lambda e: e.alias):
        lines.append(f"[hosts.{_toml_string(entry.alias)}]")
        for key in _FIELDS:
            if entry.values.get(key) is not None:
                lines.append(f"{key} = {_toml_value(entry.values[key])}")
        lines.append("")
    return "\n".join(lines)


def load_hosts_file(path: Path) -> list[Entry]:
    """The entries of corral's hosts file ([] if it does not exist), or a DeployError naming what is wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise DeployError(f"cannot read the hosts file {path}: {exc.strerror}", "check its owner and mode") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise DeployError(f"the hosts file {path} is not valid TOML: {exc}", "fix it, or remove it and add the hosts again") from None
    hosts = data.get("hosts", {})
    if not isinstance(hosts, dict) or set(data) - {"hosts"}:
        raise DeployError(f"the hosts file {path} must hold only [hosts.ALIAS] tables", "see `corral hosts add --help`")
    entries = []
    for alias, values in hosts.items():
        try:
            check_alias(alias)
        except DeployError as exc:
            raise DeployError(f"the hosts file {path}: {exc.message}", exc.hint) from None
        if not isinstance(values, dict):
            raise DeployError(f"the hosts file {path}: host {alias!r} must be a table of settings")
        entries.append(Entry(alias, check_values(alias, values, f"the hosts file {path}")))
    return entries


def save_hosts_file(path: Path, entries: list[Entry]) -> None:
    """Write atomically (temporary file, then rename), mode 0600."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(dump_hosts(entries))
    os.replace(tmp, path)


# ---- the inventory ----------------------------------------------------------------------------

class Inventory:
    """Every host corral can deploy to: ~/.ssh/config's named hosts merged with corral's hosts file."""

    def __init__(self, home: Path, config_path: Path | None = None) -> None:
        self.home = Path(home)
        self.hosts_path = self.home / HOSTS_NAME
        self.config_path = config_path or ssh_config_path()
        # ssh reads the user's and the system's config unless told one file (-F): so does corral
        self.explicit_config = self.config_path if config_path or os.environ.get("CORRAL_SSH_CONFIG") else None

    def ssh_config(self) -> sshconfig.Scan:
        """The Host lines of the ssh config and of what it includes (with ssh's defaults, the system's too)."""
        found = sshconfig.scan(self.config_path)
        if self.explicit_config is None:
            sshconfig.scan(Path("/etc/ssh/ssh_config"), found=found)
        return found

    def ssh_aliases(self, config: sshconfig.Scan) -> set[str]:
        """The literal names of `Host` lines (patterns with *, ? or ! are defaults, not hosts)."""
        return {name for name in config.aliases if ALIAS_RE.match(name)}

    def entries(self) -> list[Entry]:
        return load_hosts_file(self.hosts_path)

    def hosts(self) -> list[Host]:
        config = self.ssh_config()
        corral = {e.alias: e for e in self.entries()}
        aliases = sorted(self.ssh_aliases(config) | set(corral))
        return [self._resolve(alias, config, corral.get(alias)) for alias in aliases]

    def get(self, alias: str) -> Host:
        """The host by this name: corral's entry, a Host alias of the config, or a name a Host pattern matches."""
        config = self.ssh_config()
        corral = {e.alias: e for e in self.entries()}
        if alias not in corral and alias not in self.ssh_aliases(config) and not config.matches(alias) \
                and not self._named_by_match(alias):
            raise DeployError(f"unknown host {alias!r}",
                              f"add it with `corral hosts add {alias} --hostname ...`, or to {self.config_path}",
                              host=alias, step="inventory")
        check_alias(alias)
        return self._resolve(alias, config, corral.get(alias))

    def _named_by_match(self, alias: str) -> bool:
        """Whether a Match block (as ssh evaluates it) gives this name a HostName of its own."""
        check_alias(alias)
        return sshconfig.resolve(alias, self.explicit_config).hostname.lower() != alias.lower()

    def hop(self, spec: str, via: str = "") -> Host:
        """A ProxyJump hop, `[user@]host[:port]` (an alias or a name ssh resolves), reached through `via`."""
        user, _, rest = spec.rpartition("@")
        name, port = rest, 0
        if rest.startswith("["):  # [v6 address]:port
            name, _, tail = rest[1:].partition("]")
            port = int(tail[1:]) if tail.startswith(":") and tail[1:].isdigit() else 0
        elif rest.count(":") == 1:
            name, _, digits = rest.partition(":")
            port = int(digits) if digits.isdigit() else 0
        found = sshconfig.resolve(name, self.explicit_config, port=port, user=user, proxy_jump=via)
        return _host_of(name, found, None, "ssh_config")

    def _resolve(self, alias: str, config: sshconfig.Scan, entry: Entry | None) -> Host:
        in_ssh = alias in self.ssh_aliases(config) or config.matches(alias)
        values = dict(entry.values) if entry else {}
        found = sshconfig.resolve(alias, self.explicit_config, hostname=values.get("hostname", ""),
                                  port=values.get("port", 0), user=values.get("user", ""),
                                  proxy_jump=values.get("proxy_jump", ""))
        source = "corral+ssh_config" if entry and in_ssh else ("corral" if entry else "ssh_config")
        return _host_of(alias, found, entry, source)

    def add(self, alias: str, values: dict[str, Any], replace_existing: bool = False) -> Host:
        """Add (or, with replace_existing, replace) an entry of corral's hosts file; returns the resolved host."""
        check_alias(alias)
        values = check_values(alias, {k: v for k, v in values.items() if v is not None}, "corral hosts add")
        for path in values.get("identity", []):
            if not Path(path).expanduser().is_file():
                raise DeployError(f"host {alias!r}: the identity file {path} does not exist",
                                  "give the private key's path (ssh-keygen makes one)")
        config = self.ssh_config()
        if "hostname" not in values and alias not in self.ssh_aliases(config) and not config.matches(alias):
            raise DeployError(f"host {alias!r} needs --hostname", f"it is not in {self.config_path} either")
        with _write_lock:
            entries = self.entries()
            if any(e.alias == alias for e in entries):
                if not replace_existing:
                    raise DeployError(f"host {alias!r} is already in {self.hosts_path}",
                                      f"remove it first (`corral hosts remove {alias}`) or add --replace")
                entries = [e for e in entries if e.alias != alias]
            entries.append(Entry(alias, values))
            self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
            save_hosts_file(self.hosts_path, entries)
        return self._resolve(alias, config, Entry(alias, values))

    def remove(self, alias: str) -> None:
        """Remove an entry of corral's hosts file; a host only in ~/.ssh/config is refused (corral never edits it)."""
        with _write_lock:
            entries = self.entries()
            if not any(e.alias == alias for e in entries):
                if alias in self.ssh_aliases(self.ssh_config()):
                    raise DeployError(f"host {alias!r} comes from {self.config_path}, which corral does not edit",
                                      "remove it from that file yourself")
                raise DeployError(f"unknown host {alias!r}", "list the hosts with `corral hosts`")
            save_hosts_file(self.hosts_path, [e for e in entries if e.alias != alias])


def _host_of(alias: str, found: sshconfig.Resolved, entry: Entry | None, source: str) -> Host:
    """The Host of ssh's resolution, with what corral's entry adds (an identity of its own replaces ssh's)."""
    values = dict(entry.values) if entry else {}
    identity = tuple(os.path.expanduser(p) for p in values["identity"]) if values.get("identity") else found.identity_files
    return Host(
        alias=alias, hostname=found.hostname, port=found.port, user=found.user, identity=identity,
        slots=values.get("slots"), tags=tuple(values.get("tags") or ()), python=values.get("python", ""),
        remote_dir=values.get("remote_dir") or DEFAULT_REMOTE_DIR, direct=bool(values.get("direct", False)),
        proxy_jump=found.proxy_jump, known_hosts=found.user_known_hosts, source=source,
        proxy_command="" if found.proxy_jump else found.proxy_command, identities_only=found.identities_only,
        identity_agent=found.identity_agent, default_identities=found.default_identities and not values.get("identity"),
        global_known_hosts=found.global_known_hosts, host_key_alias=found.host_key_alias,
    )


def with_overrides(host: Host, slots: int | None = None, tags: tuple[str, ...] | None = None,
                   direct: bool | None = None) -> Host:
    """The host as one deploy asks for it: --slots, --tags and --direct win over the inventory."""
    changes: dict[str, Any] = {}
    if slots is not None:
        changes["slots"] = slots
    if tags is not None:
        changes["tags"] = tags
    if direct is not None:
        changes["direct"] = direct
    return replace(host, **changes) if changes else host
