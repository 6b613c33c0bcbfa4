"""SSH keys that outlive the VM: the sshd host key and the tunnel's client key, kept in persistent storage.

A new VM comes with a new host key, and the laptop then refuses it as changed. Keeping the key in the platform's
persistent storage (a mounted Drive, ~/work, /kaggle/working) and restoring it on the next VM keeps the
fingerprint the laptop pinned. Storage such as Drive cannot hold 0600 files, so the working copy lives in a
private local directory and storage only keeps the backup.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..common.errors import VM, VMSetupError


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


def stable_key(*, storage_dir: Path, local_dir: Path, name: str, comment: str) -> KeyPair:
    """The key ``name``: restored from storage if it is there, else made now and saved there."""
    local_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    local, kept = local_dir / name, storage_dir / name
    restored = kept.is_file() and kept.with_name(name + ".pub").is_file()
    if restored:
        _install_private(kept, local)
        shutil.copyfile(kept.with_name(name + ".pub"), local.with_name(name + ".pub"))
    else:
        for stale in (local, local.with_name(name + ".pub")):
            stale.unlink(missing_ok=True)
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(local)])
        _save(local, storage_dir)
    return KeyPair(local, restored)


def _install_private(source: Path, target: Path) -> None:
    """Copy a private key to a 0600 file (sshd and ssh refuse keys others can read)."""
    staging = target.with_name(target.name + ".tmp")
    descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(source.read_bytes())
    os.replace(staging, target)


def _save(local: Path, storage_dir: Path) -> None:
    """Back both halves up to storage, each written whole before it takes its final name."""
    try:
        storage_dir.mkdir(parents=True, exist_ok=True)
        for part in (local, local.with_name(local.name + ".pub")):
            staging = storage_dir / (part.name + ".tmp")
            shutil.copyfile(part, staging)
            os.replace(staging, storage_dir / part.name)
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
