"""Every laptop-side module imports with the POSIX-only modules and signals made unavailable (as on Windows).

Runs anywhere (the macOS and Windows CI runs it): a fresh interpreter, no SSH.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CHECK = r'''
import builtins, importlib, json, pkgutil, signal, sys

POSIX_ONLY = {"pwd", "grp", "fcntl", "termios", "tty", "pty", "resource", "posix", "syslog", "crypt",
              "_posixsubprocess"}
POSIX_SIGNALS = ("SIGHUP", "SIGKILL", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGPIPE", "SIGXFSZ", "SIGCHLD", "SIGALRM",
                 "SIGSTOP", "SIGCONT", "SIGTSTP")
LAPTOP_SIDE_EXCEPT = ("relaykernel.vm", "relaykernel.sandbox", "relaykernel.__main__")  # VM side; the demo's sshds
real_import = builtins.__import__


def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
    importer = (globals or {}).get("__name__", "")
    if level == 0 and name.split(".")[0] in POSIX_ONLY and importer.startswith("relaykernel"):
        raise ImportError(f"{importer} imports the POSIX-only module {name}")
    return real_import(name, globals, locals, fromlist, level)


builtins.__import__ = guarded_import  # only relaykernel's own imports are refused: its libraries handle their own
for name in POSIX_SIGNALS:
    if hasattr(signal, name):
        delattr(signal, name)
import relaykernel

if len(sys.argv) > 1:  # run one command under the same conditions instead
    import os
    from relaykernel.cli import main

    for name in ("getuid", "geteuid", "getgid", "getpgid", "killpg", "setsid", "fork", "posix_spawn"):
        if hasattr(os, name):  # after the imports (libraries may look them up), before the command runs
            delattr(os, name)
    sys.exit(main(sys.argv[1:]))
failures, imported = {}, []
for info in pkgutil.walk_packages(relaykernel.__path__, "relaykernel."):
    if info.name.startswith(LAPTOP_SIDE_EXCEPT):
        continue
    try:
        importlib.import_module(info.name)
        imported.append(info.name)
    except Exception as error:
        failures[info.name] = f"{type(error).__name__}: {error}"
print(json.dumps({"failures": failures, "imported": imported}))
'''


def test_every_laptop_side_module_imports_without_posix_only_modules():
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["failures"] == {}, report["failures"]
    for module in ("relaykernel.cli", "relaykernel.cli.launch", "relaykernel.provisioner", "relaykernel.ssh.config",
                   "relaykernel.ssh.chain", "relaykernel.portable", "relaykernel.loader"):
        assert module in report["imported"], module


def test_cell_and_install_run_without_posix_only_modules(tmp_path):
    key = tmp_path / "id.pub"
    key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA me@laptop\n")
    for command in (["cell", "--relay", "me@relay", "--authorize", str(key)],
                    ["install", "--host", "vm", "--name", "vm", "--prefix", str(tmp_path / "prefix")]):
        result = subprocess.run([sys.executable, "-c", CHECK, *command], capture_output=True, text=True, timeout=120,
                                check=False)
        assert result.returncode == 0, (command, result.stderr)


def test_the_macos_and_windows_workflow_is_valid_and_runs_these_tests():
    yaml = pytest.importorskip("yaml")  # PyYAML comes with jupyter_server (jupyter_events)
    workflow = Path(__file__).resolve().parent.parent / ".github" / "workflows" / "laptop-side.yml"
    document = yaml.safe_load(workflow.read_text())
    job = document["jobs"]["unit"]
    assert set(job["strategy"]["matrix"]["os"]) == {"macos-latest", "windows-latest"}
    commands = " ".join(step.get("run", "") for step in job["steps"])
    assert Path(__file__).name in commands and "test_options_loader.py" in commands
