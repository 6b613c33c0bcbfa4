"""Resolve each hop of the path from ssh config, the way OpenSSH would."""

from __future__ import annotations

import getpass
import glob
import os
import re
import shlex
import shutil
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import paramiko

from ..common.destination import Destination
from ..common.errors import ConfigError

OPENSSH_TIMEOUT_SECONDS = 5.0
Dump = dict[str, list[str]]  # what `ssh -G` prints: lowercase keyword -> its values in order

_DEFAULT_IDENTITIES = (
    "id_rsa", "id_ecdsa", "id_ecdsa_sk", "id_ed25519", "id_ed25519_sk", "id_xmss", "id_dsa",
)
_DEFAULT_USER_KNOWN_HOSTS = "~/.ssh/known_hosts ~/.ssh/known_hosts2"
_DEFAULT_GLOBAL_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts /etc/ssh/ssh_known_hosts2"
_MAX_INCLUDE_DEPTH = 16
_SETTING = re.compile(r"^\s*(\w+)(?:\s*=\s*|\s+)(.*?)\s*$")
_TIME_PART = re.compile(r"(\d+)([smhdw]?)", re.IGNORECASE)
_TIME_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# Stand-ins that keep paramiko from expanding tokens its own (partial) way; we expand them like OpenSSH.
_PERCENT, _TILDE, _CARRIED = "\ue000", "\ue001", "\ue002"


@dataclass(frozen=True)
class HopSettings:
    """Everything needed to reach one hop, resolved from ssh config."""

    alias: str
    hostname: str
    port: int
    user: str
    identity_files: tuple[str, ...]
    identities_only: bool
    proxy_jump: str | None
    proxy_command: str | None
    host_key_alias: str | None
    known_hosts_files: tuple[str, ...]
    server_alive_interval_seconds: float
    server_alive_count_max: int
    connect_timeout_seconds: float | None
    known_hosts_name: str

    @property
    def where(self) -> str:
        """A label for messages, e.g. ``relay (me@127.0.0.1:2222)``."""
        address = f"{self.user}@{self.hostname}:{self.port}"
        return address if self.alias == self.hostname else f"{self.alias} ({address})"


@dataclass(frozen=True)
class _Login:
    name: str
    home: str


def _login() -> _Login:
    """The local account as OpenSSH sees it: its passwd entry, not $HOME."""
    try:
        import pwd  # noqa: PLC0415 - POSIX only: the laptop side must import on Windows too

        entry = pwd.getpwuid(os.getuid())
    except (ImportError, KeyError):
        return _Login(getpass.getuser(), os.path.expanduser("~"))
    return _Login(entry.pw_name, entry.pw_dir)


def user_config_path() -> str:
    """``~/.ssh/config`` of the login user, where OpenSSH looks for it."""
    return os.path.join(_login().home, ".ssh", "config")


class SSHConfigResolver:
    """Resolves hops with ``ssh -G`` when OpenSSH is installed, else with paramiko plus Include support."""

    def __init__(self, config_file: str | None = None, *, use_openssh: bool = True) -> None:
        self.config_file = _pick_config_file(config_file)
        ssh = shutil.which("ssh") if use_openssh else None
        self.backend = "openssh" if ssh else "paramiko"
        self._dump: Callable[[Destination], Dump] = (
            _OpenSSHDumper(ssh, self.config_file) if ssh else _ParamikoDumper(self.config_file)
        )

    def resolve(self, dest: Destination) -> HopSettings:
        """One hop's settings; an explicit user or port in ``dest`` overrides the config."""
        return _settings_from_dump(dest.host, self._dump(dest), _login())

    def hops(self, target: str | Destination, jump: str | None = None) -> list[HopSettings]:
        """The whole path, first hop first, ``target`` last; ``jump`` (a ``-J`` value) overrides ProxyJump."""
        dest = Destination.parse(target) if isinstance(target, str) else target
        return self._path_to(dest, jump.strip() if jump and jump.strip() else None, ())

    def _path_to(
        self, dest: Destination, jump: str | None, visiting: tuple[Destination, ...]
    ) -> list[HopSettings]:
        if dest in visiting:
            raise ConfigError(_loop_message((*visiting, dest)))
        settings = self.resolve(dest)
        if jump is not None:
            settings = replace(settings, proxy_jump=_unless_none(jump), proxy_command=None)
        chain = [part.strip() for part in (settings.proxy_jump or "").split(",") if part.strip()]
        if not chain:
            return [settings]
        # As OpenSSH: only the first jump follows its own ProxyJump; later ones are reached through the chain.
        path = self._path_to(Destination.parse(chain[0]), None, (*visiting, dest))
        for index, spec in enumerate(chain[1:], start=1):
            middle = self.resolve(Destination.parse(spec))
            path.append(replace(middle, proxy_jump=",".join(chain[:index]), proxy_command=None))
        return [*path, settings]


