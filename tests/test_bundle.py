"""The VM side as it travels: one program that runs in a bare interpreter (``python3 -I -S``), Python 3.8 or newer."""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import pytest

from relaykernel import __version__
from relaykernel.bundle import cell_payload, check_syntax, importer_program, vm_modules, vm_program
from relaykernel.common.errors import ConfigError
from relaykernel.common.protocol import BOOTSTRAP, PROTOCOL_VERSION
from relaykernel.common.version import version_mismatch
from topology import VM_USER, ensure_user

RUN_TIMEOUT_SECONDS = 60


def pythons() -> list[str]:
    """This interpreter, and the oldest the VM side claims (3.8) where pyenv or the system has one."""
    oldest = glob.glob("/usr/bin/python3.8") + glob.glob(os.path.expanduser("~/.pyenv/versions/3.8*/bin/python3.8"))
    return [sys.executable, *oldest[:1]]


def run_bootstrapped(python: str, program: bytes, stdin: bytes, tmp_path: Path, user: str = "",
                     args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``python -I -S -c BOOTSTRAP`` fed like an SSH exec channel, in an empty directory with an empty HOME."""
    env = {"HOME": str(tmp_path), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    prefix = []
    if user:  # a non-root VM user (AI Studio's kind): the same program, without root's reach
        account = pwd.getpwnam(user)
        os.chown(tmp_path, account.pw_uid, account.pw_gid)
        prefix = ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--init-groups", "--"]
    return subprocess.run([*prefix, python, "-I", "-S", "-c", BOOTSTRAP, *args],
                          input=b"%d\n" % len(program) + program + stdin, capture_output=True, cwd=tmp_path, env=env,
                          timeout=RUN_TIMEOUT_SECONDS, check=False)


def test_the_bundle_carries_every_vm_and_common_module_and_no_other() -> None:
    names = {module.name for module in vm_modules()}
    package = Path(__file__).parent.parent / "provisioner" / "relaykernel"
    on_disk = {
        "relaykernel." + str(path.relative_to(package).with_suffix("")).replace("/", ".").removesuffix(".__init__")
        for side in ("vm", "common") for path in (package / side).rglob("*.py")
    }
    assert names == on_disk | {"relaykernel"}
    root = next(module for module in vm_modules() if module.name == "relaykernel")
    assert "__version__" not in root.source  # never the laptop's __init__


def test_every_bundled_module_is_python_38_syntax() -> None:
    assert "relaykernel.vm.probe" in check_syntax((3, 8))


def interpreters() -> list[tuple[str, str]]:
    """(python, user): the tests' own and the oldest as the current user; Debian's as the VM user when root."""
    cases = [(python, "") for python in pythons()]
    if os.geteuid() == 0 and shutil.which("setpriv") and os.path.exists("/usr/bin/python3"):
        ensure_user(VM_USER)
        cases.append(("/usr/bin/python3", VM_USER))  # a non-root VM user (AI Studio's kind)
    return cases


@pytest.mark.parametrize("python,user", interpreters())
def test_program_runs_in_a_bare_interpreter(python: str, user: str, tmp_path: Path,
                                            request: pytest.FixtureRequest) -> None:
    if user:  # pytest's tmp folders are root's alone: the user gets one of its own
        tmp_path = Path(tempfile.mkdtemp(prefix="rk-bundle-"))
        request.addfinalizer(lambda: shutil.rmtree(tmp_path, ignore_errors=True))
    work = tmp_path / "work"
    result = run_bootstrapped(python, vm_program("relaykernel.vm.probe"), b"", tmp_path, user, (str(work),))
    assert result.returncode == 0, result.stderr.decode()
    report = json.loads(result.stdout)
    assert report["workdir_error"] is None and report["cell"] is None and work.is_dir()
    assert report["program"] == {"relaykernel": __version__, "protocol": PROTOCOL_VERSION}
    expected = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"], capture_output=True,
                              text=True, check=True, timeout=RUN_TIMEOUT_SECONDS).stdout.strip()
    assert report["python"] == expected


def test_tracebacks_show_the_real_module_and_line(tmp_path: Path) -> None:
    program = importer_program() + (
        b"from relaykernel.common.destination import Destination\n"
        b"try:\n    Destination.parse('')\nexcept Exception:\n    traceback.print_exc()\n"
        b"import relaykernel.ssh\n"
    )
    result = run_bootstrapped(sys.executable, zlib.compress(program), b"", tmp_path)
    stderr = result.stderr.decode()
    assert 'File "relaykernel/common/destination.py", line' in stderr
    assert 'raise ConfigError(f"empty SSH destination' in stderr
    assert "relaykernel.ssh is not part of the VM side of relaykernel" in stderr and result.returncode == 1


def test_a_program_carries_only_what_its_package_can_import() -> None:
    supervisor = zlib.decompress(vm_program("relaykernel.vm.supervisor.main")).decode()
    assert "relaykernel.vm.supervisor.streams" in supervisor and "relaykernel.common.mux" in supervisor
    assert "relaykernel.vm.cell" not in supervisor and "relaykernel.vm.sync_receiver" not in supervisor
    assert len(vm_program("relaykernel.vm.supervisor.main")) < len(vm_program("relaykernel.vm.probe")) / 2


def test_an_unknown_entry_is_refused_on_the_laptop() -> None:
    with pytest.raises(ConfigError, match="not a module of the VM side"):
        vm_program("relaykernel.ssh.chain")


def test_cell_payload_is_one_checked_line_that_installs_the_importer(tmp_path: Path) -> None:
    payload = cell_payload()
    program = zlib.decompress(base64.b64decode(payload.line))
    assert "\n" not in payload.line and hashlib.sha256(program).hexdigest() == payload.sha256
    check = program + b"from relaykernel.vm.platforms import PLATFORMS\nprint(sorted(PLATFORMS))\n"
    result = run_bootstrapped(sys.executable, zlib.compress(check), b"", tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    assert "colab" in result.stdout.decode()


def test_version_mismatch_names_both_versions_and_the_fix() -> None:
    assert version_mismatch("0.3.0", {"relaykernel": "0.3.0", "protocol": PROTOCOL_VERSION}) is None
    assert version_mismatch("0.3.0", None) is None
    older_vm = version_mismatch("0.3.0", {"relaykernel": "0.1.0", "protocol": PROTOCOL_VERSION - 1})
    assert older_vm is not None and "\n" not in older_vm
    assert "0.1.0" in older_vm and "0.3.0" in older_vm and "rerun the cell" in older_vm
    newer_vm = version_mismatch("0.1.0", {"relaykernel": "0.3.0", "protocol": PROTOCOL_VERSION + 1})
    assert newer_vm is not None and "update relaykernel on the laptop to 0.3.0" in newer_vm
