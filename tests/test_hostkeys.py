"""KnownHosts verdicts on real known_hosts files, with keys from ssh-keygen and paramiko."""

from __future__ import annotations

import base64
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import paramiko
import pytest

from helpers import VM_ALIAS, environment_without_agent, kernel_manager, relay_config, write_ssh_config
from relaykernel.common.destination import Destination
from relaykernel.common.errors import RELAY, VM, ChangedHostKey, ConfigError, RevokedHostKey, UnknownHostKey
from relaykernel.ssh.hostkeys import KnownHosts, fingerprint, known_hosts_line

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs OpenSSH's ssh-keygen")

WHERE = "vm@127.0.0.1:2222"
Keys = dict[str, paramiko.PKey]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, paramiko.PKey]:
    """An ed25519 key from ssh-keygen (paramiko cannot make one), plus RSA and ECDSA from paramiko."""
    path = tmp_path_factory.mktemp("keys") / "ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return {
        "ed25519": paramiko.Ed25519Key.from_private_key_file(str(path)),
        "other_ed25519": _fresh_ed25519(path.with_name("other")),
        "rsa": paramiko.RSAKey.generate(2048),
        "ecdsa": paramiko.ECDSAKey.generate(),
    }


def _fresh_ed25519(path: Path) -> paramiko.PKey:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return paramiko.Ed25519Key.from_private_key_file(str(path))


def _write(path: Path, *lines: str) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def _key_fields(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.get_base64()}"


def _verify(known: KnownHosts, name: str, key: paramiko.PKey, trust_file: str = "/nonexistent/kh") -> None:
    known.verify(hop=VM, where=WHERE, name=name, key=key, trust_file=trust_file)


@pytest.mark.parametrize("kind", ["ed25519", "rsa", "ecdsa"])
def test_fingerprint_matches_ssh_keygen(kind: str, keys: Keys, tmp_path: Path) -> None:
    key = keys[kind]
    known = _write(tmp_path / "kh", known_hosts_line("vm", key))
    listed = subprocess.run(["ssh-keygen", "-lf", known], capture_output=True, text=True, check=True).stdout
    assert listed.split()[1] == fingerprint(key) == key.fingerprint


def test_known_hosts_line_has_name_type_and_key(keys: Keys) -> None:
    key = keys["ecdsa"]
    assert known_hosts_line("[h]:2", key) == f"[h]:2 ecdsa-sha2-nistp256 {key.get_base64()}"


def test_plain_line_trusts_its_key(keys: Keys, tmp_path: Path) -> None:
    known = KnownHosts([_write(tmp_path / "kh", known_hosts_line("vm.example.org", keys["ed25519"]))])
    _verify(known, "vm.example.org", keys["ed25519"])
    _verify(known, "VM.Example.ORG", keys["ed25519"])


def test_hashed_line_trusts_its_key(keys: Keys, tmp_path: Path) -> None:
    path = _write(tmp_path / "kh", known_hosts_line("[127.0.0.1]:2222", keys["rsa"]))
    subprocess.run(["ssh-keygen", "-H", "-f", path], capture_output=True, check=True)
    assert Path(path).read_text().startswith("|1|")
    known = KnownHosts([path])
    _verify(known, "[127.0.0.1]:2222", keys["rsa"])
    with pytest.raises(UnknownHostKey):
        _verify(known, "127.0.0.1", keys["rsa"])


def test_bracketed_port_is_literal_not_a_character_class(keys: Keys, tmp_path: Path) -> None:
    known = KnownHosts([_write(tmp_path / "kh", known_hosts_line("[vm]:2222", keys["ed25519"]))])
    _verify(known, "[vm]:2222", keys["ed25519"])
    for other in ("vm", "v:2222", "[vm]:22"):
        with pytest.raises(UnknownHostKey):
            _verify(known, other, keys["ed25519"])


def test_comma_lists_wildcards_and_negation(keys: Keys, tmp_path: Path) -> None:
    key = keys["ecdsa"]
    line = known_hosts_line("alpha,*.example.org,!bad.example.org,vm-?", key)
    known = KnownHosts([_write(tmp_path / "kh", line)])
    for name in ("alpha", "a.example.org", "x.y.example.org", "vm-7"):
        _verify(known, name, key)
    for name in ("bad.example.org", "example.org", "vm-10", "beta"):
        with pytest.raises(UnknownHostKey):
            _verify(known, name, key)


def test_stale_line_before_correct_one_in_later_file(keys: Keys, tmp_path: Path) -> None:
    stale = _write(tmp_path / "first", known_hosts_line("vm", keys["other_ed25519"]))
    good_lines = (known_hosts_line("vm", keys["rsa"]), known_hosts_line("vm", keys["ed25519"]))
    good = _write(tmp_path / "second", *good_lines)
    _verify(KnownHosts([stale, good]), "vm", keys["ed25519"])


