"""DetachedProxyCommand: a process group stopped whole, its exit status and stderr in the error, our stderr free."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import wait_until
from relaykernel.pids import pid_alive
from relaykernel.ssh.proxy import DetachedProxyCommand, ProxyCommandExited, proxy_outcome

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the detached ProxyCommand is POSIX only")


def read_to_the_end(proxy: DetachedProxyCommand) -> tuple[bytes, str]:
    """Everything the proxy wrote, and the error that ended reading."""
    proxy.settimeout(10)
    data = b""
    with pytest.raises(ProxyCommandExited) as caught:
        for _ in range(100):
            data += proxy.recv(1024)
    return data, str(caught.value)


def test_a_failing_proxy_says_its_exit_status_and_last_stderr_lines():
    proxy = DetachedProxyCommand("echo hello; for n in 1 2 3 4 5 6 7; do echo line $n >&2; done; exit 5")
    try:
        data, message = read_to_the_end(proxy)
        assert data == b"hello\n"
        assert message == ("ProxyCommand `echo hello; for n in 1 2 3 4 5 6 7; do echo line $n >&2; done; exit 5` "
                           "exited 5: line 3 / line 4 / line 5 / line 6 / line 7")
    finally:
        proxy.close()


def test_what_we_send_reaches_its_stdin_and_its_answer_comes_back():
    proxy = DetachedProxyCommand("head -c 5 | tr a-z A-Z")
    try:
        assert proxy.send(b"hello") == 5
        proxy.settimeout(10)
        assert proxy.recv(16) == b"HELLO"
    finally:
        proxy.close()
    assert proxy.closed


def test_close_stops_the_whole_group_even_a_child_that_ignores_sigterm(tmp_path):
    pids = tmp_path / "pids"
    proxy = DetachedProxyCommand(f"trap '' TERM; sleep 300 & echo $! > {pids}; sleep 300")
    try:
        assert _wait_for(pids)
        child = int(pids.read_text())
        assert pid_alive(child)
    finally:
        proxy.close()
    assert not pid_alive(child) and proxy.closed
    assert proxy.outcome().endswith("was still running, so it was stopped (nothing on stderr)")
    assert proxy_outcome(proxy, RuntimeError()) == f"; {proxy.outcome()}"
    assert proxy_outcome(object(), RuntimeError()) == ""


def test_a_leftover_cannot_hold_the_callers_output(tmp_path):
    """A process that escapes the group keeps the proxy's stderr open, never the stderr of whoever ran us."""
    pid_file = tmp_path / "escaped"
    script = ("from relaykernel.ssh.proxy import DetachedProxyCommand as D; "
              f"p = D('setsid sleep 300 & echo $! > {pid_file}; echo bye >&2'); import time; time.sleep(0.5); "
              f"p.close()")
    try:
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30,
                                check=False)
        assert result.returncode == 0 and result.stderr == "", result
    finally:
        if _wait_for(pid_file):
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)


def _wait_for(path: Path) -> bool:
    return bool(wait_until(lambda: path.exists() and path.read_text().strip(), 5))
