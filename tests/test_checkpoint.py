"""The VM-side checkpointer on real filesystems: incremental copies, whole checkpoints, restore, full storage."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import wait_until
from relaykernel.common.errors import CheckpointError
from relaykernel.vm.checkpoint import Checkpointer


def write(root: Path, path: str, data: bytes | str) -> Path:
    target = root / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data.encode() if isinstance(data, str) else data)
    return target


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "drive").mkdir()  # the mounted folder the storage root lives in
    folder = tmp_path / "work"
    write(folder, "outputs/metrics.json", '{"loss": 0.1}')
    write(folder, "outputs/plots/a.png", os.urandom(50_000))
    write(folder, "checkpoints/model.pt", os.urandom(300_000))
    write(folder, "notebook.ipynb", "{}")
    write(folder, "data/raw.csv", "not an output")
    return folder


def test_only_outputs_are_kept_and_unchanged_files_are_not_copied_again(work, tmp_path):
    saver = Checkpointer(workdir=work, storage=tmp_path / "drive" / "project")
    first = saver.checkpoint()
    assert sorted(first.files) == ["checkpoints/model.pt", "outputs/metrics.json", "outputs/plots/a.png"]
    assert first.copied_bytes >= 350_000
    assert saver.checkpoint().copied_bytes == 0, "nothing changed: nothing may be written"
    write(work, "outputs/metrics.json", '{"loss": 0.05}')
    third = saver.checkpoint()
    assert third.copied_bytes == len('{"loss": 0.05}')
    assert len(saver.manifests()) == 2 and saver.latest().id == third.id, "an unchanged checkpoint is not written"


def test_per_project_folders_are_checkpointed_each_with_its_outputs(tmp_path):
    """Kernels run in BASE/NAME-HASH (one folder per laptop project): the cell's patterns reach into each."""
    (tmp_path / "drive").mkdir()
    base = tmp_path / "relaykernel"
    write(base, "projA-1a2b3c4d/outputs/a.txt", "A")
    write(base, "projB-5e6f7a8b/outputs/deep/b.txt", "B")
    write(base, "projB-5e6f7a8b/data/raw.csv", "not an output")
    saver = Checkpointer(workdir=base, storage=tmp_path / "drive" / "work",
                         patterns=["outputs/**", "checkpoints/**", "*/outputs/**", "*/checkpoints/**"])
    assert sorted(saver.checkpoint().files) == ["projA-1a2b3c4d/outputs/a.txt", "projB-5e6f7a8b/outputs/deep/b.txt"]


def test_a_fresh_vm_gets_the_outputs_back_but_never_over_newer_files(work, tmp_path):
    storage = tmp_path / "drive" / "project"
    Checkpointer(workdir=work, storage=storage).checkpoint()
    fresh = tmp_path / "fresh-vm"
    write(fresh, "outputs/metrics.json", "newer, written on the new VM")
    report = Checkpointer(workdir=fresh, storage=storage).restore()
    assert sorted(report.restored) == ["checkpoints/model.pt", "outputs/plots/a.png"]
    assert report.kept_newer == ["outputs/metrics.json"]
    assert (fresh / "outputs/metrics.json").read_text() == "newer, written on the new VM"
    assert tree(fresh / "checkpoints") == tree(work / "checkpoints")
    assert (fresh / "outputs/plots/a.png").stat().st_mtime_ns == (work / "outputs/plots/a.png").stat().st_mtime_ns


def test_many_small_files_go_into_one_pack_and_come_back(tmp_path):
    work = tmp_path / "work"
    for i in range(150):
        write(work, f"outputs/step{i:03}.txt", f"step {i}\n")
    storage = tmp_path / "drive"
    manifest = Checkpointer(workdir=work, storage=storage, pack_min_files=64, mount=tmp_path).checkpoint()
    assert len(list((storage / "packs").glob("*.tar"))) == 1
    assert not list((storage / "objects").glob("*/*")), "small files must not be one object each"
    assert {entry.pack for entry in manifest.files.values()} == {f"{manifest.id}.tar"}
    fresh = tmp_path / "fresh"
    Checkpointer(workdir=fresh, storage=storage, mount=tmp_path).restore()
    assert tree(fresh) == tree(work)


def test_old_checkpoints_are_dropped_with_what_only_they_used(work, tmp_path):
    storage = tmp_path / "drive"
    saver = Checkpointer(workdir=work, storage=storage, keep=2, garbage_grace_seconds=0)
    for i in range(4):
        write(work, "outputs/metrics.json", f'{{"step": {i}}}')
        saver.checkpoint()
    assert len(saver.manifests()) == 2
    referenced = {e.sha256 for m in saver.manifests() for e in m.files.values()}
    assert {p.name for p in (storage / "objects").glob("*/*")} == referenced


def test_unreferenced_objects_get_a_grace_period(work, tmp_path):
    storage = tmp_path / "drive"
    saver = Checkpointer(workdir=work, storage=storage, keep=1)
    for i in range(3):
        write(work, "outputs/metrics.json", f'{{"step": {i}}}')
        saver.checkpoint()
    referenced = {e.sha256 for m in saver.manifests() for e in m.files.values()}
    kept = {p.name for p in (storage / "objects").glob("*/*")}
    assert referenced < kept and len(kept - referenced) == 2, "young unreferenced objects must stay a while"


