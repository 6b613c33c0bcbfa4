"""Which paths stay local: gitignore rules (every .gitignore in the tree), defaults, extra patterns, a size cap."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pathspec

log = logging.getLogger(__name__)
DEFAULT_IGNORES = (".git/", "__pycache__/", ".ipynb_checkpoints/", ".venv/", "node_modules/", ".tox/", ".nox/",
                   ".mypy_cache/", ".pytest_cache/", ".ruff_cache/", "*.rk-tmp")
ENVIRONMENT_MARKERS = ("pyvenv.cfg", "conda-meta")  # a folder holding one is an environment, not project files


@dataclass(frozen=True)
class LocalFile:
    """A regular file of the tree: path relative to the root (POSIX separators), size, mtime, mode."""

    path: str
    size: int
    mtime_ns: int
    mode: int


class IgnoreRules:
    """gitignore semantics per directory: a deeper .gitignore refines its parents', the last match decides."""

    def __init__(self, root: Path, *, extra_patterns: Sequence[str] = (), max_file_size_bytes: int = 0) -> None:
        self.root = root
        self.max_file_size_bytes = max_file_size_bytes
        self._base = _spec([*DEFAULT_IGNORES, *extra_patterns], "sync_ignore")
        self._extra = _spec(extra_patterns, "sync_ignore")
        self._specs: dict[str, pathspec.GitIgnoreSpec | None] = {}

    def ignored(self, path: str, *, is_dir: bool = False) -> bool:
        """Whether ``path`` (relative, POSIX) or any directory above it is ignored."""
        parts = path.split("/")
        return any(self._own_decision("/".join(parts[: i + 1]), is_dir or i < len(parts) - 1)
                   for i in range(len(parts)))

    def environment(self, directory: str) -> bool:
        """A virtualenv or conda environment (pyvenv.cfg or conda-meta/ inside), unless sync_ignore re-includes it."""
        if not any(os.path.lexists(self.root / directory / marker) for marker in ENVIRONMENT_MARKERS):
            return False
        return self._extra.check_file(directory + "/").include is not False

    def too_big(self, size: int) -> bool:
        return bool(self.max_file_size_bytes) and size > self.max_file_size_bytes

    def walk(self) -> Iterator[LocalFile]:
        """Every regular file that is not ignored (ignored directories are not entered; symlinks are skipped)."""
        stack = [""]
        while stack:
            relative_dir = stack.pop()
            try:
                entries = list(os.scandir(self.root / relative_dir))
            except OSError:
                continue  # vanished or unreadable meanwhile: the next scan sees it again
            for entry in entries:
                path = f"{relative_dir}/{entry.name}" if relative_dir else entry.name
                if entry.is_dir(follow_symlinks=False):
                    if not self._own_decision(path, True):
                        stack.append(path)
                elif entry.is_file(follow_symlinks=False) and not self._own_decision(path, False):
                    info = entry.stat(follow_symlinks=False)
                    if not self.too_big(info.st_size):
                        yield LocalFile(path, info.st_size, info.st_mtime_ns, info.st_mode & 0o777)

    def forget(self, directories: Iterable[str]) -> None:
        """Drop cached .gitignore files of these directories (one of them changed)."""
        for directory in directories:
            self._specs.pop(directory, None)

    def _own_decision(self, path: str, is_dir: bool) -> bool:
        """Ignored by the rules that apply at its own level (its parents are the caller's business)."""
        candidate = path + "/" if is_dir else path
        decision = self._base.check_file(candidate).include or (is_dir and self.environment(path))
        parts = path.split("/")
        for depth in range(len(parts)):
            directory = "/".join(parts[:depth])
            spec = self._spec_of(directory)
            if spec is not None:
                relative = "/".join(parts[depth:]) + ("/" if is_dir else "")
                verdict = spec.check_file(relative).include
                if verdict is not None:
                    decision = verdict
        return bool(decision)

    def _spec_of(self, directory: str) -> pathspec.GitIgnoreSpec | None:
        if directory not in self._specs:
            try:
                lines = (self.root / directory / ".gitignore").read_text(errors="replace").splitlines()
            except OSError:
                self._specs[directory] = None
            else:
                self._specs[directory] = _spec(lines, str(self.root / directory / ".gitignore"))
        return self._specs[directory]


def _spec(lines: Sequence[str], origin: str) -> pathspec.GitIgnoreSpec:
    """The rules of these lines; a line git itself would not understand (``!``, a lone ``\\``) is skipped, and said."""
    try:
        return pathspec.GitIgnoreSpec.from_lines(lines)
    except ValueError:
        pass
    good = []
    for line in lines:
        try:
            pathspec.GitIgnoreSpec.from_lines([line])
        except ValueError as error:
            log.warning("sync: %s: skipping the pattern %r (%s)", origin, line, error)
        else:
            good.append(line)
    return pathspec.GitIgnoreSpec.from_lines(good)
