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
      then frames of one tar stream (see Frames), ``0\\n``, and a JSON line {"hashes": {path: sha256}};
      -> {"event": "ack", "bytes": n} after every frame (n: frame bytes read since this process started), then
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
import sys
import zlib

from .sync_files import (
    CHUNK,
    MTIME_NS_HEADER,
    TEMP_SUFFIX,
    Staged,
    extract_in_python,
    extract_with_tar,
    hashes,
    inside,
    listing,
    pack,
    prune_empty_dirs,
)

MANIFESTS = "~/.relaykernel/sync-manifests"
__all__ = ["MTIME_NS_HEADER", "main"]


def reply(event):
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


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
    """The tar stream as frames on stdin, acknowledged as read: ``<n>\\n<n bytes>``, or ``z<n>\\n<n bytes>`` for a
    piece of one zlib stream (the sender compresses on a slow link), ended by ``0\\n``."""

    received = 0  # every frame byte this process has read: acks count from its start, across batches

    def __init__(self, stream):
        self.stream, self.done, self.pending = stream, False, b""
        self.unzip = zlib.decompressobj()

    def read(self, n=-1):
        while not self.pending and not self.done:
            self.pending = self.next_frame()
        size = len(self.pending) if n < 0 else min(n, len(self.pending))
        data, self.pending = self.pending[:size], self.pending[size:]
        return data

    def next_frame(self):
        line = self.stream.readline()
        if not line:
            raise EOFError("the sender went away mid-batch")
        packed = line.startswith(b"z")
        size = int(line[1:] if packed else line)
        if size == 0:
            self.done = True
            return b""
        data = self.stream.read(size)
        if len(data) != size:
            raise EOFError("the sender went away mid-batch")
        Frames.received += size
        reply({"event": "ack", "bytes": Frames.received})
        return self.unzip.decompress(data) if packed else data

    def drain(self):
        while self.read(CHUNK):
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
        hashes = (read_json(stream) or {}).get("hashes", {})
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


def read_json(stream):
    """One JSON line, or ``Z<n>\\n`` and n bytes of zlib-packed JSON (a big request); None at the end of input."""
    line = stream.readline()
    if not line.strip():
        return None
    if line.startswith(b"Z"):
        return json.loads(zlib.decompress(stream.read(int(line[1:]))))
    return json.loads(line)


def main():
    stream, manifests = sys.stdin.buffer, {}
    while True:
        request = read_json(stream)
        if request is None:
            return 0
        if request.get("op") == "pack":
            root = os.path.realpath(os.path.expanduser(request["root"]))
            pack(root, request.get("paths", []), sys.stdout.buffer)
            return 0
        serve(request, stream, manifests)
