"""The relay's authorized_keys lines and sshd settings: what the VM's tunnel key and the laptop's key may do there.

Each key gets exactly what relaykernel uses and nothing else:

- the VM's tunnel key may listen on its own port of the relay's 127.0.0.1 (``ssh -N -R``), and nothing more;
- the laptop's key may open its VMs' ports on the relay's 127.0.0.1 (the jump to each VM's sshd), and nothing more;
- any command either key asks for runs ``true`` instead: the laptop runs ``true`` once per relay connection,
  because stock sshd switches TCP_NODELAY on only after a session has run on a connection.

OpenSSH has no ``permitopen="none"`` or ``permitlisten="none"`` for a key (only sshd_config has ``none``; a key
line holding one is rejected whole), so "nothing" is written as the one target ``none.invalid:1``: ``.invalid``
never resolves (RFC 6761), and with ``GatewayPorts no`` a listen request for it would bind 127.0.0.1:1, which
only root may bind. Unix-socket forwarding ignores both options, so the relay's sshd must turn it off
(``RELAY_SSHD_SETTINGS``).
"""

from __future__ import annotations

from collections.abc import Iterable

LOOPBACK = "127.0.0.1"
FORCED_COMMAND = "true"
NOWHERE = "none.invalid:1"

RELAY_SSHD_SETTINGS = {
    "AllowTcpForwarding": "yes",  # the VM's -R and the laptop's jump both need it
    "AllowStreamLocalForwarding": "no",  # unix-socket forwards ignore permitopen/permitlisten: turn them off
    "GatewayPorts": "no",  # a reverse-forwarded port binds the relay's 127.0.0.1 only
    "ClientAliveInterval": "15",  # drop a dead VM's tunnel (and free its port) within about a minute
    "ClientAliveCountMax": "4",
}


def endpoint(port: int) -> str:
    """A port on the relay's loopback, as permitopen/permitlisten name it."""
    if not 0 < port < 65536:
        raise ValueError(f"relay port {port} is not a TCP port: use 1..65535")
    return f"{LOOPBACK}:{port}"


def tunnel_key_options(port: int) -> str:
    """The VM's tunnel key: listen on 127.0.0.1:port of the relay; open nothing; any command runs true."""
    return f'restrict,port-forwarding,command="{FORCED_COMMAND}",permitlisten="{endpoint(port)}",permitopen="{NOWHERE}"'


def laptop_key_options(ports: Iterable[int]) -> str:
    """The laptop's key: open the VMs' ports on the relay's 127.0.0.1; listen nowhere; any command runs true."""
    opens = ",".join(f'permitopen="{endpoint(port)}"' for port in _distinct(ports))
    if not opens:
        raise ValueError("the laptop's relay line needs at least one VM port")
    return f'restrict,port-forwarding,command="{FORCED_COMMAND}",{opens},permitlisten="{NOWHERE}"'


def tunnel_key_line(public_key: str, port: int, comment: str = "") -> str:
    """One authorized_keys line for a VM's tunnel key (one line, and one port, per VM)."""
    return _line(tunnel_key_options(port), public_key, comment)


def laptop_key_line(public_key: str, ports: Iterable[int], comment: str = "") -> str:
    """One authorized_keys line for the laptop's key, reaching every VM port given (sshd reads a key's first line)."""
    return _line(laptop_key_options(ports), public_key, comment)


def relay_sshd_config() -> list[str]:
    """The sshd_config lines the relay needs (``Keyword value``), in the order docs/relay.md gives them."""
    return [f"{keyword} {value}" for keyword, value in RELAY_SSHD_SETTINGS.items()]


def _line(options: str, public_key: str, comment: str) -> str:
    return " ".join(part for part in (options, public_key.strip(), comment) if part)


def _distinct(ports: Iterable[int]) -> list[int]:
    seen: list[int] = []
    for port in ports:
        if port not in seen:
            seen.append(port)
    return seen
