"""Hosts from the user's ~/.ssh/config (paramiko.SSHConfig) and corral's TOML hosts file in the state directory."""

from __future__ import annotations

import getpass
import os
import re
import sys
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import paramiko

from ..errors import DeployError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

HOSTS_NAME = "hosts.toml"
KNOWN_HOSTS_NAME = "known_hosts"
DEFAULT_REMOTE_DIR = "~/.cache/corral"
DEFAULT_KEYS = ("id_ed25519", "id_ecdsa", "id_rsa")
ALIAS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
TAG_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_WILDCARDS = set("*?!")
_write_lock = threading.Lock()


# ---- where the user's SSH files are -------------------------------------------------------

def ssh_config_path() -> Path:
    """$CORRAL_SSH_CONFIG, else ~/.ssh/config."""
    explicit = os.environ.get("CORRAL_SSH_CONFIG")
    return Path(explicit).expanduser() if explicit else Path("~/.ssh/config").expanduser()


def ssh_dir() -> Path:
    """The directory holding the user's SSH files: that of the ssh config (tests point it elsewhere)."""
    return ssh_config_path().parent


def user_known_hosts() -> list[Path]:
    """$CORRAL_KNOWN_HOSTS (os.pathsep-separated), else known_hosts beside the ssh config."""
    explicit = os.environ.get("CORRAL_KNOWN_HOSTS")
    if explicit:
        return [Path(p).expanduser() for p in explicit.split(os.pathsep) if p]
    return [ssh_dir() / "known_hosts"]


def default_identities() -> list[str]:
    """The keys ssh would try when nothing names one: id_ed25519, id_ecdsa, id_rsa beside the ssh config."""
    return [str(ssh_dir() / name) for name in DEFAULT_KEYS if (ssh_dir() / name).is_file()]


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
    proxy_jump: str = ""
    known_hosts: tuple[str, ...] = ()  # UserKnownHostsFile from ~/.ssh/config, if it names one
    source: str = "corral"  # "corral", "ssh_config" or "corral+ssh_config"

    @property
    def target(self) -> str:
        return f"{self.user}@{self.hostname}:{self.port}"

    def to_wire(self) -> dict[str, Any]:
        return {
            "alias": self.alias, "hostname": self.hostname, "port": self.port, "user": self.user,
            "identity": list(self.identity), "slots": self.slots, "tags": list(self.tags),
            "python": self.python, "remote_dir": self.remote_dir, "direct": self.direct,
            "proxy_jump": self.proxy_jump, "known_hosts": list(self.known_hosts), "source": self.source,
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> "Host":
        return cls(**{**data, "identity": tuple(data.get("identity") or ()), "tags": tuple(data.get("tags") or ()),
                      "known_hosts": tuple(data.get("known_hosts") or ())})


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
        self.known_hosts_path = self.home / KNOWN_HOSTS_NAME
        self.config_path = config_path or ssh_config_path()

    def ssh_config(self) -> paramiko.SSHConfig:
        try:
            return paramiko.SSHConfig.from_path(str(self.config_path))
        except FileNotFoundError:
            return paramiko.SSHConfig()
        except Exception as exc:  # paramiko raises several kinds for a malformed file
            raise DeployError(f"cannot read the ssh config {self.config_path}: {exc}", "fix the file") from None

    def ssh_aliases(self, config: paramiko.SSHConfig) -> set[str]:
        """The concrete names of `Host` lines (patterns with *, ? or ! are defaults, not hosts)."""
        return {name for name in config.get_hostnames() if not set(name) & _WILDCARDS and ALIAS_RE.match(name)}

    def entries(self) -> list[Entry]:
        return load_hosts_file(self.hosts_path)

    def hosts(self) -> list[Host]:
        config = self.ssh_config()
        corral = {e.alias: e for e in self.entries()}
        aliases = sorted(self.ssh_aliases(config) | set(corral))
        return [self._resolve(alias, config, corral.get(alias)) for alias in aliases]

    def get(self, alias: str) -> Host:
        config = self.ssh_config()
        corral = {e.alias: e for e in self.entries()}
        if alias not in corral and alias not in self.ssh_aliases(config):
            raise DeployError(f"unknown host {alias!r}",
                              f"add it with `corral hosts add {alias} --hostname ...`, or to {self.config_path}",
                              host=alias, step="inventory")
        return self._resolve(alias, config, corral.get(alias))

    def _resolve(self, alias: str, config: paramiko.SSHConfig, entry: Entry | None) -> Host:
        in_ssh = alias in self.ssh_aliases(config)
        try:
            found = config.lookup(alias)
        except Exception as exc:
            raise DeployError(f"{alias}: cannot look it up in {self.config_path}: {exc}", host=alias, step="inventory") from None
        values = dict(entry.values) if entry else {}
        hostname = values.get("hostname") or found.get("hostname") or alias
        try:
            port = int(values.get("port") or found.get("port") or 22)
        except ValueError:
            raise DeployError(f"{alias}: bad Port {found.get('port')!r} in {self.config_path}", host=alias, step="inventory") from None
        identity = values.get("identity") or found.get("identityfile") or []
        known = found.get("userknownhostsfile", "")
        source = "corral+ssh_config" if entry and in_ssh else ("corral" if entry else "ssh_config")
        return Host(
            alias=alias,
            hostname=hostname,
            port=port,
            user=values.get("user") or found.get("user") or getpass.getuser(),
            identity=tuple(os.path.expanduser(p) for p in identity),
            slots=values.get("slots"),
            tags=tuple(values.get("tags") or ()),
            python=values.get("python", ""),
            remote_dir=values.get("remote_dir") or DEFAULT_REMOTE_DIR,
            direct=bool(values.get("direct", False)),
            proxy_jump=values.get("proxy_jump") or found.get("proxyjump", ""),
            known_hosts=tuple(os.path.expanduser(p) for p in known.split()) if known else (),
            source=source,
        )

    def add(self, alias: str, values: dict[str, Any], replace_existing: bool = False) -> Host:
        """Add (or, with replace_existing, replace) an entry of corral's hosts file; returns the resolved host."""
        check_alias(alias)
        values = check_values(alias, {k: v for k, v in values.items() if v is not None}, "corral hosts add")
        for path in values.get("identity", []):
            if not Path(path).expanduser().is_file():
                raise DeployError(f"host {alias!r}: the identity file {path} does not exist",
                                  "give the private key's path (ssh-keygen makes one)")
        config = self.ssh_config()
        if "hostname" not in values and alias not in self.ssh_aliases(config):
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