def test_revoked_key_is_refused_even_when_also_listed(keys: Keys, tmp_path: Path) -> None:
    key = keys["ed25519"]
    path = _write(tmp_path / "kh", known_hosts_line("vm", key), "@revoked * " + _key_fields(key))
    with pytest.raises(RevokedHostKey) as caught:
        _verify(KnownHosts([path]), "vm", key)
    assert caught.value.fingerprint == fingerprint(key)
    assert f"{path}:2" in str(caught.value) and fingerprint(key) in str(caught.value)


def test_revoked_line_for_another_key_does_not_block(keys: Keys, tmp_path: Path) -> None:
    revoked = "@revoked vm " + _key_fields(keys["other_ed25519"])
    path = _write(tmp_path / "kh", revoked, known_hosts_line("vm", keys["ed25519"]))
    _verify(KnownHosts([path]), "vm", keys["ed25519"])


def test_cert_authority_and_odd_lines_are_skipped(keys: Keys, tmp_path: Path) -> None:
    key = keys["ed25519"]
    path = _write(
        tmp_path / "kh",
        "# a comment",
        "@cert-authority *.example.org " + _key_fields(keys["rsa"]),
        "@weird vm ssh-ed25519 AAAA",
        "vm ssh-ed25519 not*base64",
        "just-one-field",
        "vm 1024 35 1234567890",
        known_hosts_line("vm", key),
    )
    known = KnownHosts([path, str(tmp_path / "missing")])
    _verify(known, "vm", key)
    with pytest.raises(UnknownHostKey):
        _verify(known, "ca.example.org", keys["rsa"])


def test_key_types_for_lists_known_types_and_rsa_algorithms(keys: Keys, tmp_path: Path) -> None:
    lines = (known_hosts_line("vm", keys["ecdsa"]), known_hosts_line("vm,relay", keys["rsa"]))
    known = KnownHosts([_write(tmp_path / "kh", *lines)])
    assert known.key_types_for("vm") == ["ecdsa-sha2-nistp256", "rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"]
    assert known.key_types_for("relay") == ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"]
    assert known.key_types_for("nobody") == []


def test_unknown_host_message_and_its_command(keys: Keys, tmp_path: Path) -> None:
    key, trust_file = keys["ed25519"], str(tmp_path / "ssh dir" / "known_hosts")
    with pytest.raises(UnknownHostKey) as caught:
        _verify(KnownHosts([trust_file]), "[127.0.0.1]:2222", key, trust_file)
    error = caught.value
    assert (error.hop, error.where, error.fingerprint) == (VM, WHERE, fingerprint(key))
    assert fingerprint(key) in str(error) and "[127.0.0.1]:2222" in str(error)
    _run_fix(error.fix)
    _verify(KnownHosts([trust_file]), "[127.0.0.1]:2222", key, trust_file)


def test_changed_host_message_and_its_command(keys: Keys, tmp_path: Path) -> None:
    old, new = keys["other_ed25519"], keys["ed25519"]
    keep = known_hosts_line("relay", keys["rsa"])
    trust_file = _write(tmp_path / "known_hosts", keep, known_hosts_line("[vm]:2222", old))
    with pytest.raises(ChangedHostKey) as caught:
        _verify(KnownHosts([trust_file]), "[vm]:2222", new, trust_file)
    message = str(caught.value)
    assert fingerprint(new) in message and f"{trust_file}:2" in message
    assert "recreated" in message and "intercepted" in message and "ssh-keygen -f" in caught.value.fix
    _run_fix(caught.value.fix)
    _verify(KnownHosts([trust_file]), "[vm]:2222", new, trust_file)
    with pytest.raises(ChangedHostKey):
        _verify(KnownHosts([trust_file]), "[vm]:2222", old, trust_file)
    assert keep in Path(trust_file).read_text()


def test_changed_key_held_in_a_read_only_global_file(keys: Keys, tmp_path: Path) -> None:
    global_file = _write(tmp_path / "global", known_hosts_line("vm", keys["rsa"]))
    trust_file = str(tmp_path / "user_known_hosts")
    with pytest.raises(ChangedHostKey) as caught:
        _verify(KnownHosts([trust_file, global_file]), "vm", keys["ed25519"], trust_file)
    _run_fix(caught.value.fix)
    _verify(KnownHosts([trust_file, global_file]), "vm", keys["ed25519"], trust_file)