def _pick_config_file(config_file: str | None) -> str | None:
    if config_file is None:
        default = user_config_path()
        return default if os.path.isfile(default) else None
    path = os.path.expanduser(config_file)
    if not os.path.isfile(path):
        msg = f"SSH config file {path} does not exist: fix the path, or leave it unset for ~/.ssh/config"
        raise ConfigError(msg)
    return path


def _loop_message(loop: tuple[Destination, ...]) -> str:
    names = " -> ".join(str(dest) for dest in loop)
    return (
        f"ProxyJump loop in ssh config: {names}. Give the jump host `ProxyJump none`, or exclude it from "
        "wildcard blocks (e.g. `Host * !relay`)"
    )


class _OpenSSHDumper:
    """OpenSSH's own resolution, Include and Match included, from ``ssh -G``."""

    def __init__(self, ssh: str, config_file: str | None) -> None:
        self._ssh = ssh
        self._config_file = config_file or os.devnull

    def __call__(self, dest: Destination) -> Dump:
        argv = [self._ssh, "-G", "-T", "-F", self._config_file]
        argv += ["-l", dest.user] if dest.user else []
        argv += ["-p", str(dest.port)] if dest.port else []
        done = self._run([*argv, "--", dest.host], dest)
        if done.returncode != 0:
            detail = done.stderr.strip() or f"exit status {done.returncode}"
            msg = f"ssh -G could not resolve {dest} with {self._config_file}: {detail}; fix that config"
            raise ConfigError(msg)
        return _parse_dump(done.stdout)

    def _run(self, argv: list[str], dest: Destination) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                timeout=OPENSSH_TIMEOUT_SECONDS, check=False,
            )
        except subprocess.TimeoutExpired:
            raise ConfigError(
                f"ssh -G took over {OPENSSH_TIMEOUT_SECONDS:g} s resolving {dest} with {self._config_file}: "
                "check its Match exec commands"
            ) from None
        except OSError as error:
            raise ConfigError(f"cannot run {self._ssh} to read ssh config: {error.strerror}") from None


def _parse_dump(text: str) -> Dump:
    dump: Dump = {}
    for line in text.splitlines():
        keyword, _, value = line.strip().partition(" ")
        if keyword:
            dump.setdefault(keyword.lower(), []).append(value.strip())
    return dump


class _ParamikoDumper:
    """Emulates ``ssh -G`` with paramiko, expanding the Include directives paramiko ignores."""

    def __init__(self, config_file: str | None) -> None:
        self._source = config_file or "an empty ssh config"
        text = "\n".join(_flatten(config_file, _login().home, 0)) if config_file else ""
        try:
            self._config = paramiko.SSHConfig.from_text(text)
        except paramiko.ssh_exception.ConfigParseError as error:
            raise ConfigError(f"cannot parse {self._source}: {error}; fix that line") from None

    def __call__(self, dest: Destination) -> Dump:
        try:
            found = self._config.lookup(dest.host)
        except (paramiko.ssh_exception.CouldNotCanonicalize, ImportError) as error:
            raise ConfigError(f"cannot resolve {dest} with {self._source}: {error}") from None
        return _emulated_dump(dest, {key: _unprotect(value) for key, value in found.items()}, self._source)


