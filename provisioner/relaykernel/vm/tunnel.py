"""The VM's reverse tunnel to the relay (``ssh -N -R``), restarted with capped backoff and reporting its state."""

from __future__ import annotations

import re
import subprocess
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ..common.destination import Destination
from .private import open_private_log
from .sshd import LOOPBACK

UP, STARTING, DOWN, REFUSED, STOPPED = "up", "starting", "down", "refused", "stopped"
_FORWARD_OK = re.compile(r"remote forward success for: listen (\S+)")
_FORWARD_REFUSED = re.compile(r"remote port forwarding failed for listen port (\d+)")
_FAILURE = re.compile(r"denied|refused|failed|error|could not|closed|timed out|verification|no route|not known",
                      re.IGNORECASE)
_FIRST_RETRY_SECONDS = 1.0
SETUP_BACKOFF_SECONDS = 4.0  # the cap before the first success: someone is setting the relay up right now
SETUP_SPELL_SECONDS = 600.0  # ... for this long after the start; then the full backoff
_STOP_SECONDS = 10.0


def next_delay(delay: float, *, ever_up: bool, running_seconds: float, max_backoff_seconds: float) -> float:
    """The wait before the next ssh: doubling, capped. Before the first success the user is most likely adding the
    printed key to the relay, so for a while the cap is a few seconds: the tunnel comes up soon after that."""
    setting_up = not ever_up and running_seconds < SETUP_SPELL_SECONDS
    return min(delay * 2, min(SETUP_BACKOFF_SECONDS, max_backoff_seconds) if setting_up else max_backoff_seconds)


@dataclass(frozen=True)
class TunnelState:
    """What the heartbeat cell shows: up/starting/down/refused/stopped, since when, why, and restart count."""

    status: str
    since: float
    detail: str = ""
    restarts: int = 0


