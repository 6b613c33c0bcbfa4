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

from .errors import ConfigError

PROVISIONER_NAME = "relay-provisioner"
_NAME = re.compile(r"^[a-z0-9._-]+$", re.IGNORECASE)
_PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_]+)\}")
_ALLOWED_PLACEHOLDERS = {"connection_file", "resource_dir"}


def launch_argv(python: str = sys.executable) -> list[str]:
    """The argv a client that ignores provisioners (VS Code) spawns: ``relaykernel launch``."""
    return [python, "-m", "relaykernel", "launch", "--spec", "{resource_dir}", "-f", "{connection_file}"]


def build_kernel_json(*, display_name: str, config: dict[str, Any], python: str = sys.executable) -> dict[str, Any]:
    """kernel.json for a remote Python kernel reached through the relay."""
    return {
        "argv": launch_argv(python),
        "display_name": display_name,
        "language": "python",
        "interrupt_mode": "signal",
        "env": {},
        "metadata": {
            "debugger": False,
            "kernel_provisioner": {"provisioner_name": PROVISIONER_NAME, "config": config},
        },
    }


def check_kernel_json(spec: dict[str, Any]) -> list[str]:
    """What is wrong with a relay kernelspec for JupyterLab and VS Code; empty when nothing."""
    problems = []
    argv = spec.get("argv") or []
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
    _check_display_name_unique(manager, name, kernel_json["display_name"])
    with tempfile.TemporaryDirectory(prefix="relaykernel-spec-") as staging:
        Path(staging, "kernel.json").write_text(json.dumps(kernel_json, indent=2) + "\n")
        return manager.install_kernel_spec(staging, kernel_name=name, user=user, prefix=prefix)


def load_relay_config(resource_dir: str) -> dict[str, Any]:
    """The provisioner config stored in a kernelspec directory (for ``relaykernel launch``)."""
    path = os.path.join(resource_dir, "kernel.json")
    try:
        with open(path) as handle:
            spec = json.load(handle)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read kernelspec {path}: {error}") from None
    return dict(spec.get("metadata", {}).get("kernel_provisioner", {}).get("config", {}))


def _check_display_name_unique(manager: KernelSpecManager, name: str, display_name: str) -> None:
    for other, info in manager.get_all_specs().items():
        if other != name and info.get("spec", {}).get("display_name") == display_name:
            msg = f"kernel {other!r} already shows as {display_name!r}: pick another --display-name"
            raise ConfigError(msg)
