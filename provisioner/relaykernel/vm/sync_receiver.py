"""VM-side end of the work-directory sync (stdlib, py>=3.8): one process serves a kernel's folder request by request.

Sent as a program (``python3 -c BOOTSTRAP``, ``<length>\\n<program>`` on stdin). Then JSON lines, one request each,
answered in order on stdout:
  {"op": "list", "root": DIR, "under": [dir, ...] or null, "source": ID, "sizes": {path: size} or null}
      -> {"event": "listing", "root": absolute DIR, "files": {path: [size, mtime_ns]},
          "manifest": {path: [size, mtime_ns, sha256]},  (only what ID itself wrote, from DIR's manifest)
          "hashes": {path: sha256}}  (files of the sender's size there that the manifest does not vouch for)
  {"op": "hash", "root": DIR, "paths": [path, ...]} -> {"event": "hashes", "hashes": {path: sha256}}
  {"op": "apply", "root": DIR, "source": ID, "mtimes": {path: mtime_ns}, "moves": [[from, to], ...],
   "delete": [path, ...], "adopt": {path: [mtime_ns, sha256]}}
      then frames ``<n>\\n<n bytes>`` of one tar stream, ``0\\n``, and a JSON line {"hashes": {path: sha256}};
      -> {"event": "ack", "bytes": n} after every frame, then
         {"event": "applied", "written": n, "moved": n, "deleted": n, "missing": [to, ...], "errors": [text, ...]}
  {"op": "pack", "root": DIR, "paths": [path, ...]}
      -> a tar stream of those files on stdout (a vanished one is left out), then the process ends
Paths are relative and POSIX; one that is absolute, holds "..", or leads out of DIR through a symlink is refused.
Moves run first, then writes (each file to a temporary beside it, renamed over the old one with the sender's mtime
and mode), then deletions. The manifest (what each source wrote: size, mtime, hash) is kept outside DIR and replaced
whole after each apply, so a later start trusts size and mtime only for files this very source wrote.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor

TEMP_SUFFIX = ".rk-tmp"
MTIME_NS_HEADER = "RELAYKERNEL.mtime_ns"  # a PAX header: tar's own mtime cannot carry nanoseconds exactly
MANIFESTS = "~/.relaykernel/sync-manifests"
_CHUNK = 1 << 20


def reply(event):
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


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
        for chunk in iter(lambda: source.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Manifest:
    """path -> [size, mtime_ns, sha256, source] for every file some source wrote into one root."""

    def __init__(self, root):
        name = hashlib.sha256(root.encode()).hexdigest()[:24] + ".json"
        self.path = os.path.join(os.path.expanduser(MANIFESTS), name)
        try:
            with open(self.path) as source:
                self.entries = json.load(source).get("files", {})
        except (OSError, ValueError):
            self.entries = {}

    def of(self, source):
        return {p: e[:3] for p, e in self.entries.items() if len(e) == 4 and e[3] == source}

    def record(self, path, target, sha, source):
        info = os.stat(target)
        self.entries[path] = [info.st_size, info.st_mtime_ns, sha, source]

    def save(self, root):
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        temporary = self.path + TEMP_SUFFIX
        with open(temporary, "w") as out:
            json.dump({"root": root, "files": self.entries}, out)
        os.replace(temporary, self.path)


class Frames:
    """The tar stream as ``<n>\\n<bytes>`` frames on stdin, acknowledged as read, ended by ``0\\n``."""

    def __init__(self, stream):
        self.stream, self.left, self.total, self.done = stream, 0, 0, False

    def read(self, n=-1):
        while self.left == 0 and not self.done:
            line = self.stream.readline()
            if not line:
                raise EOFError("the sender went away mid-batch")
            self.left = int(line)
            self.done = self.left == 0
        if self.done:
            return b""
        data = self.stream.read(self.left if n < 0 else min(n, self.left))
        if not data:
            raise EOFError("the sender went away mid-batch")
        self.left -= len(data)
        self.total += len(data)
        if self.left == 0:
            reply({"event": "ack", "bytes": self.total})
        return data

    def drain(self):
        while self.read(_CHUNK):
            pass


def apply(root, manifest, request, stream):
    errors, checked, source = [], set(), request.get("source", "")
    moved, missing = move_paths(root, manifest, request.get("moves", []), errors)
    frames = Frames(stream)
    tar = shutil.which("tar")
    mtimes = request.get("mtimes", {})
    if not mtimes:
        placed = Staged(None, [])  # moves, deletes or adoptions only: no archive follows
    elif tar:
        placed = extract_with_tar(tar, root, frames, errors, checked)
    else:
        placed = extract_in_python(root, frames, errors, checked)
    try:
        frames.drain()
        hashes = json.loads(stream.readline()).get("hashes", {})
        written = place(root, manifest, placed, mtimes, hashes, source, errors)
    finally:
        placed.cleanup()
    adopt(root, manifest, request.get("adopt", {}), source)
    deleted = delete_paths(root, manifest, request.get("delete", []), errors)
    manifest.save(root)
    return {"event": "applied", "written": written, "moved": moved, "deleted": deleted, "missing": missing,
            "errors": errors}


def place(root, manifest, placed, mtimes, hashes, source, errors):
    """Rename each staged file over its target with the sender's mtime; record it as the source's."""
    written, checked = 0, set()
    for path, staged in placed:
        target = inside(root, path, checked)
        if target is None or path not in mtimes:
            continue
        try:
            os.utime(staged, ns=(int(mtimes[path]), int(mtimes[path])))
            os.replace(staged, target)
            manifest.record(path, target, hashes.get(path, ""), source)
            written += 1
        except OSError as exc:
            errors.append(f"{path}: {exc.strerror or exc}")
    return written


def move_paths(root, manifest, moves, errors):
    moved, missing = 0, []
    for old, new in moves:
        source, target = inside(root, old), inside(root, new)
        if source is None or target is None or not os.path.isfile(source):
            missing.append(new)
            continue
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(source, target)
        except OSError as exc:
            errors.append(f"{old} -> {new}: {exc.strerror or exc}")
            missing.append(new)
            continue
        if old in manifest.entries:
            manifest.entries[new] = manifest.entries.pop(old)
        prune_empty_dirs(root, os.path.dirname(source))
        moved += 1
    return moved, missing


def adopt(root, manifest, files, source):
    """Files already there with the same content: stamp the sender's mtime and record them as its own."""
    for path, (mtime_ns, sha) in files.items():
        target = inside(root, path)
        try:
            if target is not None and os.path.isfile(target):
                os.utime(target, ns=(int(mtime_ns), int(mtime_ns)))
                manifest.record(path, target, sha, source)
        except OSError:
            continue