class TunnelSupervisor:
    """A stoppable thread that keeps ``ssh -N -R 127.0.0.1:PORT:127.0.0.1:SSHD relay`` running."""

    def __init__(self, *, relay: str, remote_port: int, sshd_port: int, identity_file: Path,
                 known_hosts_file: Path, log_file: Path, ssh_options: Sequence[str] = (),
                 keepalive_seconds: int = 15, max_backoff_seconds: float = 30.0) -> None:
        self.relay = relay
        self.remote_port = remote_port
        self.sshd_port = sshd_port
        self.identity_file = identity_file
        self.known_hosts_file = known_hosts_file
        self.log_file = log_file
        self.ssh_options = list(ssh_options)
        self.keepalive_seconds = keepalive_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self._state = TunnelState(STARTING, time.time())
        self._lock = threading.Lock()
        self._process_lock = threading.Lock()  # stop() and a new ssh never cross: one sees the other
        self._stopping = threading.Event()
        self._process: subprocess.Popen[str] | None = None
        self._thread = threading.Thread(target=self._run, name="relaykernel-vm-tunnel", daemon=True)

    @property
    def state(self) -> TunnelState:
        with self._lock:
            return self._state

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def argv(self) -> list[str]:
        """ssh with every option on the command line: the user's ssh config plays no part on the VM."""
        relay = Destination.parse(self.relay)
        target = f"{relay.user}@{relay.host}" if relay.user else relay.host
        options = [
            "ExitOnForwardFailure=yes", f"ServerAliveInterval={self.keepalive_seconds}", "ServerAliveCountMax=3",
            "StrictHostKeyChecking=accept-new", f"UserKnownHostsFile={self.known_hosts_file}", "BatchMode=yes",
            "IdentitiesOnly=yes", "ConnectTimeout=15", *self.ssh_options,
        ]
        forward = f"{LOOPBACK}:{self.remote_port}:{LOOPBACK}:{self.sshd_port}"
        argv = ["ssh", "-v", "-N", "-T", "-F", "/dev/null", "-i", str(self.identity_file), "-R", forward]
        argv += [part for option in options for part in ("-o", option)]
        return argv + (["-p", str(relay.port)] if relay.port else []) + [target]

    def start(self) -> TunnelSupervisor:
        self._thread.start()
        return self

    def stop(self) -> None:
        """End the tunnel and the thread; safe to call twice."""
        self._stopping.set()
        with self._process_lock:
            process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
        if self._thread.is_alive():
            self._thread.join(_STOP_SECONDS)
        if self._thread.is_alive() and process is not None:  # ssh ignored SIGTERM
            process.kill()
            self._thread.join(_STOP_SECONDS)
        self._set(STOPPED, "stopped on request")

    def wait_until_up(self, timeout_seconds: float, *, or_failed: bool = False) -> bool:
        """True once the forward is up; with ``or_failed``, also stop waiting when an attempt failed (the relay does
        not know the key yet: the user needs to be told that now, not after the timeout)."""
        deadline = time.monotonic() + timeout_seconds
        settled = (UP, DOWN, REFUSED) if or_failed else (UP,)
        while self.state.status not in settled and time.monotonic() < deadline and not self._stopping.is_set():
            time.sleep(0.05)
        return self.state.status == UP

    def _run(self) -> None:
        delay, restarts, started, ever_up = _FIRST_RETRY_SECONDS, 0, time.monotonic(), False
        while not self._stopping.is_set():
            if self._guarded_run_once(restarts):  # it was up: a cut link comes back at once, not after the last backoff
                delay, ever_up = _FIRST_RETRY_SECONDS, True
            if self._stopping.wait(delay):
                return
            delay = next_delay(delay, ever_up=ever_up, running_seconds=time.monotonic() - started,
                               max_backoff_seconds=self.max_backoff_seconds)
            restarts += 1

    def _guarded_run_once(self, restarts: int) -> bool:
        """One ssh run; an unexpected failure is logged with its traceback and the loop goes on."""
        try:
            return self._run_once(restarts)
        except Exception as error:  # the thread's one guard: a dead loop would leave the VM unreachable
            with open_private_log(self.log_file) as log:
                log.write("relaykernel tunnel: unexpected error, retrying\n" + traceback.format_exc())
            self._set(DOWN, f"unexpected error: {error!r}; retrying", restarts)
            return False

    def _run_once(self, restarts: int) -> bool:
        """One ssh from start to exit; True if its forward came up."""
        self._set(STARTING, f"connecting to {self.relay}", restarts)
        was_up = False
        with open_private_log(self.log_file) as log:
            with self._process_lock:
                if self._stopping.is_set():
                    return False
                process = self._process = subprocess.Popen(
                    self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                    text=True, start_new_session=True,  # a notebook interrupt (SIGINT to the group) must not cut it
                )
            assert process.stderr is not None
            last_error = ""
            for line in process.stderr:
                log.write(line)
                log.flush()
                last_error = self._observe(line.strip(), restarts) or last_error
                was_up = was_up or self.state.status == UP
            try:
                code = process.wait(_STOP_SECONDS)  # stderr closed: ssh is exiting
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait(_STOP_SECONDS)
        if self.state.status != REFUSED:
            self._set(DOWN, f"ssh exited ({code}){': ' + last_error if last_error else ''}", restarts)
        return was_up

    def _observe(self, line: str, restarts: int) -> str:
        """Update the state from one line of ssh's log; the line if it reads like a failure."""
        if _FORWARD_OK.search(line):
            self._set(UP, f"relay listens on {LOOPBACK}:{self.remote_port}", restarts)
        elif match := _FORWARD_REFUSED.search(line):
            self._set(REFUSED, f"the relay refused to listen on {LOOPBACK}:{match.group(1)}: the port is taken "
                      "(an old tunnel the relay has not dropped yet, or another VM) or this key may not "
                      "listen there (permitlisten); retrying", restarts)
        return line if _FAILURE.search(line) and not line.startswith("debug") else ""

    def _set(self, status: str, detail: str, restarts: int | None = None) -> None:
        with self._lock:
            count = self._state.restarts if restarts is None else restarts
            if status == self._state.status:
                self._state = replace(self._state, detail=detail, restarts=count)
            else:
                self._state = TunnelState(status, time.time(), detail, count)