def test_add_creates_private_file_and_directory(keys: Keys, tmp_path: Path) -> None:
    trust_file = tmp_path / "new" / "known_hosts"
    known = KnownHosts([str(trust_file)])
    known.add("vm", keys["ecdsa"], str(trust_file))
    _verify(known, "vm", keys["ecdsa"])
    assert stat.S_IMODE(os.stat(trust_file.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(trust_file).st_mode) == 0o600
    trust_file.write_text(trust_file.read_text().rstrip("\n"))
    known.add("relay", keys["rsa"], str(trust_file))
    fresh = KnownHosts([str(trust_file)])
    _verify(fresh, "vm", keys["ecdsa"])
    _verify(fresh, "relay", keys["rsa"])


def _run_fix(fix: str) -> None:
    """Run the one command a fix message offers (everything after its last ': ')."""
    command = fix.rsplit(": ", 1)[1]
    subprocess.run(["sh", "-c", command], check=True, capture_output=True)


def test_remove_drops_plain_and_hashed_lines_for_the_name_only(keys: Keys, tmp_path: Path) -> None:
    hashed = _write(tmp_path / "hashed", known_hosts_line("[127.0.0.1]:7423", keys["rsa"]))
    subprocess.run(["ssh-keygen", "-H", "-f", hashed], capture_output=True, check=True)
    lines = [Path(hashed).read_text().strip(), known_hosts_line("[127.0.0.1]:7423", keys["ed25519"]),
             known_hosts_line("relay.example.org", keys["ecdsa"]),
             f"@revoked [127.0.0.1]:7423 {_key_fields(keys['other_ed25519'])}"]
    path = _write(tmp_path / "kh", *lines)
    known = KnownHosts([path])
    assert known.remove("[127.0.0.1]:7423", path) == 2
    assert Path(path).read_text().splitlines() == lines[2:], "other hosts and @revoked lines stay"
    assert stat.S_IMODE(Path(path).stat().st_mode) == 0o600
    with pytest.raises(UnknownHostKey):
        _verify(known, "[127.0.0.1]:7423", keys["ed25519"])


def test_replace_swaps_the_line_in_one_rename(keys: Keys, tmp_path: Path) -> None:
    old, new = keys["other_ed25519"], keys["ed25519"]
    keep = known_hosts_line("relay", keys["rsa"])
    path = _write(tmp_path / "kh", keep, known_hosts_line("[vm]:2222", old))
    known = KnownHosts([path])
    assert known.replace("[vm]:2222", new, path) == 1
    assert Path(path).read_text().splitlines() == [keep, known_hosts_line("[vm]:2222", new)]
    assert stat.S_IMODE(Path(path).stat().st_mode) == 0o600 and not list(tmp_path.glob("*.tmp"))
    _verify(KnownHosts([path]), "[vm]:2222", new)
    with pytest.raises(ChangedHostKey):
        _verify(KnownHosts([path]), "[vm]:2222", old)


def test_replace_leaves_every_file_alone_when_another_file_holds_the_old_key(keys: Keys, tmp_path: Path) -> None:
    user = _write(tmp_path / "user", known_hosts_line("vm", keys["other_ed25519"]))
    global_file = _write(tmp_path / "global", known_hosts_line("vm", keys["rsa"]))
    before = (Path(user).read_bytes(), Path(global_file).read_bytes())
    with pytest.raises(ConfigError, match="global:1 also holds a different key for vm"):
        KnownHosts([user, global_file]).replace("vm", keys["ed25519"], user)
    assert (Path(user).read_bytes(), Path(global_file).read_bytes()) == before


def test_accept_unknown_records_only_hosts_never_pinned(keys: Keys, tmp_path: Path) -> None:
    path = str(tmp_path / "kh")
    KnownHosts([path]).verify(hop=VM, where=WHERE, name="fresh", key=keys["ecdsa"], trust_file=path,
                              accept_unknown=True)
    _verify(KnownHosts([path]), "fresh", keys["ecdsa"])
    _write(tmp_path / "kh", known_hosts_line("vm", keys["ed25519"]))
    _verify(KnownHosts([path]), "vm", keys["ed25519"], path)  # pinned, seen in this run
    _write(tmp_path / "kh")  # its line is removed (a hand edit, an interrupted tool)
    with pytest.raises(UnknownHostKey):
        _verify(KnownHosts([path]), "vm", keys["ed25519"], path)  # strict: no line, no trust
    with pytest.raises(ChangedHostKey, match="held another key for it earlier in this run"):
        KnownHosts([path]).verify(hop=VM, where=WHERE, name="vm", key=keys["rsa"], trust_file=path,
                                  accept_unknown=True)
    assert Path(path).read_text() == ""
    KnownHosts([path]).verify(hop=VM, where=WHERE, name="vm", key=keys["ed25519"], trust_file=path,
                              accept_unknown=True)  # the key it had: still trusted, not written
    assert Path(path).read_text() == ""


def test_a_changed_key_is_never_accepted_as_unknown(keys: Keys, tmp_path: Path) -> None:
    path = _write(tmp_path / "kh", known_hosts_line("vm", keys["other_ed25519"]))
    with pytest.raises(ChangedHostKey):
        KnownHosts([path]).verify(hop=VM, where=WHERE, name="vm", key=keys["ed25519"], trust_file=path,
                                  accept_unknown=True)


def test_changed_key_messages_name_the_hop(keys: Keys, tmp_path: Path) -> None:
    path = _write(tmp_path / "kh", known_hosts_line("[vm]:2222", keys["other_ed25519"]))
    seen = fingerprint(keys["ed25519"])
    with pytest.raises(ChangedHostKey) as relay:
        KnownHosts([path]).verify(hop=RELAY, where="relay.example.org", name="[vm]:2222", key=keys["ed25519"],
                                  trust_file=path)
    assert "recreated" not in str(relay.value) and "regenerated" in relay.value.problem
    assert "administrator" in relay.value.fix and "ssh-keygen -f" in relay.value.fix
    with pytest.raises(ChangedHostKey) as vm:
        KnownHosts([path]).verify(hop=VM, where=WHERE, name="[vm]:2222", key=keys["ed25519"], trust_file=path,
                                  dest="colab")
    assert "recreated" in vm.value.problem and "intercepted" in vm.value.problem
    assert vm.value.fix.endswith(f"relaykernel trust colab --replace --fingerprint {seen}")


def _pinned_to_an_old_key(topology, tmp_path: Path, old: paramiko.PKey) -> tuple[Path, str]:
    """known_hosts holding the relay's real key and an old key for the VM, and an ssh config that uses it."""
    relay_port, vm_port = (Destination.parse(dest).port for dest in (topology.relay, topology.vm))
    lines = Path(topology.known_hosts_file).read_text().splitlines()
    relay_line = next(line for line in lines if line.startswith(f"[127.0.0.1]:{relay_port} "))
    known = Path(_write(tmp_path / "known_hosts", relay_line, known_hosts_line(f"[127.0.0.1]:{vm_port}", old)))
    return known, write_ssh_config(topology, tmp_path, known_hosts=known)


def _trust(config: str, *flags: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "relaykernel", "trust", VM_ALIAS, "--ssh-config", config, *flags]
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, check=False,
                          env=environment_without_agent())


