"""The options loader without a VM: config files, kernelspec, flags; bad configuration caught before anything starts.

Runs anywhere (the macOS and Windows CI runs it): no SSH, no topology.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.provisioning import KernelProvisionerFactory

from relaykernel.common.errors import ConfigError
from relaykernel.kernelspec import build_kernel_json
from relaykernel.loader import jupyter_config, load_options
from relaykernel.options import RelayOptions

NOWHERE = "root@127.0.0.1:1"  # nothing listens there: any remote work would fail with a connect error instead


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A JUPYTER_CONFIG_DIR of the test's own (the user's config never leaks in)."""
    directory = tmp_path / "jupyter-config"
    directory.mkdir()
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(directory))
    return directory


def relaykernel(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relaykernel", *args], capture_output=True, text=True, timeout=60,
                          check=False, env={**os.environ, **(env or {})}, cwd=cwd)


def spec_dir(tmp_path: Path, config: dict[str, Any]) -> Path:
    directory = tmp_path / "spec"
    directory.mkdir(exist_ok=True)
    (directory / "kernel.json").write_text(json.dumps(build_kernel_json(display_name="t", config=config)))
    return directory


def launch(tmp_path: Path, config: dict[str, Any]) -> subprocess.CompletedProcess:
    connection = tmp_path / "kernel.json"
    connection.write_text(json.dumps({"shell_port": 1, "iopub_port": 2, "stdin_port": 3, "control_port": 4,
                                      "hb_port": 5, "key": "k"}))
    return relaykernel("launch", "--spec", str(spec_dir(tmp_path, config)), "-f", str(connection),
                       env={"JUPYTER_CONFIG_DIR": str(tmp_path)}, cwd=tmp_path)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "unexpected" not in lines[0] and "connect" not in lines[0], lines[0]
    return lines[0]


# --- bad configuration: one line, before any remote work -------------------------------------------------------

def test_a_typo_in_the_kernelspec_names_the_closest_option(tmp_path):
    line = one_line_error(launch(tmp_path, {"host": NOWHERE, "lease_secondz": 5}))
    assert "unknown option 'lease_secondz'" in line and "did you mean 'lease_seconds'?" in line, line


def test_a_wrongly_typed_option_names_the_option_and_the_type(tmp_path):
    line = one_line_error(launch(tmp_path, {"host": NOWHERE, "lease_seconds": "soon"}))
    assert line == "relaykernel: option lease_seconds must be a float, not the str 'soon'", line


def test_a_missing_sync_folder_is_one_line_before_launch(tmp_path):
    line = one_line_error(launch(tmp_path, {"host": NOWHERE, "sync_local_dir": str(tmp_path / "gone")}))
    assert "sync_local_dir" in line and "gone" in line and "is not a folder here" in line, line


def test_a_typo_in_a_config_file_names_the_closest_option(tmp_path, config_dir):
    (config_dir / "jupyter_relaykernel_config.py").write_text("c.RelayOptions.remote_pyhton = 'python3'\n")
    with pytest.raises(ConfigError, match="unknown option 'remote_pyhton' in c.RelayOptions .*'remote_python'"):
        load_options(flags={"host": NOWHERE})


def test_a_missing_identity_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="identity_file = .* does not exist"):
        RelayOptions(identity_file=str(tmp_path / "id_missing"))


