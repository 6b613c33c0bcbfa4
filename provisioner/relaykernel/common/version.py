"""relaykernel's version (the one place it is written) and the check that laptop and VM run the same one."""

from __future__ import annotations

import json
import os

from .protocol import PROTOCOL_VERSION

__version__ = "0.1.0"

CELL_INFO_FILE = "~/.relaykernel/cell.json"
"""Written by the cell on the VM: {"relaykernel": version, "protocol": PROTOCOL_VERSION}."""


def cell_info() -> dict:
    """What this side of relaykernel is, as the cell records it on the VM."""
    return {"relaykernel": __version__, "protocol": PROTOCOL_VERSION}


def read_cell_info(path: str = CELL_INFO_FILE) -> dict | None:
    """The VM's cell info, or None when no cell (or an unreadable file) is there."""
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as file:
            info = json.load(file)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def version_mismatch(laptop_version: str, info: dict | None, laptop_protocol: int = PROTOCOL_VERSION) -> str | None:
    """None when the VM's cell speaks the laptop's protocol; else one line naming both versions and the fix."""
    if not info:
        return None
    vm_version = str(info.get("relaykernel", "unknown"))
    vm_protocol = info.get("protocol")
    if vm_protocol == laptop_protocol:
        return None
    if isinstance(vm_protocol, int) and vm_protocol > laptop_protocol:
        fix = f"update relaykernel on the laptop to {vm_version} (pip install -U relaykernel)"
    else:
        fix = f"rerun the cell printed by this laptop's `relaykernel cell` (relaykernel {laptop_version}) on the VM"
    return (f"the VM's cell is relaykernel {vm_version} (protocol {vm_protocol}), the laptop runs relaykernel "
            f"{laptop_version} (protocol {laptop_protocol}): {fix}")
