"""A relay and a bare notebook VM (a network namespace with only loopback) for running the bootstrap cell in."""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from relaykernel.common.errors import RELAY, VM
from relaykernel.common.relay_keys import laptop_key_line, relay_sshd_config, tunnel_key_line
from relaykernel.sandbox.keys import SshHost, generate_keypairs, write_lines, write_ssh_config
from relaykernel.sandbox.netns import delete_netns, netns_pids, start_socket_bridge
from relaykernel.sandbox.ports import LOOPBACK, free_loopback_ports
from relaykernel.sandbox.processes import stop_process_tree, wait_gone
from relaykernel.sandbox.sshd import SshdServer
from relaykernel.sandbox.tools import find_tool
from topology import RELAY_USER, VM_USER, _run, ensure_user

PROVISIONER_DIR = Path(__file__).resolve().parent.parent / "provisioner"
VM_PYTHON = "/usr/bin/python3"  # Debian's: the stdlib and ipykernel, no relaykernel installed
RELAY_ALIAS, VM_ALIAS = "cellrelay", "cellvm"


class CellTopology:
    """Relay sshd (TCP on loopback), the VM's netns reaching it only through a unix socket, and the laptop's files.

    Nothing runs in the VM until a test runs the cell there; ``platform_sshd()`` starts an sshd the way a platform
    such as AI Studio already has one, for the non-root variant.
    """

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="rk-cell-"))  # not under pytest's 0700 tmp: sshd reads as the user
        self.netns = f"rkc-{secrets.token_hex(4)}"
        self.relay_port, self.forward_port, self.spare_port = free_loopback_ports(3)
        self._stops: list = []
        self.relay_sshd: SshdServer | None = None
        self.socket_path = self.root / "relay.sock"

    def start(self) -> CellTopology:
        try:
            self._build()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        while self._stops:
            self._stops.pop()()

    def _build(self) -> None:
        for user in (RELAY_USER, VM_USER):
            ensure_user(user)
        self.root.chmod(0o755)
        self._stops.append(lambda: shutil.rmtree(self.root, ignore_errors=True))
        _run(["ip", "netns", "add", self.netns])
        self._stops.append(self._delete_netns)
        _run(["ip", "-n", self.netns, "link", "set", "lo", "up"])
        (self.laptop_key,) = generate_keypairs([self.root / "laptop_key"])
        laptop_line = laptop_key_line(self.laptop_key.public_key, [self.forward_port])
        self.relay_sshd = SshdServer(state_dir=self.root / "relay", port=self.relay_port, hop=RELAY,
                                     authorized_keys={RELAY_USER: [laptop_line]}, extra_config=relay_sshd_config())
        self._stops.append(self.relay_sshd.stop)
        self.relay_sshd.start()
        self._start_bridge()

    def _start_bridge(self) -> None:
        bridge = start_socket_bridge(self.socket_path, self.relay_port, self.root / "socat.log", mode="0666")
        self._stops.append(lambda: stop_process_tree(bridge))

    def authorize_tunnel_key(self, public_key: str, port: int | None = None) -> None:
        """What the user does on the relay once: let the VM's tunnel key listen on its port only."""
        assert self.relay_sshd is not None
        keys_file = self.relay_sshd.state_dir / "authorized_keys" / RELAY_USER
        line = tunnel_key_line(public_key, port or self.forward_port, "vm-tunnel")
        with open(keys_file, "a") as handle:
            handle.write(line + "\n")

    def cell_arguments(self, storage: Path, **overrides: object) -> dict:
        """Arguments for ``relaykernel cell``'s source: this relay, through the VM's only way out."""
        arguments = {
            "platform": "generic", "relay": f"{RELAY_USER}@{LOOPBACK}:{self.relay_port}",
            "remote_port": self.forward_port, "authorized_keys": [self.laptop_key.public_key],
            "storage_dir": str(storage), "heartbeat_seconds": 1.0,
            "ssh_options": [f"ProxyCommand={find_tool('socat')} - UNIX-CONNECT:{self.socket_path}"],
            "laptop_alias": VM_ALIAS,
        }
        arguments.update(overrides)
        return arguments

    def run_cell(self, source: str, *, user: str, log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Run the cell as a notebook process would: its own python, as ``user``, inside the VM's namespace."""
        prefix = ["ip", "netns", "exec", self.netns]
        if user != "root":
            account = pwd.getpwnam(user)
            prefix += ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--init-groups", "--"]
            env = {**env, "HOME": account.pw_dir, "USER": user, "LOGNAME": user}
        env = {**env, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}  # a fresh VM: no relaykernel, no PYTHONPATH
        with open(log, "ab") as output:
            process = subprocess.Popen([*prefix, VM_PYTHON, "-u", "-c", source], env=env, stdin=subprocess.DEVNULL,
                                       stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        self._stops.append(lambda: _stop_cell(process))
        return process

    def platform_sshd(self) -> SshdServer:
        """A root sshd on the VM's 127.0.0.1:22 reading ~/.ssh/authorized_keys, as a platform would run it."""
        sshd = SshdServer(state_dir=self.root / "platform-sshd", authorized_keys="%h/.ssh/authorized_keys",
                          netns=self.netns, listen_port=22, hop=VM, use_pam=True)
        self._stops.append(sshd.stop)
        return sshd.start()

    def laptop_ssh_config(self, vm_user: str, vm_known_hosts: list[str]) -> str:
        """The laptop's ssh config and known_hosts: the relay pinned, the VM as the test says."""
        assert self.relay_sshd is not None
        known_hosts = write_lines(self.root / f"known_hosts_{secrets.token_hex(3)}",
                                  [self.relay_sshd.host_key_line(), *vm_known_hosts])
        key = self.laptop_key.private_file
        hosts = [
            SshHost(RELAY_ALIAS, LOOPBACK, self.relay_port, RELAY_USER, key, known_hosts),
            SshHost(VM_ALIAS, LOOPBACK, self.forward_port, vm_user, key, known_hosts, RELAY_ALIAS),
        ]
        return str(write_ssh_config(self.root / f"ssh_config_{secrets.token_hex(3)}", hosts))

    def netns_pids(self) -> list[int]:
        return netns_pids(self.netns)

    def kill_vm(self) -> None:
        """Every process of the VM gone at once, as when the platform recycles it."""
        pids = self.netns_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_gone(pids, 5.0)

    def _delete_netns(self) -> None:
        delete_netns(self.netns)


def _stop_cell(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)  # what interrupting the cell does
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            stop_process_tree(process)

