"""Checkpoints of a work dir's outputs in persistent storage: incremental, published whole, restorable (stdlib).

Layout under the storage root: ``objects/ab/<sha256>`` (one per distinct file content, so an unchanged file is
never copied twice), ``packs/<id>.tar`` (many small files of one checkpoint in one archive: a Drive-like FUSE
mount is slow per file), and ``manifests/<id>.json``, written last under a temporary name and renamed, so a
checkpoint exists exactly when its manifest does. Every file is written under a temporary name first; a copy that
dies half way leaves a temporary, never a torn file under a final name. Checkpoints and restores of one store take
turns (``lock``, an flock beside the store): the cell's schedule and ``relaykernel checkpoint now`` may overlap, and
one run's cleanup must never delete what the other has stored but not yet published.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import os
import secrets
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..common.errors import VM, CheckpointError
from .checkpoint_lock import store_lock
from .private import write_private

TEMP_SUFFIX = ".rk-tmp"
DEFAULT_PATTERNS = ("outputs/**", "checkpoints/**")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Entry:
    """One file of a checkpoint: where its content is (an object, or a member of a pack)."""

    sha256: str
    size: int
    mtime_ns: int
    mode: int
    pack: str = ""


@dataclass
class Manifest:
    """A complete checkpoint; ``copied_bytes`` is what this checkpoint had to write (0 when nothing changed)."""

    id: str
    created: float
    files: dict[str, Entry] = field(default_factory=dict)
    copied_bytes: int = 0


@dataclass
class RestoreReport:
    restored: list[str] = field(default_factory=list)
    kept_newer: list[str] = field(default_factory=list)


class Checkpointer:
    """The outputs of one work dir (glob patterns relative to it) kept in one storage root."""

    def __init__(self, *, workdir: Path, storage: Path, patterns: Sequence[str] = DEFAULT_PATTERNS,
                 pack_min_files: int = 64, pack_max_file_bytes: int = 1 << 20, keep: int = 3,
                 mount: Path | None = None, garbage_grace_seconds: float = 3600.0,
                 lock_timeout_seconds: float = 900.0) -> None:
        self.workdir = workdir
        self.storage = storage
        self.mount = mount or storage.parent  # must exist: the mounted folder (Drive's MyDrive, ~/work, …)
        self.patterns = tuple(patterns)
        self.pack_min_files = pack_min_files
        self.pack_max_file_bytes = pack_max_file_bytes
        self.keep = keep
        self.garbage_grace_seconds = garbage_grace_seconds  # unreferenced objects younger than this stay
        self.lock_timeout_seconds = lock_timeout_seconds

    def checkpoint(self) -> Manifest:
        """Copy what changed since the latest checkpoint and publish a new one; CheckpointError if storage fails."""
        with _storage_errors(self.storage, self.mount), store_lock(self.storage, self.lock_timeout_seconds):
            previous = self.latest()
            manifest = Manifest(_new_id(), time.time())
            changed = []
            for path in self.matching():
                info = os.stat(self.workdir / path)
                known = previous.files.get(path) if previous else None
                if known is not None and (known.size, known.mtime_ns) == (info.st_size, info.st_mtime_ns):
                    manifest.files[path] = known  # unchanged: neither read nor copied again
                else:
                    changed.append(path)
            small = [p for p in changed if os.stat(self.workdir / p).st_size <= self.pack_max_file_bytes]
            packed = small if len(small) >= self.pack_min_files else []
            for path in changed:
                if path not in packed:
                    self._store_object(path, manifest)
            if packed:
                self._store_pack(packed, manifest)
            if previous is not None and manifest.files == previous.files:
                return Manifest(previous.id, previous.created, previous.files)  # nothing new: nothing written
            self._publish(manifest)
            self._collect_garbage()
        return manifest

    def matching(self) -> list[str]:
        """Files under the work dir that the patterns select (relative POSIX paths), temporaries left out."""
        found = []
        inner = _relative(self.storage, self.workdir)  # storage inside the work dir: never checkpoint itself
        for path in _files_below(self.workdir):
            if inner and (path + "/").startswith(inner + "/"):
                continue
            if not path.endswith(TEMP_SUFFIX) and any(_matches(path, pattern) for pattern in self.patterns):
                found.append(path)
        return sorted(found)

    def manifests(self) -> list[Manifest]:
        """Every complete checkpoint, oldest first."""
        folder = self.storage / "manifests"
        if not folder.is_dir():
            return []
        loaded = []
        for path in sorted(folder.glob("*.json")):
            try:
                loaded.append(_load_manifest(path))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not ours, or damaged by hand: a restore never uses it
        return sorted(loaded, key=lambda manifest: manifest.id)

    def latest(self) -> Manifest | None:
        found = self.manifests()
        return found[-1] if found else None

    def restore(self, checkpoint_id: str = "") -> RestoreReport:
        """Copy a checkpoint (the latest by default) into the work dir, never over a file newer than its copy."""
        report = RestoreReport()
        with _storage_errors(self.storage, self.mount), store_lock(self.storage, self.lock_timeout_seconds):
            chosen = [m for m in self.manifests() if not checkpoint_id or m.id == checkpoint_id]
            if not chosen:
                return report
            manifest = chosen[-1]
            for path, entry in sorted(manifest.files.items()):
                target = _inside(self.workdir, path)
                if target is None:
                    continue
                if target.exists() and target.stat().st_mtime_ns >= entry.mtime_ns:
                    report.kept_newer.append(path)
                    continue
                self._restore_file(path, entry, target)
                report.restored.append(path)
        return report

    def _store_object(self, path: str, manifest: Manifest) -> None:
        source = self.workdir / path
        before = os.stat(source)
        staging = self.storage / "objects" / f"incoming-{secrets.token_hex(6)}{TEMP_SUFFIX}"
        staging.parent.mkdir(parents=True, exist_ok=True)
        digest, size = _copy_hashing(source, staging)
        after = os.stat(source)
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            staging.unlink()  # written to while we copied: the next checkpoint takes it whole
            return
        final = self.storage / "objects" / digest[:2] / digest
        if final.exists():
            staging.unlink()
            os.utime(final)  # used again: young, so a cleanup's grace period covers it
        else:
            final.parent.mkdir(exist_ok=True)
            os.replace(staging, final)
            manifest.copied_bytes += size
        manifest.files[path] = Entry(digest, size, before.st_mtime_ns, before.st_mode & 0o777)

    def _store_pack(self, paths: list[str], manifest: Manifest) -> None:
        name = f"{manifest.id}.tar"
        staging = self.storage / "packs" / f"{name}{TEMP_SUFFIX}"
        staging.parent.mkdir(parents=True, exist_ok=True)
        entries = {}
        with tarfile.open(staging, "w", format=tarfile.GNU_FORMAT) as archive:
            for path in paths:
                source = self.workdir / path
                data = source.read_bytes()
                info = os.stat(source)
                member = tarfile.TarInfo(path)
                member.size, member.mtime, member.mode = len(data), info.st_mtime_ns // 10**9, info.st_mode & 0o777
                archive.addfile(member, _BytesReader(data))
                entries[path] = Entry(hashlib.sha256(data).hexdigest(), len(data), info.st_mtime_ns,
                                      info.st_mode & 0o777, pack=name)
        _fsync(staging)
        os.replace(staging, staging.with_name(name))
        manifest.copied_bytes += staging.with_name(name).stat().st_size
        manifest.files.update(entries)

    def _publish(self, manifest: Manifest) -> None:
        folder = self.storage / "manifests"
        folder.mkdir(parents=True, exist_ok=True)
        staging = folder / f"{manifest.id}.json{TEMP_SUFFIX}"
        document = {"id": manifest.id, "created": manifest.created,
                    "files": {path: asdict(entry) for path, entry in manifest.files.items()}}
        staging.write_text(json.dumps(document, indent=1, sort_keys=True))
        _fsync(staging)
        os.replace(staging, folder / f"{manifest.id}.json")

    def _collect_garbage(self) -> None:
        """Keep the newest ``keep`` checkpoints; drop what none of them uses, and stale temporaries."""
        kept = self.manifests()[-self.keep:]
        for manifest in self.manifests()[: -self.keep]:
            (self.storage / "manifests" / f"{manifest.id}.json").unlink(missing_ok=True)
        used_objects = {e.sha256 for m in kept for e in m.files.values() if not e.pack}
        used_packs = {e.pack for m in kept for e in m.files.values() if e.pack}
        unused = [p for p in (self.storage / "objects").glob("*/*") if p.name not in used_objects]
        unused += [p for p in (self.storage / "packs").glob("*.tar") if p.name not in used_packs]
        unused += list(self.storage.glob(f"*/*{TEMP_SUFFIX}"))  # a checkpoint killed half way
        for path in unused:
            if time.time() - path.stat().st_mtime >= self.garbage_grace_seconds:
                path.unlink(missing_ok=True)

    def _restore_file(self, path: str, entry: Entry, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.{os.getpid()}{TEMP_SUFFIX}")
        if entry.pack:
            with tarfile.open(self.storage / "packs" / entry.pack) as archive:
                member = archive.extractfile(path)
                assert member is not None
                staging.write_bytes(member.read())
        else:
            _copy_hashing(self.storage / "objects" / entry.sha256[:2] / entry.sha256, staging)
        os.chmod(staging, entry.mode)
        os.utime(staging, ns=(entry.mtime_ns, entry.mtime_ns))
        os.replace(staging, target)


class _storage_errors:  # noqa: N801 - used as a context manager, reads like one
    """Turn storage failures into CheckpointError with the fix (full, unmounted, read-only)."""

    def __init__(self, storage: Path, mount: Path) -> None:
        self.storage = storage
        self.mount = mount

    def __enter__(self) -> None:
        if not self.mount.is_dir():
            raise CheckpointError(VM, str(self.storage), f"the storage is not there ({self.mount} is not mounted?)",
                                  "mount it (Colab: drive.mount) or set checkpoint_storage to a folder that exists")

    def __exit__(self, kind: object, error: BaseException | None, traceback: object) -> None:
        if isinstance(error, OSError):
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CheckpointError(VM, str(self.storage), "storage full: the checkpoint was not written (the "
                                      "previous one is intact)", "free space there or checkpoint fewer paths")
            raise CheckpointError(VM, str(self.storage), f"checkpoint failed: {error.strerror or error}",
                                  "check that the storage is mounted and writable") from error


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self._data, self._at = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else self._at + n
        chunk, self._at = self._data[self._at:end], min(end, len(self._data))
        return chunk


def _copy_hashing(source: Path, target: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(source, "rb") as reader, open(target, "wb") as writer:
        while chunk := reader.read(_CHUNK):
            digest.update(chunk)
            writer.write(chunk)
            size += len(chunk)
        writer.flush()
        os.fsync(writer.fileno())
    return digest.hexdigest(), size


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _load_manifest(path: Path) -> Manifest:
    document = json.loads(path.read_text())
    files = {name: Entry(**entry) for name, entry in document["files"].items()}
    return Manifest(str(document["id"]), float(document["created"]), files)


def _new_id() -> str:
    """Sortable by time to the microsecond (checkpoints can follow each other within a second)."""
    now = time.time_ns()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now // 10**9))
    return f"{stamp}.{now // 1000 % 10**6:06d}Z-{secrets.token_hex(2)}"


def _files_below(root: Path) -> Iterator[str]:
    for directory, subdirs, names in os.walk(root):
        subdirs.sort()
        for name in names:
            full = os.path.join(directory, name)
            if os.path.isfile(full) and not os.path.islink(full):
                yield os.path.relpath(full, root).replace(os.sep, "/")


def _matches(path: str, pattern: str) -> bool:
    """'outputs/**' is everything below outputs ('*/outputs/**': below each project's outputs); other patterns are
    fnmatch globs on the relative path."""
    if pattern.endswith("/**"):
        return fnmatch.fnmatchcase(path, pattern[:-2] + "*")
    return fnmatch.fnmatchcase(path, pattern)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return ""


def _inside(root: Path, path: str) -> Path | None:
    if path.startswith("/") or ".." in path.split("/"):
        return None
    return root / path


SETTINGS_FILE = "~/.relaykernel/checkpoint.json"  # the heartbeat cell's settings, for `relaykernel checkpoint`


def save_settings(*, workdir: Path, storage: Path, mount: Path, patterns: Sequence[str]) -> None:
    """Record where the cell checkpoints, so a command run over SSH later finds the same place."""
    document = {"workdir": str(workdir), "storage": str(storage), "mount": str(mount), "patterns": list(patterns)}
    write_private(Path(os.path.expanduser(SETTINGS_FILE)), json.dumps(document))


def from_settings() -> Checkpointer:
    """The Checkpointer the heartbeat cell set up on this VM."""
    try:
        document = json.loads(Path(os.path.expanduser(SETTINGS_FILE)).read_text())
    except (OSError, ValueError):
        raise CheckpointError(VM, SETTINGS_FILE, "no checkpoint settings on this VM",
                              "run the relaykernel cell in the VM's notebook first") from None
    return Checkpointer(workdir=Path(document["workdir"]), storage=Path(document["storage"]),
                        mount=Path(document["mount"]), patterns=document["patterns"])


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m relaykernel.vm.checkpoint now|list|restore [ID]`` on the VM: one JSON line on stdout."""
    args = list(sys.argv[1:] if argv is None else argv)
    action, chosen = (args + [""])[0], (args + ["", ""])[1]
    try:
        saver = from_settings()
        if action == "now":
            made = saver.checkpoint()
            result: dict = {"id": made.id, "files": len(made.files), "copied_bytes": made.copied_bytes}
        elif action == "list":
            result = {"checkpoints": [{"id": m.id, "created": m.created, "files": len(m.files),
                                       "bytes": sum(e.size for e in m.files.values())} for m in saver.manifests()]}
        elif action == "restore":
            report = saver.restore(chosen)
            result = {"restored": report.restored, "kept_newer": report.kept_newer}
        else:
            result = {"error": f"unknown action {action!r}: use now, list or restore [ID]"}
    except CheckpointError as error:
        result = {"error": str(error)}
    print(json.dumps(result))
    return 1 if "error" in result else 0


if __name__ == "__main__":
    raise SystemExit(main())