def test_trust_replace_without_confirmation_keeps_the_pin_and_the_next_start_refuses(topology, tmp_path, keys):
    known, config = _pinned_to_an_old_key(topology, tmp_path, keys["other_ed25519"])
    before = known.read_bytes()
    refused = _trust(config, "--replace")  # no --fingerprint, and stdin is not a terminal
    assert refused.returncode != 0 and f"{known} is unchanged" in refused.stderr, refused
    assert known.read_bytes() == before
    for accept in (False, True):
        settings = relay_config(topology, tmp_path, ssh_config_file=config, accept_unknown_host_keys=accept)
        km = kernel_manager(tmp_path / f"accept-{accept}", settings)
        with pytest.raises(ChangedHostKey) as caught:
            km.start_kernel()
        assert "CHANGED" in str(caught.value) and "--replace --fingerprint SHA256:" in caught.value.fix
        assert known.read_bytes() == before, f"accept_unknown_host_keys={accept} changed known_hosts"


def test_trust_replace_with_the_fingerprint_swaps_only_the_vm_line(topology, tmp_path, keys):
    known, config = _pinned_to_an_old_key(topology, tmp_path, keys["other_ed25519"])
    relay_line = known.read_text().splitlines()[0]
    assert _trust(config, "--replace", "--fingerprint", "SHA256:" + "A" * 43).returncode != 0
    vm_port = Destination.parse(topology.vm).port
    vm_line = next(line for line in Path(topology.known_hosts_file).read_text().splitlines()
                   if line.startswith(f"[127.0.0.1]:{vm_port} "))
    real = paramiko.PKey.from_type_string(vm_line.split()[1], base64.b64decode(vm_line.split()[2]))
    replaced = _trust(config, "--replace", "--fingerprint", fingerprint(real))
    assert replaced.returncode == 0 and "trusted" in replaced.stdout, replaced
    assert known.read_text().splitlines() == [relay_line, known_hosts_line(f"[127.0.0.1]:{vm_port}", real)]
