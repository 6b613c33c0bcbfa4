"""VM-side end of the work-directory sync (stdlib, py>=3.8): list the tree, or apply a batch atomically.

Sent as a script like the supervisor (``python3 -c BOOTSTRAP``, ``<length>\\n<script>`` on stdin). Then one JSON
line, the request:
  {"op": "list", "root": DIR}
      -> {"event": "listing", "root": absolute DIR, "files": {path: [size, mtime_ns]}}
  {"op": "apply", "root": DIR, "delete": [path, ...], "mtimes": {path: mtime_ns}}, then a tar stream of files
      -> {"event": "applied", "written": n, "deleted": n, "errors": [text, ...]}
  {"op": "pack", "root": DIR, "paths": [path, ...]}
      -> a tar stream of those files on stdout (a vanished one is left out), nothing else
Paths are relative and POSIX; one that is absolute, holds "..", or leads out of DIR through a symlink is refused.
Each file is written to a temporary name in its directory and renamed over the old one, with the sender's mtime and
mode, so a reader on the VM sees the old file or the new one, never a part. Deletions run after the writes.
"""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

TEMP_SUFFIX = ".rk-tmp"
MTIME_NS_HEADER = "RELAYKERNEL.mtime_ns"  # a PAX header: tar's own mtime cannot carry nanoseconds exactly


def reply(event):
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def inside(root, path, checked=None):
    """The absolute target of ``path`` under ``root``, or None when it would leave root (``checked`` caches dirs)."""
    if not path or path.startswith("/") or "\\0" in path or ".." in path.split("/"):
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


def listing(root):
    files = {}
    for directory, subdirs, names in os.walk(root):
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


def write_member(archive, member, target, mtime_ns):
    directory = os.path.dirname(target)
    if not os.path.isdir(directory):
        os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".{os.path.basename(target)}.{os.getpid()}{TEMP_SUFFIX}")
    source = archive.extractfile(member)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
            out.flush()
            os.fchmod(out.fileno(), member.mode & 0o777)
            os.utime(out.fileno(), ns=(mtime_ns, mtime_ns))
        os.replace(temporary, target)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def apply(root, request, stream):
    tar = shutil.which("tar")
    if tar and request.get("mtimes"):
        written, errors = extract_with_tar(tar, root, request["mtimes"], stream)
    else:
        written, errors = extract_in_python(root, request.get("mtimes", {}), stream)
    deleted = delete_paths(root, request.get("delete", []), errors)
    return {"event": "applied", "written": written, "deleted": deleted, "errors": errors}


def extract_with_tar(tar, root, mtimes, stream):
    """The VM's tar unpacks into a staging dir beside the files (C speed); each file is then renamed into place."""
    staging = tempfile.mkdtemp(prefix=".incoming-", suffix=TEMP_SUFFIX, dir=root)
    errors, written, checked = [], 0, set()
    try:
        unpack = subprocess.Popen([tar, "-x", "-f", "-", "-C", staging, "--no-same-owner"], stdin=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        shutil.copyfileobj(stream, unpack.stdin, 1 << 20)
        unpack.stdin.close()
        complaint = unpack.stderr.read().decode(errors="replace").strip()
        if unpack.wait() != 0:
            errors.append(f"tar: {complaint[-300:]}")
        for path, mtime_ns in mtimes.items():
            source, target = os.path.join(staging, path), inside(root, path, checked)
            if target is None or not os.path.isfile(source) or os.path.islink(source):
                continue
            try:
                os.utime(source, ns=(int(mtime_ns), int(mtime_ns)))
                directory = os.path.dirname(target)
                if not os.path.isdir(directory):
                    os.makedirs(directory, exist_ok=True)
                os.replace(source, target)
                written += 1
            except OSError as exc:
                errors.append(f"{path}: {exc.strerror or exc}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written, errors


def extract_in_python(root, mtimes, stream):
    """Without a tar binary: tarfile, each member written to a temporary beside its target, then renamed."""
    written, errors, checked = 0, [], set()
    with tarfile.open(fileobj=stream, mode="r|", bufsize=1 << 20) as archive:
        for member in archive:
            target = inside(root, member.name, checked)
            if target is None or not member.isfile():
                errors.append(f"refused {member.name!r}: not a plain file inside the work dir")
                continue
            try:
                write_member(archive, member, target, int(mtimes.get(member.name, int(member.mtime) * 10**9)))
                written += 1
            except OSError as exc:
                errors.append(f"{member.name}: {exc.strerror or exc}")
    return written, errors


def delete_paths(root, paths, errors):
    deleted = 0
    for path in paths:
        target = inside(root, path)
        if target is None:
            errors.append(f"refused to delete {path!r}")
            continue
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
    with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT, bufsize=1 << 20) as archive:
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


def main():
    request = json.loads(sys.stdin.buffer.readline())
    root = os.path.realpath(os.path.expanduser(request["root"]))
    os.makedirs(root, exist_ok=True)
    if request["op"] == "list":
        reply({"event": "listing", "root": root, "files": listing(root)})
    elif request["op"] == "pack":
        pack(root, request.get("paths", []), sys.stdout.buffer)
    else:
        reply(apply(root, request, sys.stdin.buffer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
