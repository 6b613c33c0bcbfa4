"""The VM's side of the sync, file by file (stdlib, py>=3.8): paths kept inside the work dir, listing, hashes,
unpacking a batch beside its targets, packing files to send back."""

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor

TEMP_SUFFIX = ".rk-tmp"
MTIME_NS_HEADER = "RELAYKERNEL.mtime_ns"  # a PAX header: tar's own mtime cannot carry nanoseconds exactly
CHUNK = 1 << 20


def inside(root, path, checked=None):
    """The absolute target of ``path`` under ``root``, or None when it would leave root (``checked`` caches dirs)."""
    if not path or path.startswith("/") or "\0" in path or ".." in path.split("/"):
        return None
    target = os.path.join(root, path)
    directory = os.path.dirname(target)
    if checked is not None and directory in checked:
        return target
    parent = os.path.realpath(directory)
    if parent != root and not parent.startswith(root + os.sep):
        return None
    if checked is not None and os.path.isdir(directory):
        checked.add(directory)
    return target


def listing(root, under=None):
    files = {}
    tops = [root] if under is None else [t for t in (inside(root, d.strip("/")) for d in under) if t]
    for top in tops:
        for directory, subdirs, names in os.walk(top):
            subdirs[:] = [d for d in subdirs
                          if not d.endswith(TEMP_SUFFIX) and not os.path.islink(os.path.join(directory, d))]
            for name in names:
                full = os.path.join(directory, name)
                if name.endswith(TEMP_SUFFIX) or os.path.islink(full):
                    continue
                try:
                    info = os.stat(full)
                except OSError:
                    continue
                files[os.path.relpath(full, root).replace(os.sep, "/")] = [info.st_size, info.st_mtime_ns]
    return files


def hashes(root, paths):
    """path -> sha256 of these files (a missing one is left out), a few at a time: hashlib runs outside the GIL."""
    targets = [(path, inside(root, path)) for path in paths]
    targets = [(path, target) for path, target in targets if target is not None and os.path.isfile(target)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        digests = pool.map(lambda item: sha256_or_none(item[1]), targets)
        return {path: digest for (path, _), digest in zip(targets, digests) if digest}


def sha256_or_none(path):
    try:
        return sha256_of(path)
    except OSError:
        return None


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        for chunk in iter(lambda: source.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def extract_with_tar(tar, root, frames, errors, checked):
    """The VM's tar unpacks into a staging dir beside the files (C speed); (path, staged file) for each file."""
    staged = Staged(tempfile.mkdtemp(prefix=".incoming-", suffix=TEMP_SUFFIX, dir=root), [])
    unpack = subprocess.Popen([tar, "-x", "-f", "-", "-C", staged.staging, "--no-same-owner"],
                              stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        try:
            shutil.copyfileobj(frames, unpack.stdin, CHUNK)
        except BrokenPipeError:
            frames.drain()  # tar gave up (it says why below); the sender's frames are still read and acknowledged
        unpack.stdin.close()
        complaint = unpack.stderr.read().decode(errors="replace").strip()
        if unpack.wait() != 0:
            errors.append(f"tar: {complaint[-300:]}")
    except BaseException:
        unpack.kill()
        unpack.wait()
        staged.cleanup()  # a cut mid-batch leaves nothing behind
        raise
    for directory, _, names in os.walk(staged.staging):
        for name in names:
            full = os.path.join(directory, name)
            path = os.path.relpath(full, staged.staging).replace(os.sep, "/")
            if os.path.isfile(full) and not os.path.islink(full) and inside(root, path, checked):
                os.makedirs(os.path.dirname(os.path.join(root, path)), exist_ok=True)
                staged.append((path, full))
    return staged


def extract_in_python(root, frames, errors, checked):
    """Without a tar binary: tarfile, each member written to a temporary beside its target."""
    staged = Staged(None, [])
    try:
        with tarfile.open(fileobj=frames, mode="r|", bufsize=CHUNK) as archive:
            for member in archive:
                target = inside(root, member.name, checked)
                if target is None or not member.isfile():
                    errors.append(f"refused {member.name!r}: not a plain file inside the work dir")
                    continue
                directory = os.path.dirname(target)
                os.makedirs(directory, exist_ok=True)
                temporary = os.path.join(directory, f".{os.path.basename(target)}.{os.getpid()}{TEMP_SUFFIX}")
                staged.append((member.name, temporary))
                with open(temporary, "wb") as out:
                    shutil.copyfileobj(archive.extractfile(member), out, CHUNK)
                os.chmod(temporary, member.mode & 0o777)
    except BaseException:
        staged.cleanup()
        raise
    return staged


class Staged(list):
    """(path, staged file) pairs; whatever was not renamed into place is removed by cleanup()."""

    def __init__(self, staging, placed):
        super().__init__(placed)
        self.staging = staging

    def cleanup(self):
        if self.staging:
            shutil.rmtree(self.staging, ignore_errors=True)
        for _, staged in self:
            if os.path.exists(staged):
                os.unlink(staged)


def pack(root, paths, stream):
    with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT, bufsize=CHUNK) as archive:
        for path in paths:
            target = inside(root, path)
            if target is None:
                continue
            try:
                with open(target, "rb") as source:
                    info = os.fstat(source.fileno())
                    member = tarfile.TarInfo(path)
                    member.size, member.mode, member.mtime = info.st_size, info.st_mode & 0o777, info.st_mtime
                    member.pax_headers = {MTIME_NS_HEADER: str(info.st_mtime_ns)}
                    archive.addfile(member, Exactly(source, info.st_size))
            except OSError:
                continue
    stream.flush()


class Exactly:
    """Read exactly ``size`` bytes: a file that shrank meanwhile is padded, so the stream stays well-formed."""

    def __init__(self, source, size):
        self.source, self.left = source, size

    def read(self, n=-1):
        n = self.left if n < 0 else min(n, self.left)
        data = self.source.read(n)
        data += b"\0" * (n - len(data))
        self.left -= n
        return data


def prune_empty_dirs(root, directory):
    while directory != root and directory.startswith(root + os.sep):
        try:
            os.rmdir(directory)
        except OSError:
            return
        directory = os.path.dirname(directory)
