"""Whether the laptop's key may listen on a relay: one tcpip-forward request on a connection of its own, bounded."""

from __future__ import annotations

import logging
import threading
from typing import NamedTuple

import paramiko

from ..common.errors import HopError
from ..common.relay_keys import NOWHERE
from .chain import SSHChain

log = logging.getLogger(__name__)

_FIX = (f'add permitlisten="{NOWHERE}" (and command="true") to your key\'s line in the relay\'s authorized_keys, '
        "as docs/relay.md gives it")


class ListenVerdict(NamedTuple):
    """A doctor line's fields: ok, detail, fix, and whether it is a warning."""

    ok: bool
    detail: str
    fix: str
    warn: bool


def probe_relay_listen(chain: SSHChain, index: int) -> ListenVerdict:
    """Ask relay hop ``index`` to listen on its 127.0.0.1 (any port) as this key; a grant is cancelled at once.

    A key that may listen could take over a VM's tunnel port while that VM is away, so a grant is a warning.
    The probe runs on a connection of its own, closed before this returns: nothing it asked for outlives it.
    """
    timeout = chain.policy.channel_timeout_seconds
    probe = SSHChain(chain.hops[: index + 1], chain.policy)  # its last hop is this relay
    try:
        probe.connect()
        granted = _request_listen(probe.vm_transport(), timeout)
    except HopError as error:
        return ListenVerdict(True, f"could not check: {error.problem}", error.fix, True)
    finally:
        probe.close()
    if granted is None:
        return ListenVerdict(True, f"could not check: no answer to a listen request within {timeout:g} s", "", True)
    if granted:
        detail = "your key MAY LISTEN on the relay: it could take over a VM's tunnel port while that VM is away"
        return ListenVerdict(True, detail, _FIX, True)
    return ListenVerdict(True, "refused, as the relay line says (permitlisten)", "", False)


def _request_listen(transport: paramiko.Transport, timeout_seconds: float) -> bool | None:
    """True if granted (and cancelled), False if refused, None without an answer in time."""
    answers: list[bool] = []
    worker = threading.Thread(target=_ask, args=(transport, answers), name="relaykernel-listen-probe", daemon=True)
    worker.start()
    worker.join(timeout_seconds)  # paramiko's global_request has no timeout; closing the transport ends it
    return answers[0] if answers else None


def _ask(transport: paramiko.Transport, answers: list[bool]) -> None:
    try:
        reply = transport.global_request("tcpip-forward", ("127.0.0.1", 0), wait=True)
        if reply is None:
            if transport.is_active():
                answers.append(False)
            return
        port = reply.get_int()
        transport.global_request("cancel-tcpip-forward", ("127.0.0.1", port), wait=False)
        answers.append(True)
    except (paramiko.SSHException, OSError, EOFError) as error:
        log.debug("listen probe on the relay failed: %s", error)