_CHECKPOINT_LOOP = textwrap.dedent("""
    import hashlib, json, sys, tempfile
    from pathlib import Path
    from relaykernel.vm.checkpoint import Checkpointer
    work, storage, me, rounds = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    saver = Checkpointer(workdir=work, storage=storage, keep=2, garbage_grace_seconds=0, pack_min_files=3)
    checked, failures = 0, []
    for i in range(rounds):
        (work / "outputs" / f"{me}-{i % 4}.txt").write_text(f"{me} round {i}")
        (work / "outputs" / f"{me}-{i}-b.txt").write_text(str(i) * (i + 1))
        made = saver.checkpoint()
        with tempfile.TemporaryDirectory() as fresh:
            try:
                report = Checkpointer(workdir=Path(fresh), storage=storage).restore(made.id)
            except Exception as error:
                failures.append(f"{made.id}: {error}")
                continue
            if report.restored or report.kept_newer:  # else a later run's cleanup already dropped it
                for path, entry in made.files.items():
                    data = (Path(fresh) / path).read_bytes()
                    if hashlib.sha256(data).hexdigest() != entry.sha256:
                        failures.append(f"{made.id}: {path} restored wrong")
                checked += 1
    print(json.dumps({"checked": checked, "failures": failures}))
""")


@pytest.mark.parametrize("rounds", [12, pytest.param(50, marks=pytest.mark.slow)])
def test_two_checkpoints_at_once_never_publish_a_broken_manifest(tmp_path, rounds):
    """The cell's schedule and `relaykernel checkpoint now` at once, many times: every published manifest restores.

    Without the store lock this fails within the first rounds (an object deleted before its manifest is published).
    """
    work, storage = tmp_path / "work", tmp_path / "drive" / "project"
    (work / "outputs").mkdir(parents=True)
    (tmp_path / "drive").mkdir()
    runs = [subprocess.Popen([sys.executable, "-c", _CHECKPOINT_LOOP, str(work), str(storage), name, str(rounds)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("cell", "cli")]
    results = []
    for run in runs:
        out, err = run.communicate(timeout=240)
        assert run.returncode == 0, err
        results.append(json.loads(out))
    assert [r["failures"] for r in results] == [[], []]
    assert all(r["checked"] > 0 for r in results), results
    for manifest in Checkpointer(workdir=work, storage=storage).manifests():
        fresh = tmp_path / f"fresh-{manifest.id}"
        Checkpointer(workdir=fresh, storage=storage).restore(manifest.id)
        assert {p: hashlib.sha256((fresh / p).read_bytes()).hexdigest() for p in manifest.files} == \
            {p: e.sha256 for p, e in manifest.files.items()}


_KILLED_HALF_WAY = textwrap.dedent("""
    import sys
    from pathlib import Path
    from relaykernel.vm.checkpoint import Checkpointer
    Checkpointer(workdir=Path(sys.argv[1]), storage=Path(sys.argv[2])).checkpoint()
""")


def test_sigkill_during_a_big_checkpoint_leaves_the_previous_one_whole(work, tmp_path):
    storage = tmp_path / "drive"
    previous = Checkpointer(workdir=work, storage=storage).checkpoint()
    write(work, "checkpoints/big.pt", os.urandom(200 << 20))
    saver = subprocess.Popen([sys.executable, "-c", _KILLED_HALF_WAY, str(work), str(storage)])
    try:
        def copying() -> bool:
            return any(p.stat().st_size > (10 << 20) for p in (storage / "objects").glob("*.rk-tmp"))

        assert wait_until(copying, 30, 0.01), "the big copy never started"
        saver.send_signal(signal.SIGKILL)
        saver.wait()
    finally:
        saver.kill()
        saver.wait()
    saver_here = Checkpointer(workdir=work, storage=storage)
    assert saver_here.latest().id == previous.id, "a killed checkpoint must not be published"
    for path in (storage / "objects").glob("*/*"):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name, f"torn object {path}"
    fresh = tmp_path / "fresh"
    saver_there = Checkpointer(workdir=fresh, storage=storage)
    saver_there.restore()
    assert tree(fresh) == {k: v for k, v in tree(work).items() if k in previous.files}


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="mounting a small tmpfs needs root")
def test_full_storage_is_a_clear_error_and_keeps_the_previous_checkpoint(work, tmp_path):
    storage_mount = tmp_path / "small"
    storage_mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(storage_mount)], check=True)
    try:
        saver = Checkpointer(workdir=work, storage=storage_mount / "project")
        previous = saver.checkpoint()
        write(work, "checkpoints/too-big.pt", os.urandom(2 << 20))
        started = time.monotonic()
        with pytest.raises(CheckpointError, match="storage full") as caught:
            saver.checkpoint()
        assert time.monotonic() - started < 10
        assert "previous one is intact" in str(caught.value) and "fix:" in str(caught.value)
        assert saver.latest().id == previous.id
    finally:
        subprocess.run(["umount", "-l", str(storage_mount)], check=False)


def test_unmounted_storage_says_so(work, tmp_path):
    with pytest.raises(CheckpointError, match="not mounted"):
        Checkpointer(workdir=work, storage=tmp_path / "MyDrive/relaykernel/project",
                     mount=tmp_path / "MyDrive").checkpoint()
