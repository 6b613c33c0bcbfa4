"""Parse OpenSSH destinations (``[user@]host[:port]``, ``ssh://``) and ``-J`` jump chains."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ConfigError

_BRACKETED = re.compile(r"^\[(?P<host>[^\]]+)\](?::(?P<port>\d+))?$")


@dataclass(frozen=True)
class Destination:
    """One hop as the user wrote it; unset parts come from ssh config or defaults."""

    host: str
    user: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> Destination:
        """Parse ``[user@]host[:port]``, ``[user@][host]:port`` or ``ssh://[user@]host[:port]``."""
        raw = text.strip()
        if raw.startswith("ssh://"):
            raw = raw[len("ssh://") :].rstrip("/")
        if not raw:
            raise ConfigError(f"empty SSH destination {text!r}: write it as user@host[:port] or a Host alias")
        user, _, hostport = raw.rpartition("@")
        host, port = _split_host_port(hostport, text)
        if not host or any(c.isspace() for c in raw) or host.startswith("-"):
            raise ConfigError(f"bad SSH destination {text!r}: write it as user@host[:port] or a Host alias")
        return cls(host=host, user=user or None, port=port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and self.port is not None else self.host
        text = f"{self.user}@{host}" if self.user else host
        return f"{text}:{self.port}" if self.port is not None else text


def _split_host_port(hostport: str, original: str) -> tuple[str, int | None]:
    bracketed = _BRACKETED.match(hostport)
    if bracketed:
        port = bracketed.group("port")
        return bracketed.group("host"), _parse_port(port, original) if port else None
    if hostport.count(":") == 1:
        host, _, port = hostport.partition(":")
        return host, _parse_port(port, original)
    return hostport, None


def _parse_port(text: str, original: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigError(f"bad port in SSH destination {original!r}: use a number from 1 to 65535")
    return int(text)


def parse_jump_chain(text: str | None) -> list[Destination]:
    """Parse an OpenSSH ``-J``/ProxyJump value: comma-separated hops, or ``none`` for no jump."""
    if text is None or not text.strip() or text.strip().lower() == "none":
        return []
    return [Destination.parse(part) for part in text.split(",")]
