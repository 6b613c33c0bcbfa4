"""Build, check and install kernelspecs that select the relay provisioner (and launch from argv)."""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager

from .common.errors import ConfigError
from .logo import write_logos

PROVISIONER_NAME = "relay-provisioner"
_NAME = re.compile(r"^[a-z0-9._-]+$", re.IGNORECASE)
_PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_]+)\}")
_ALLOWED_PLACEHOLDERS = {"connection_file", "resource_dir"}


def launch_argv(python: str = sys.executable) -> list[str]:
    """The argv a client that ignores provisioners (VS Code) spawns: ``relaykernel launch``."""
    return [python, "-m", "relaykernel", "launch", "--spec", "{resource_dir}", "-f", "{connection_file}"]


def build_kernel_json(
    *, display_name: str, config: dict[str, Any], python: str = sys.executable, debugger: bool = True,
) -> dict[str, Any]:
    """kernel.json for a remote Python kernel reached through the relay."""
    return {
        "argv": launch_argv(python),
        "display_name": display_name,
        "language": "python",
        "interrupt_mode": "signal",
        "env": {},
        "metadata": {
            "debugger": debugger,  # JupyterLab's debugger: ipykernel >= 6 with debugpy on the VM (doctor checks)
            "kernel_provisioner": {"provisioner_name": PROVISIONER_NAME, "config": config},
        },
    }


TEMPLATE_PYTHON = "python3"
"""argv[0] of the stock specs: jupyter_client runs its own python; `relaykernel install --from` makes it absolute."""


def check_kernel_json(spec: dict[str, Any], *, template: bool = False) -> list[str]:
    """What is wrong with a relay kernelspec for JupyterLab and VS Code; empty when nothing.

    A ``template`` (a stock spec in the repository) may name ``python3`` in argv[0], since no file can know the
    absolute path of the python it will be installed for; an installed spec must name it.
    """
    problems = []
    argv = spec.get("argv") or []
    if not argv or not (os.path.isabs(argv[0]) or (template and argv[0] == TEMPLATE_PYTHON)):
        problems.append("argv[0] must be the absolute path of a python with relaykernel (VS Code hides a python "
                        "kernelspec whose argv[0] it cannot resolve)")
    if "{connection_file}" not in argv:
        problems.append("argv must hold '{connection_file}' as an argument of its own")
    for item in argv:
        unknown = set(_PLACEHOLDER.findall(item)) - _ALLOWED_PLACEHOLDERS
        if unknown:
            problems.append(f"argv item {item!r} uses {sorted(unknown)}: only {{connection_file}} and {{resource_dir}}")
    if any("ipykernel" in item for item in argv[1:3]):
        problems.append("argv must not run a module named like ipykernel (VS Code would replace argv[0])")
    if spec.get("language") != "python":
        problems.append('"language" must be "python"')
    if spec.get("interrupt_mode") != "signal":
        problems.append('"interrupt_mode" must be "signal"')
    if not str(spec.get("display_name", "")).strip():
        problems.append('"display_name" must name the kernel in the picker')
    provisioner = spec.get("metadata", {}).get("kernel_provisioner", {})
    if provisioner.get("provisioner_name") != PROVISIONER_NAME:
        problems.append(f'metadata.kernel_provisioner.provisioner_name must be "{PROVISIONER_NAME}"')
    return problems


def check_name(name: str) -> str:
    """A kernelspec name Jupyter accepts, or ConfigError."""
    if not _NAME.match(name):
        raise ConfigError(f"kernel name {name!r} may use only letters, digits, '.', '_' and '-'")
    return name.lower()


def install_kernelspec(
    *, name: str, kernel_json: dict[str, Any], user: bool = False, prefix: str | None = None,
    manager: KernelSpecManager | None = None,
) -> str:
    """Install the kernelspec and return the directory it landed in."""
    name = check_name(name)
    problems = check_kernel_json(kernel_json)
    if problems:
        raise ConfigError("this kernelspec would not work: " + "; ".join(problems))
    manager = manager or KernelSpecManager()
    _check_unique(manager, name, kernel_json["display_name"])
    with tempfile.TemporaryDirectory(prefix="relaykernel-spec-") as staging:
        Path(staging, "kernel.json").write_text(json.dumps(kernel_json, indent=2) + "\n")
        write_logos(staging)
        try:
            return manager.install_kernel_spec(staging, kernel_name=name, user=user, prefix=prefix)
        except OSError as error:
            where = error.filename or prefix or "the user's Jupyter data dir"
            msg = f"cannot write the kernelspec to {where}: {error.strerror or error}; choose a writable --prefix"
            raise ConfigError(msg) from None


def load_kernel_json(resource_dir: str) -> dict[str, Any]:
    """A kernelspec directory's kernel.json, or ConfigError naming the file."""
    path = os.path.join(resource_dir, "kernel.json")
    try:
        with open(path) as handle:
            spec = json.load(handle)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read kernelspec {path}: {error}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"kernelspec {path} is not a JSON object")
    return spec


def load_relay_config(resource_dir: str) -> dict[str, Any]:
    """The provisioner config stored in a kernelspec directory (for ``relaykernel launch``)."""
    spec = load_kernel_json(resource_dir)
    return dict(spec.get("metadata", {}).get("kernel_provisioner", {}).get("config", {}))


def _check_unique(manager: KernelSpecManager, name: str, display_name: str) -> None:
    """The name may replace an earlier relay spec of that name, never another kernel; display names stay unique."""
    for other, info in manager.get_all_specs().items():
        spec = info.get("spec", {})
        if other == name and _provisioner_name(spec) != PROVISIONER_NAME:
            where = info.get("resource_dir")
            msg = f"kernel {name!r} already exists at {where} and is not a relaykernel spec: pick another --name"
            raise ConfigError(msg)
        if other != name and spec.get("display_name") == display_name:
            msg = f"kernel {other!r} already shows as {display_name!r}: pick another --display-name"
            raise ConfigError(msg)


def _provisioner_name(spec: dict[str, Any]) -> str:
    return str((spec.get("metadata") or {}).get("kernel_provisioner", {}).get("provisioner_name", ""))
