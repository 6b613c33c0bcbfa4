"""When the heartbeat cell checkpoints: every interval, when a kernel ends, on SIGTERM; and the restore first."""

from __future__ import annotations

import time

from ..common.errors import CheckpointError
from .checkpoint import Checkpointer


class CheckpointSchedule:
    """Runs the checkpointer at the right moments and keeps one line of status; a failure never stops the cell."""

    def __init__(self, checkpointer: Checkpointer, *, interval_seconds: float) -> None:
        self.checkpointer = checkpointer
        self.interval_seconds = interval_seconds
        self.status = "none yet"
        self.failed = False
        self._last_at = time.monotonic()
        self._kernels = 0

    def restore(self) -> str:
        """Bring the latest checkpoint back into the work dir (before any kernel can start); what it did."""
        try:
            report = self.checkpointer.restore()
        except CheckpointError as error:
            self.status, self.failed = f"restore FAILED: {error}", True
            return self.status
        kept = f", {len(report.kept_newer)} newer file(s) kept" if report.kept_newer else ""
        return f"restored {len(report.restored)} file(s) from the last checkpoint{kept}"

    def tick(self, kernels_running: int) -> None:
        """Checkpoint when the interval is up or a kernel has ended since the last tick."""
        a_kernel_ended = kernels_running < self._kernels
        self._kernels = kernels_running
        if a_kernel_ended or time.monotonic() - self._last_at >= self.interval_seconds:
            self.now()

    def now(self) -> None:
        self._last_at = time.monotonic()
        try:
            made = self.checkpointer.checkpoint()
        except CheckpointError as error:
            self.status, self.failed = f"FAILED: {error}", True
            return
        self.failed = False
        self.status = (f"{made.id} at {time.strftime('%H:%M:%S')}: {len(made.files)} file(s), "
                       f"{made.copied_bytes / 1e6:.1f} MB copied -> {self.checkpointer.storage}")