def _flatten(path: str, home: str, depth: int) -> list[str]:
    """The config with every Include inlined, and values protected from paramiko's token expansion."""
    if depth > _MAX_INCLUDE_DEPTH:
        msg = f"ssh config Includes nest deeper than {_MAX_INCLUDE_DEPTH} at {path}: remove the loop"
        raise ConfigError(msg)
    lines: list[str] = []
    header = "Host *"
    for line in _read_config_lines(path):
        match = _SETTING.match(line)
        keyword = match[1].lower() if match else ""
        if match and keyword == "include":
            # Re-open the enclosing block: Host lines inside the included file must not swallow ours.
            lines += [*_included(match[2], home, depth), header]
            continue
        header = line if keyword in ("host", "match") else header
        lines.append(_protected(line))
    return lines


def _read_config_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as stream:
            return stream.read().splitlines()
    except OSError as error:
        raise ConfigError(f"cannot read ssh config {path}: {error.strerror}") from None


def _included(value: str, home: str, depth: int) -> list[str]:
    lines: list[str] = []
    for pattern in _split_words(value, "Include"):
        expanded = _expand_tilde(pattern, home)
        if not os.path.isabs(expanded):
            expanded = os.path.join(home, ".ssh", expanded)
        for path in sorted(glob.glob(expanded)):
            lines += _flatten(path, home, depth + 1) if os.path.isfile(path) else []
    return lines


def _protected(line: str) -> str:
    match = _SETTING.match(line)
    if not match or match[1].lower() in ("host", "match"):
        return line
    value = match[2].replace("%", _PERCENT).replace("~", _TILDE)
    if match[1].lower() in ("proxyjump", "proxycommand"):
        # paramiko keeps one value per keyword, losing which of the two came first; IdentityFile keeps order.
        return f"IdentityFile {_CARRIED}{match[1].lower()} {value}"
    return f"{match[1]} {value}"


def _unprotect(value: object) -> object:
    if isinstance(value, list):
        return [_unprotect(item) for item in value]
    if isinstance(value, str):
        return value.replace(_PERCENT, "%").replace(_TILDE, "~")
    return value


def _emulated_dump(dest: Destination, found: dict[str, Any], source: str) -> Dump:
    identities, jump, command = _split_carried(found.get("identityfile", []))
    alive = _seconds(found.get("serveraliveinterval", "0"), "ServerAliveInterval", source)
    timeout = found.get("connecttimeout")
    dump: Dump = {
        "user": [dest.user or found.get("user") or _login().name],
        "hostname": [_expand_tokens(found["hostname"], {"%": "%", "h": dest.host}).lower()],
        "port": [str(dest.port or _port(found.get("port", "22"), dest.host, source))],
        "identityfile": identities or [f"~/.ssh/{name}" for name in _DEFAULT_IDENTITIES],
        "identitiesonly": [found.get("identitiesonly", "no")],
        "userknownhostsfile": [found.get("userknownhostsfile", _DEFAULT_USER_KNOWN_HOSTS)],
        "globalknownhostsfile": [found.get("globalknownhostsfile", _DEFAULT_GLOBAL_KNOWN_HOSTS)],
        "serveraliveinterval": [str(alive)],
        "serveralivecountmax": [found.get("serveralivecountmax", "3")],
        "connecttimeout": [str(_seconds(timeout, "ConnectTimeout", source)) if timeout else "none"],
    }
    optional = {"proxyjump": jump, "proxycommand": command, "hostkeyalias": found.get("hostkeyalias")}
    return dump | {key: [value] for key, value in optional.items() if value}


def _split_carried(values: list[str]) -> tuple[list[str], str | None, str | None]:
    """Separate real IdentityFile values from the ProxyJump/ProxyCommand lines carried among them."""
    identities = [value for value in values if not value.startswith(_CARRIED)]
    carried = [value[1:].partition(" ") for value in values if value.startswith(_CARRIED)]
    jump, command = _proxy_precedence([(keyword, text) for keyword, _, text in carried])
    return identities, jump, command


def _proxy_precedence(lines: list[tuple[str, str]]) -> tuple[str | None, str | None]:
    """OpenSSH: the first of ProxyJump/ProxyCommand obtained wins; `ProxyJump none` blocks only ProxyJump."""
    jump: str | None = None
    command: str | None = None
    for keyword, value in lines:
        if keyword == "proxycommand":
            command = command or value
        elif value.lower() == "none":
            jump = jump or "none"
        elif jump is None and command is None:
            jump, command = value, "none"
    real_jump = _unless_none(jump)
    return real_jump, None if real_jump else _unless_none(command)


