"""Find the OpenSSH and socat programs the sandbox runs, or say how to install them."""

from __future__ import annotations

import os
import shutil

from ..common.errors import LOCAL, HopError

# Debian/Ubuntu package that ships each program.
_PACKAGES = {
    "sshd": "openssh-server",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "socat": "socat",
}
_USUAL_PLACES = {"sshd": "/usr/sbin/sshd"}


def find_tool(name: str) -> str:
    """Absolute path of ``name``; sshd is looked for in /usr/sbin first (it is rarely on a user's PATH)."""
    usual = _USUAL_PLACES.get(name)
    if usual and os.access(usual, os.X_OK):
        return usual
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")
    if found:
        return os.path.abspath(found)
    package = _PACKAGES.get(name, name)
    raise HopError(
        LOCAL,
        "sandbox",
        f"{name} is not installed (looked in {usual or 'PATH'} and on PATH)",
        f"install it: sudo apt-get install {package} (Debian/Ubuntu), or your system's {package} package",
    )