def extract_with_tar(tar, root, frames, errors, checked):
    """The VM's tar unpacks into a staging dir beside the files (C speed); (path, staged file) for each file."""
    staged = Staged(tempfile.mkdtemp(prefix=".incoming-", suffix=TEMP_SUFFIX, dir=root), [])
    unpack = subprocess.Popen([tar, "-x", "-f", "-", "-C", staged.staging, "--no-same-owner"],
                              stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        try:
            shutil.copyfileobj(frames, unpack.stdin, _CHUNK)
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
        with tarfile.open(fileobj=frames, mode="r|", bufsize=_CHUNK) as archive:
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
                    shutil.copyfileobj(archive.extractfile(member), out, _CHUNK)
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


def delete_paths(root, manifest, paths, errors):
    deleted = 0
    for path in paths:
        target = inside(root, path)
        if target is None:
            errors.append(f"refused to delete {path!r}")
            continue
        manifest.entries.pop(path, None)
        try:
            os.unlink(target)
            deleted += 1
        except FileNotFoundError:
            pass
        except OSError as exc:
            errors.append(f"{path}: {exc.strerror or exc}")
        prune_empty_dirs(root, os.path.dirname(target))
    return deleted


def pack(root, paths, stream):
    with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT, bufsize=_CHUNK) as archive:
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


def serve(request, stream, manifests):
    root = os.path.realpath(os.path.expanduser(request["root"]))
    os.makedirs(root, exist_ok=True)
    if root not in manifests:
        manifests[root] = Manifest(root)
    manifest, op = manifests[root], request["op"]
    if op == "list":
        files, mine = listing(root, request.get("under")), manifest.of(request.get("source", ""))
        sizes = request.get("sizes") or {}
        unsure = [path for path, size in sizes.items()
                  if path in files and files[path][0] == size and (path not in mine or mine[path][:2] != files[path])]
        reply({"event": "listing", "root": root, "files": files, "manifest": mine, "hashes": hashes(root, unsure)})
    elif op == "hash":
        reply({"event": "hashes", "hashes": hashes(root, request.get("paths", []))})
    elif op == "apply":
        reply(apply(root, manifest, request, stream))
    else:
        reply({"event": "error", "text": f"unknown op {op!r}"})


def main():
    stream, manifests = sys.stdin.buffer, {}
    while True:
        line = stream.readline()
        if not line.strip():
            return 0
        request = json.loads(line)
        if request.get("op") == "pack":
            root = os.path.realpath(os.path.expanduser(request["root"]))
            pack(root, request.get("paths", []), sys.stdout.buffer)
            return 0
        serve(request, stream, manifests)


if __name__ == "__main__":
    sys.exit(main())