def _settings_from_dump(alias: str, dump: Dump, login: _Login) -> HopSettings:
    user, hostname = _first(dump, "user") or login.name, _first(dump, "hostname") or alias
    port = _port(_first(dump, "port") or "22", alias, "ssh config")
    tokens = _path_tokens(alias, hostname, port, user, login)
    host_key_alias = _first(dump, "hostkeyalias") or None
    identity_files = dict.fromkeys(_expand_path(item, tokens) for item in dump.get("identityfile", []))
    return HopSettings(
        alias=alias, hostname=hostname, port=port, user=user,
        identity_files=tuple(identity_files),
        identities_only=_first(dump, "identitiesonly").lower() in ("yes", "true"),
        proxy_jump=_unless_none(_first(dump, "proxyjump")),
        proxy_command=_proxy_command(_first(dump, "proxycommand"), tokens),
        host_key_alias=host_key_alias,
        known_hosts_files=_known_hosts_files(dump, tokens),
        server_alive_interval_seconds=float(_integer(dump, "serveraliveinterval", 0, alias)),
        server_alive_count_max=_integer(dump, "serveralivecountmax", 3, alias),
        connect_timeout_seconds=_connect_timeout(dump, alias),
        known_hosts_name=host_key_alias or (hostname if port == 22 else f"[{hostname}]:{port}"),
    )


def _first(dump: Dump, keyword: str) -> str:
    return dump.get(keyword, [""])[0]


def _unless_none(value: str | None) -> str | None:
    return None if not value or value.lower() == "none" else value


def _path_tokens(alias: str, hostname: str, port: int, user: str, login: _Login) -> dict[str, str]:
    local = socket.gethostname()
    return {
        "%": "%", "d": login.home, "h": hostname, "i": str(os.getuid()), "L": local.split(".")[0],
        "l": local, "n": alias, "p": str(port), "r": user, "u": login.name,
    }


def _expand_tokens(text: str, tokens: dict[str, str]) -> str:
    return re.sub(r"%(.)", lambda match: tokens.get(match[1], match[0]), text)


def _expand_tilde(path: str, home: str) -> str:
    if path == "~" or path.startswith("~/"):
        return home + path[1:]
    return os.path.expanduser(path)


def _expand_path(path: str, tokens: dict[str, str]) -> str:
    return _expand_tokens(_expand_tilde(path, tokens["d"]), tokens)


def _proxy_command(command: str, tokens: dict[str, str]) -> str | None:
    if not _unless_none(command):
        return None
    return _expand_tokens(command, {key: tokens[key] for key in "%hnpr"})


def _known_hosts_files(dump: Dump, tokens: dict[str, str]) -> tuple[str, ...]:
    files: list[str] = []
    for keyword in ("userknownhostsfile", "globalknownhostsfile"):
        words = _split_words(_first(dump, keyword), keyword)
        files += [_expand_path(word, tokens) for word in words if word.lower() != "none"]
    return tuple(files)


def _split_words(value: str, keyword: str) -> list[str]:
    try:
        return shlex.split(value)
    except ValueError:
        raise ConfigError(f"unbalanced quotes in ssh config {keyword} {value!r}: fix the quoting") from None


def _port(text: str, alias: str, source: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigError(f"bad Port {text!r} for {alias} in {source}: use a number from 1 to 65535")
    return int(text)


def _integer(dump: Dump, keyword: str, default: int, alias: str) -> int:
    text = _first(dump, keyword) or str(default)
    if not text.isdigit():
        raise ConfigError(f"bad {keyword} {text!r} for {alias} in ssh config: use a whole number")
    return int(text)


def _connect_timeout(dump: Dump, alias: str) -> float | None:
    text = _first(dump, "connecttimeout")
    return None if not text or text == "none" else float(_integer(dump, "connecttimeout", 0, alias))


def _seconds(text: str, keyword: str, source: str) -> int:
    """OpenSSH time format: ``90``, ``1m30s``, ``2h``."""
    parts = _TIME_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text.strip():
        raise ConfigError(f"bad {keyword} {text!r} in {source}: use seconds, or a time like 1m30s")
    return sum(int(number) * _TIME_UNITS[unit.lower()] for number, unit in parts)