def test_the_provisioner_refuses_bad_configuration_before_any_remote_work(tmp_path, config_dir):
    for config, expected in (({"host": NOWHERE, "lease_secondz": 5}, "did you mean 'lease_seconds'"),
                             ({"host": NOWHERE, "lease_seconds": "soon"}, "lease_seconds must be a float, not the str"),
                             ({"host": NOWHERE, "sync_local_dir": str(tmp_path / "gone")}, "is not a folder here")):
        kernels = tmp_path / "kernels" / "relaytest"
        kernels.mkdir(parents=True, exist_ok=True)
        (kernels / "kernel.json").write_text(json.dumps(build_kernel_json(display_name="t", config=config)))
        km = KernelManager(kernel_name="relaytest",
                           kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")]))
        with pytest.raises(ConfigError, match=expected):
            km.start_kernel()
        assert km.provisioner is None or km.provisioner.relayed is None, "nothing started"


# --- one loader: config files, then the kernelspec, then flags -------------------------------------------------

def provisioner_for(config: dict[str, Any], tmp_path: Path) -> Any:
    """The provisioner exactly as jupyter_client builds it for a KernelManager (the JupyterLab path)."""
    kernels = tmp_path / "kernels" / "relaytest"
    kernels.mkdir(parents=True, exist_ok=True)
    (kernels / "kernel.json").write_text(json.dumps(build_kernel_json(display_name="t", config=config)))
    km = KernelManager(kernel_name="relaytest",
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")]))
    return KernelProvisionerFactory.instance().create_provisioner_instance("k1", km.kernel_spec, parent=km)


def test_lease_seconds_in_a_jupyter_config_file_reaches_the_provisioner(tmp_path, config_dir):
    (config_dir / "jupyter_relaykernel_config.py").write_text("c.RelayOptions.lease_seconds = 42\n")
    assert provisioner_for({"host": NOWHERE}, tmp_path).lease_seconds == 42
    assert provisioner_for({"host": NOWHERE, "lease_seconds": 7}, tmp_path).lease_seconds == 7, "the spec wins"


def test_the_server_config_section_applies_to_every_front(tmp_path, config_dir):
    (config_dir / "jupyter_relaykernel_config.py").write_text(
        "c.RelayOptions.lease_seconds = 42\nc.RelayOptions.heartbeat_seconds = 30\n")
    (config_dir / "jupyter_server_config.py").write_text(
        "c.ServerApp.port = 8899\nc.RelayOptions.heartbeat_seconds = 31\n")
    assert jupyter_config().RelayOptions == {"lease_seconds": 42, "heartbeat_seconds": 31}
    options = load_options(spec_config={"host": NOWHERE, "remote_python": "python3.11"}, flags={"lease_seconds": 9})
    assert (options.lease_seconds, options.heartbeat_seconds, options.remote_python) == (9, 31, "python3.11")
    assert options.sources["lease_seconds"] == "the command line"
    assert options.sources["heartbeat_seconds"] == "a Jupyter config file"


def in_parallel(runs: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    """Each command line's result; they run at once (each is mostly a Python start)."""
    with ThreadPoolExecutor(max_workers=len(runs)) as pool:
        futures = {name: pool.submit(relaykernel, *args) for name, args in runs.items()}
        return {name: future.result() for name, future in futures.items()}


def test_flags_are_generated_from_the_traits_per_subcommand():
    commands = ("launch", "trust", "sync", "checkpoint", "cell")
    results = in_parallel({**{command: [command, "--help"] for command in commands}, "version": ["--version"]})
    flags = {command: results[command].stdout for command in commands}
    assert "--lease-seconds SECONDS" in flags["launch"] and "(default: 600.0)" in flags["launch"]
    for command in ("trust", "sync", "checkpoint"):
        assert "--lease-seconds" not in flags[command] and "--remote-workdir" not in flags[command], command
    assert "--heartbeat-seconds SECONDS" in flags["cell"]
    assert results["version"].stdout.strip().startswith("relaykernel ")


def test_debug_is_accepted_after_the_subcommand_and_shows_timed_steps(tmp_path, config_dir):
    (config_dir / "jupyter_relaykernel_config.py").write_text("c.RelayOptions.lease_seconds = 42\n")
    key = tmp_path / "id.pub"
    key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA me@laptop\n")
    result = relaykernel("cell", "--relay", "me@relay", "--authorize", str(key), "--debug")
    assert result.returncode == 0, result.stderr
    assert "option lease_seconds = 42.0 (from a Jupyter config file)" in result.stderr, result.stderr
    assert "relaykernel.step] relaykernel cell: done in" in result.stderr, result.stderr


# --- the kernelspec --------------------------------------------------------------------------------------------

def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return struct.unpack(">II", data[16:24])


def test_install_writes_logos_the_debugger_and_names_that_tell_vms_apart(tmp_path):
    repo = Path(__file__).resolve().parent.parent
    for name in ("colab", "colab-2"):
        result = relaykernel("install", "--from", str(repo / "kernelspecs" / "colab"), "--name", name,
                             "--prefix", str(tmp_path))
        assert result.returncode == 0, result.stderr
    kernels = tmp_path / "share" / "jupyter" / "kernels"
    names = {json.loads((kernels / n / "kernel.json").read_text())["display_name"] for n in ("colab", "colab-2")}
    assert names == {"Python on Colab (relaykernel)", "Python on Colab (relaykernel) [colab-2]"}
    for size in (32, 64):
        assert png_size(kernels / "colab" / f"logo-{size}x{size}.png") == (size, size)
    assert json.loads((kernels / "colab" / "kernel.json").read_text())["metadata"]["debugger"] is True


def test_an_unwritable_prefix_is_a_one_line_error(tmp_path):
    (tmp_path / "a-file").write_text("")  # unwritable even for root: a prefix below a file
    prefix = str(tmp_path / "a-file" / "p")
    line = one_line_error(relaykernel("install", "--host", "vm", "--name", "x", "--prefix", prefix))
    assert "cannot write the kernelspec" in line and "--prefix" in line, line


def test_debug_shows_timed_steps_for_every_subcommand(tmp_path, config_dir):
    key = tmp_path / "id.pub"
    key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA me@laptop\n")
    connection = tmp_path / "kernel.json"
    connection.write_text(json.dumps({"shell_port": 1, "iopub_port": 2, "stdin_port": 3, "control_port": 4,
                                      "hb_port": 5, "key": "k"}))
    quick = ["--connect-timeout-seconds", "2"]  # nothing listens on NOWHERE: each remote step fails at once
    commands = {
        "install": ["--host", NOWHERE, "--name", "x", "--prefix", str(tmp_path / "prefix")],
        "launch": ["--host", NOWHERE, "-f", str(connection), "--sync-local-dir", "none", *quick],
        "doctor": [NOWHERE, *quick],
        "trust": [NOWHERE, *quick],
        "sync": [NOWHERE, str(tmp_path), "/tmp/x", *quick],
        "checkpoint": [NOWHERE, "list", *quick],
        "cell": ["--relay", "me@relay", "--authorize", str(key)],
    }
    results = in_parallel({command: [command, *arguments, "--debug"] for command, arguments in commands.items()})
    for command, result in results.items():
        for step in ("loading the options", f"relaykernel {command}"):
            stamp = r"\[D \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} relaykernel\.step\] "
            pattern = stamp + re.escape(step) + r": (done in|failed after) \d+\.\d{3} s"
            assert re.search(pattern, result.stderr), (command, step, result.stderr)
