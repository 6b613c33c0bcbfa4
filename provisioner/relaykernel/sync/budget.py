"""The first sync's limits: how many files and how many bytes a folder may send before the user decides."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path

from .ignore import IgnoreRules

_SHOWN_FOLDERS = 3


def local_sizes(rules: IgnoreRules, max_files: int) -> dict[str, int] | None:
    """path -> size of every file the sync would mirror; None when there are more than ``max_files``."""
    sizes = {file.path: file.size for file in itertools.islice(rules.walk(), max_files + 1)}
    return None if len(sizes) > max_files else sizes


def too_many_files(local_dir: Path, max_files: int) -> str:
    return (f"{local_dir} holds more than {max_files} files (sync_max_files): not syncing it; open the notebook from "
            "its project folder, set sync_local_dir, or raise sync_max_files")


def over_budget(local_dir: Path, pending: Mapping[str, int], budget_bytes: int) -> str | None:
    """Why nothing is sent when the files still to send exceed the budget (biggest folders named), else None."""
    total = sum(pending.values())
    if total <= budget_bytes:
        return None
    folders: dict[str, int] = {}
    for path, size in pending.items():
        top = path.split("/", 1)[0] + ("/" if "/" in path else "")
        folders[top] = folders.get(top, 0) + size
    biggest = sorted(folders.items(), key=lambda item: -item[1])[:_SHOWN_FOLDERS]
    shown = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in biggest)
    example = next((name for name, _ in biggest if name.endswith("/")), biggest[0][0])
    return (f"{local_dir} has {total / 1e6:.1f} MB in {len(pending)} files to send, over the first sync's budget of "
            f"{budget_bytes / 1e6:.0f} MB (sync_initial_budget_mb): nothing was sent. Biggest: {shown}. Keep what "
            f"the kernel does not need local with sync_ignore (e.g. '{example}') or a .gitignore, or raise "
            "sync_initial_budget_mb")
