"""The work-dir sync as a kernel hook: it starts when the link is first up and follows the kernel's life."""

from __future__ import annotations

from pathlib import Path

from ..options import RelayOptions
from ..ssh.chain import SSHChain
from .mirror import WorkdirMirror


class MirrorHook:
    """Mirror ``local_dir`` into the kernel's work dir for as long as the kernel runs (``RelayedKernel`` hooks)."""

    def __init__(self, options: RelayOptions, local_dir: Path) -> None:
        self.options = options
        self.local_dir = local_dir
        self.mirror: WorkdirMirror | None = None

    def link_up(self, chain: SSHChain) -> None:
        if self.mirror is None:
            self.mirror = WorkdirMirror(self.options, chain, self.local_dir).start()

    def link_back(self) -> None:
        if self.mirror is not None:
            self.mirror.resume()

    def stopping(self) -> None:
        mirror, self.mirror = self.mirror, None
        if mirror is not None:
            mirror.stop()

    def resolve(self, path: str) -> str | None:
        return self.mirror.resolve(path) if self.mirror is not None else None


def sync_hooks(options: RelayOptions, local_dir: Path | None) -> list[MirrorHook]:
    """The hooks a front gives its kernel: one mirror of ``local_dir`` (options.sync_dir), none when sync is off."""
    return [] if local_dir is None else [MirrorHook(options, local_dir)]
