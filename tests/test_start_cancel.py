"""A start that times out or is cancelled at any step leaves nothing: no listener, no thread, no kernel on the VM."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paramiko
import pytest

from helpers import execute, kernel_manager, port_accepts, relay_config, vm_pids, wait_until
from relaykernel.common.errors import OperationTimeout, RelayKernelError
from relaykernel.options import RelayOptions
from relaykernel.relayed import RelayedKernel

SLOW_PYTHON = "sh -c 'sleep 4; exec {python} \"$@\"' {marker}"  # the VM's python after a pause: a slow launch
LEASE_SECONDS = 3.0


def relaykernel_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("relaykernel-")]


def slow_python(topology: Any) -> tuple[str, str]:
    marker = f"rk-slow-{uuid.uuid4().hex[:8]}"  # names the wrapper shell, so the test can see it go
    return SLOW_PYTHON.format(python=topology.vm_python, marker=marker), marker


def nothing_left(topology: Any, ports: dict[str, int], kernel_id: str, marker: str = "") -> None:
    assert wait_until(lambda: not relaykernel_threads(), 10), f"threads left: {relaykernel_threads()}"
    assert not [name for name, port in ports.items() if port and port_accepts(port)], "a local listener was left"
    if marker:  # a launch still on its way to the VM must come to nothing once it gets there
        assert wait_until(lambda: not vm_pids(topology, marker), 15), "the slow launch never ran"
        time.sleep(1.0)
    # Whatever reached the VM ends by its lease at the latest.
    assert wait_until(lambda: not vm_pids(topology, kernel_id), LEASE_SECONDS + 10), "a kernel was left"


def started_step(relayed: RelayedKernel, step: str) -> Callable[[], bool]:
    """True once a start in progress has reached ``step``."""
    checks = {
        "connect": lambda: relayed.link is not None and relayed.chain is not None,
        "launch": lambda: relayed.chain is not None and relayed.chain.is_active(),
        "begin": lambda: relayed.keeper is not None,
    }
    return checks[step]


@pytest.mark.parametrize("step", ["connect", "launch", "begin"])
def test_cancel_at_each_step_of_a_start_leaves_nothing(topology: Any, tmp_path: Path, step: str) -> None:
    python, marker = slow_python(topology) if step == "launch" else (topology.vm_python, "")
    config = relay_config(topology, tmp_path, lease_seconds=LEASE_SECONDS, remote_python=python)
    config.pop("sync_local_dir")
    relayed = RelayedKernel(RelayOptions(**config, sync_local_dir="none"), kernel_id=f"cancel-{step}-{time.time_ns()}")
    outcome: list[BaseException | dict[str, int]] = []

    def start() -> None:
        try:
            outcome.append(relayed.start(key=b"k" * 32, signature_scheme="hmac-sha256",
                                         local_ports=dict.fromkeys(("shell_port", "iopub_port", "stdin_port",
                                                                    "control_port", "hb_port"), 0)))
        except BaseException as error:  # what the start ended with is the test's subject
            outcome.append(error)

    worker = threading.Thread(target=start, name="test-start")
    worker.start()
    assert wait_until(started_step(relayed, step), 30), f"the start never reached {step}"
    ports = dict(relayed.link.local_ports) if relayed.link else {}
    relayed.cancel()
    worker.join(30)
    assert not worker.is_alive(), "the cancelled start did not end"
    if step != "begin":
        assert isinstance(outcome[0], RelayKernelError), f"a cancelled start must fail plainly, not {outcome[0]!r}"
    relayed.close()  # the front closes a start that ended anyway, as the provisioner does
    nothing_left(topology, ports, relayed.kernel_id, marker)


def test_a_start_over_its_time_budget_times_out_and_leaves_nothing(topology: Any, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from relaykernel.provisioner import RelayProvisioner

    monkeypatch.setattr(RelayProvisioner, "_start_timeout_seconds", lambda self: 1.5)
    python, marker = slow_python(topology)
    config = relay_config(topology, tmp_path, lease_seconds=LEASE_SECONDS, remote_python=python)
    km = kernel_manager(tmp_path, config)
    with pytest.raises(OperationTimeout, match="did not finish within"):
        km.start_kernel()
    ports = {name: getattr(km, name) for name in ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")}
    nothing_left(topology, ports, km.kernel_id, marker)


def test_the_keeper_survives_an_unexpected_error_and_still_reconnects(topology_class: Any, tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    sandbox = topology_class()
    sandbox.start()
    try:
        config = relay_config(sandbox.info, tmp_path, liveness_interval_seconds=0.5, link_timeout_seconds=2.0,
                              command_timeout_seconds=5.0, reconnect_max_backoff_seconds=1.0, lease_seconds=60.0)
        km = kernel_manager(tmp_path, config)
        km.start_kernel()
        client = km.client()
        client.start_channels()
        client.wait_for_ready(timeout=30)
        relayed = km.provisioner.relayed
        real_connect, failures = relayed.chain.connect, []

        def flaky_connect(*args: Any, **kwargs: Any) -> None:
            if len(failures) < 2:  # what a flapping link made paramiko raise before (issue 14)
                failures.append(1)
                raise paramiko.SSHException("No existing session")
            real_connect(*args, **kwargs)

        relayed.chain.connect = flaky_connect  # type: ignore[method-assign]
        sandbox.tunnel.stop()
        assert wait_until(lambda: relayed.keeper.is_down, 10)
        sandbox.tunnel.start()
        assert wait_until(lambda: not relayed.keeper.is_down, 30), "the keeper stopped reconnecting"
        assert len(failures) == 2
        assert sum("failed unexpectedly" in r.getMessage() for r in caplog.records) == 2
        out, reply = execute(client, "print(6 * 7)")
        assert (out.strip(), reply["status"]) == ("42", "ok")
        client.stop_channels()
        km.shutdown_kernel()
    finally:
        sandbox.stop()


def test_run_blocking_budget_is_real() -> None:
    """The helper every front uses gives up at its timeout even if the worker never returns."""
    from relaykernel.offload import run_blocking

    release = threading.Event()

    async def main() -> None:
        with pytest.raises(OperationTimeout):
            await run_blocking(release.wait, 30, timeout_seconds=0.2, what="waiting")

    asyncio.run(main())
    release.set()
