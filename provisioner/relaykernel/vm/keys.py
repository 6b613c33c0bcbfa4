"""SSH keys that outlive the VM: the sshd host key and the tunnel's client key, kept in persistent storage.

A new VM comes with a new host key, and the laptop then refuses it as changed. Keeping the key in the platform's
persistent storage (a mounted Drive, ~/work, /kaggle/working) and restoring it on the next VM keeps the
fingerprint the laptop pinned. Storage such as Drive may not keep modes, so the working copy lives in a private
local directory and storage only keeps the backup (0600 in a 0700 folder wherever the storage honours modes).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..common.errors import VM, VMSetupError
from .private import PRIVATE_DIR, PRIVATE_FILE, private_dir, tighten, write_private


@dataclass(frozen=True)
class KeyPair:
    """A private key file (0600, local) and its public half, as ssh-keygen writes them."""

    private_file: Path
    restored: bool

    @property
    def public_file(self) -> Path:
        return self.private_file.with_name(self.private_file.name + ".pub")

    @property
    def public_key(self) -> str:
        return self.public_file.read_text().strip()

    def fingerprint(self) -> str:
        """``SHA256:…`` as ssh-keygen -l prints it."""
        listing = _run(["ssh-keygen", "-l", "-f", str(self.public_file)])
        return listing.split()[1]


def stable_key(*, storage_dir: Path, local_dir: Path, name: str, comment: str,
               note: Callable[[str], None] | None = None) -> KeyPair:
    """The key ``name``: restored from storage if it is there, else made now and saved there.

    Both copies end 0600 in 0700 folders; a kept key found looser is tightened and NOTE says so.
    """
    private_dir(local_dir, note)
    local, kept = local_dir / name, storage_dir / name
    restored = kept.is_file() and kept.with_name(name + ".pub").is_file()
    if restored:
        _keep_private(storage_dir, name, note)
        write_private(local, kept.read_bytes())
        write_private(local.with_name(name + ".pub"), kept.with_name(name + ".pub").read_bytes())
    else:
        for stale in (local, local.with_name(name + ".pub")):
            stale.unlink(missing_ok=True)
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(local)])
        tighten(local.with_name(name + ".pub"), PRIVATE_FILE)
        _save(local, storage_dir)
    return KeyPair(local, restored)


def _keep_private(storage_dir: Path, name: str, note: Callable[[str], None] | None) -> None:
    """The kept copies, as found: tightened to 0600 (folder 0700) with a note when looser."""
    try:
        tighten(storage_dir, PRIVATE_DIR, note)
        for part in (name, name + ".pub"):
            tighten(storage_dir / part, PRIVATE_FILE, note)
    except OSError as error:
        if note is not None:
            note(f"cannot tighten the modes in {storage_dir}: {error.strerror or error}")


def _save(local: Path, storage_dir: Path) -> None:
    """Back both halves up to storage (0600 in a 0700 folder), each written whole before it takes its name."""
    try:
        private_dir(storage_dir)
        for part in (local, local.with_name(local.name + ".pub")):
            write_private(storage_dir / part.name, part.read_bytes())
    except OSError as error:
        raise VMSetupError(
            VM, "storage", f"cannot keep {local.name} in {storage_dir}: {error.strerror or error}",
            "mount the platform's persistent storage (Colab: drive.mount) or pass another --storage DIR",
        ) from None


def _run(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError:
        raise VMSetupError(VM, argv[0], "not installed", "apt-get install openssh-client") from None
    if result.returncode != 0:
        raise VMSetupError(VM, argv[0], f"failed: {result.stderr.strip()}", "check the storage directory")
    return result.stdout
