"""SSHConfigResolver on temp ssh configs, with ``ssh -G`` and with the paramiko fallback side by side."""

from __future__ import annotations

import os
import pwd
import shutil
import textwrap
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from relaykernel.common.destination import Destination
from relaykernel.common.errors import ConfigError
from relaykernel.ssh import config as ssh_config
from relaykernel.ssh.config import HopSettings, SSHConfigResolver

HAVE_SSH = shutil.which("ssh") is not None
BACKENDS = [
    pytest.param("openssh", marks=pytest.mark.skipif(not HAVE_SSH, reason="OpenSSH client not installed")),
    "paramiko",
]
# OpenSSH expands ~ and %d from the passwd entry, not $HOME; so does the resolver.
LOGIN = pwd.getpwuid(os.getuid())
HOME, ME = LOGIN.pw_dir, LOGIN.pw_name
DEFAULT_KNOWN_HOSTS = (
    f"{HOME}/.ssh/known_hosts",
    f"{HOME}/.ssh/known_hosts2",
    "/etc/ssh/ssh_known_hosts",
    "/etc/ssh/ssh_known_hosts2",
)
MakeResolver = Callable[[str], SSHConfigResolver]


def expected(alias: str, **fields: Any) -> HopSettings:
    """What OpenSSH gives a host with no config besides ``fields``."""
    hostname, port = fields.get("hostname", alias), fields.get("port", 22)
    defaults: dict[str, Any] = {
        "alias": alias,
        "hostname": hostname,
        "port": port,
        "user": ME,
        "identity_files": (),
        "identities_only": False,
        "proxy_jump": None,
        "proxy_command": None,
        "host_key_alias": None,
        "known_hosts_files": DEFAULT_KNOWN_HOSTS,
        "server_alive_interval_seconds": 0.0,
        "server_alive_count_max": 3,
        "connect_timeout_seconds": None,
        "known_hosts_name": hostname if port == 22 else f"[{hostname}]:{port}",
    }
    return HopSettings(**(defaults | fields))


def without_identities(hops: list[HopSettings]) -> list[HopSettings]:
    """Default identity files differ between OpenSSH releases; compare them separately."""
    return [replace(hop, identity_files=()) for hop in hops]


@pytest.fixture(autouse=True)
def foreign_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$HOME points elsewhere: neither backend may read it (OpenSSH uses the passwd entry)."""
    monkeypatch.setenv("HOME", str(tmp_path / "not-home"))


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_resolver(backend: str, tmp_path: Path) -> MakeResolver:
    def make(text: str) -> SSHConfigResolver:
        path = tmp_path / "ssh_config"
        path.write_text(textwrap.dedent(text))
        resolver = SSHConfigResolver(str(path), use_openssh=backend == "openssh")
        assert resolver.backend == backend
        return resolver

    return make


ALIAS_CONFIG = """
    Host relay
        HostName 127.0.0.1
        User relayuser
        Port 2222
        IdentityFile ~/.ssh/relay_key
        IdentityFile %d/keys/%u-%r@%h:%p
        IdentitiesOnly yes
"""


def test_alias_with_hostname_user_port_and_identities(make_resolver: MakeResolver) -> None:
    hop = make_resolver(ALIAS_CONFIG).resolve(Destination.parse("relay"))
    identities = (f"{HOME}/.ssh/relay_key", f"{HOME}/keys/{ME}-relayuser@127.0.0.1:2222")
    assert hop == expected(
        "relay",
        hostname="127.0.0.1",
        port=2222,
        user="relayuser",
        identity_files=identities,
        identities_only=True,
    )
    assert hop.where == "relay (relayuser@127.0.0.1:2222)"


def test_explicit_user_and_port_override_config(make_resolver: MakeResolver) -> None:
    hop = make_resolver(ALIAS_CONFIG).resolve(Destination.parse("bob@relay:2200"))
    assert (hop.user, hop.port, hop.known_hosts_name) == ("bob", 2200, "[127.0.0.1]:2200")
    assert hop.identity_files[1] == f"{HOME}/keys/{ME}-bob@127.0.0.1:2200"


def test_unlisted_host_gets_openssh_defaults(make_resolver: MakeResolver) -> None:
    hop = make_resolver(ALIAS_CONFIG).resolve(Destination.parse("Plain.Example.org"))
    assert without_identities([hop]) == [expected("Plain.Example.org", hostname="plain.example.org")]
    assert {f"{HOME}/.ssh/id_ed25519", f"{HOME}/.ssh/id_rsa"} <= set(hop.identity_files)


def test_hostname_token_and_match(make_resolver: MakeResolver) -> None:
    resolver = make_resolver("""
        Host *.vm
            HostName %h.Internal
        Match originalhost web.vm
            User www
    """)
    hop = resolver.resolve(Destination.parse("web.vm"))
    assert without_identities([hop]) == [expected("web.vm", hostname="web.vm.internal", user="www")]


CHAIN_CONFIG = """
    Host vm
        HostName 10.0.0.5
        ProxyJump first,second
    Host first
        HostName 127.0.0.1
        Port 2201
    Host second
        HostName second.internal
        ProxyCommand should-not-run %h
    Host pc
        HostName pc.internal
        User carol
        Port 2022
        ProxyCommand socat - TCP:%h:%p,user=%r,alias=%n,pct=%%
"""


def test_proxyjump_chain(make_resolver: MakeResolver) -> None:
    hops = without_identities(make_resolver(CHAIN_CONFIG).hops("vm"))
    assert hops == [
        expected("first", hostname="127.0.0.1", port=2201),
        expected("second", hostname="second.internal", proxy_jump="first"),
        expected("vm", hostname="10.0.0.5", proxy_jump="first,second"),
    ]


def test_jump_override(make_resolver: MakeResolver) -> None:
    resolver = make_resolver(CHAIN_CONFIG)
    hops = without_identities(resolver.hops("vm", jump="bob@other:2022"))
    assert hops == [
        expected("other", user="bob", port=2022),
        expected("vm", hostname="10.0.0.5", proxy_jump="bob@other:2022"),
    ]
    assert without_identities(resolver.hops("vm", jump="none")) == [expected("vm", hostname="10.0.0.5")]
    assert [hop.alias for hop in resolver.hops("vm", jump="")] == ["first", "second", "vm"]


def test_proxy_command_tokens(make_resolver: MakeResolver) -> None:
    resolver = make_resolver(CHAIN_CONFIG)
    [hop] = resolver.hops("pc")
    assert hop.proxy_command == "socat - TCP:pc.internal:2022,user=carol,alias=pc,pct=%"
    assert resolver.hops("pc", jump="first")[-1].proxy_command is None


def test_first_of_proxyjump_and_proxycommand_wins(make_resolver: MakeResolver) -> None:
    resolver = make_resolver("""
        Host command-first
            ProxyCommand nc %h %p
            ProxyJump relay
        Host jump-first
            ProxyJump relay
            ProxyCommand nc %h %p
        Host jump-none-first
            ProxyJump none
            ProxyCommand nc %h %p
        Host command-none-first
            ProxyCommand none
            ProxyJump relay
    """)
    settings = {
        name: resolver.resolve(Destination.parse(name))
        for name in ("command-first", "jump-first", "jump-none-first", "command-none-first")
    }
    assert [(hop.proxy_jump, hop.proxy_command) for hop in settings.values()] == [
        (None, "nc command-first 22"),
        ("relay", None),
        (None, "nc jump-none-first 22"),
        (None, None),
    ]


def test_host_key_alias_names_known_hosts_lookup(make_resolver: MakeResolver) -> None:
    hop = make_resolver("Host vm\n  Port 2222\n  HostKeyAlias vm-key\n").resolve(Destination.parse("vm"))
    assert (hop.host_key_alias, hop.known_hosts_name) == ("vm-key", "vm-key")


def test_known_hosts_files_and_keepalive(make_resolver: MakeResolver) -> None:
    hop = make_resolver("""
        Host relay
            UserKnownHostsFile ~/.ssh/relay_known_hosts /tmp/kh/%h_%u
            GlobalKnownHostsFile /etc/relaykernel/known_hosts
            ServerAliveInterval 1m
            ServerAliveCountMax 5
            ConnectTimeout 7
    """).resolve(Destination.parse("relay"))
    files = (f"{HOME}/.ssh/relay_known_hosts", f"/tmp/kh/relay_{ME}", "/etc/relaykernel/known_hosts")
    assert hop.known_hosts_files == files
    assert (hop.server_alive_interval_seconds, hop.server_alive_count_max, hop.connect_timeout_seconds) == (
        60.0,
        5,
        7.0,
    )


def test_include(make_resolver: MakeResolver, tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "10-hosts.conf").write_text(
        "Host relay\n  HostName 127.0.0.1\nHost vm\n  HostName 10.0.0.5\n  ProxyJump relay\n"
    )
    (tmp_path / "conf.d" / "20-ports.conf").write_text("Host relay\n  Port 2222\n")
    (tmp_path / "relay-extra.conf").write_text("IdentityFile ~/.ssh/relay_key\nPort 9999\n")
    resolver = make_resolver(f"""
        Include {tmp_path}/conf.d/*.conf
        ServerAliveInterval 9
        Host relay
            Include {tmp_path}/relay-extra.conf
            User relayuser
    """)
    relay = expected(
        "relay",
        hostname="127.0.0.1",
        port=2222,
        user="relayuser",
        server_alive_interval_seconds=9.0,
        identity_files=(f"{HOME}/.ssh/relay_key",),
    )
    vm = expected("vm", hostname="10.0.0.5", proxy_jump="relay", server_alive_interval_seconds=9.0)
    hops = resolver.hops("vm")
    assert hops[0] == relay and without_identities(hops[1:]) == [vm]


JUMP_ALIAS_CONFIG = """
    Host vm
        ProxyJump relay
    Host relay
        HostName 127.0.0.1
        Port 2222
        ProxyJump bastion
    Host bastion
        HostName bastion.example.org
        User jumper
    Host edge
        ProxyJump not-followed-when-not-first
    Host socket-vm
        ProxyJump socket-relay
    Host socket-relay
        ProxyCommand socat - UNIX-CONNECT:/tmp/relay.sock
"""


def test_jump_alias_follows_its_own_proxyjump(make_resolver: MakeResolver) -> None:
    resolver = make_resolver(JUMP_ALIAS_CONFIG)
    bastion = expected("bastion", hostname="bastion.example.org", user="jumper")
    relay = expected("relay", hostname="127.0.0.1", port=2222, proxy_jump="bastion")
    assert without_identities(resolver.hops("vm")) == [bastion, relay, expected("vm", proxy_jump="relay")]
    assert without_identities(resolver.hops("vm", jump="relay,edge")) == [
        bastion,
        relay,
        expected("edge", proxy_jump="relay"),
        expected("vm", proxy_jump="relay,edge"),
    ]
    first, _ = resolver.hops("socket-vm")
    assert first.proxy_command == "socat - UNIX-CONNECT:/tmp/relay.sock"


@pytest.mark.parametrize(
    "text",
    [
        "Host a\n  ProxyJump b\nHost b\n  ProxyJump a\n",
        "Host *\n  ProxyJump b\n",  # the usual slip: the relay b matches its own wildcard
    ],
)
def test_proxyjump_loop_is_a_config_error(make_resolver: MakeResolver, text: str) -> None:
    with pytest.raises(ConfigError, match=r"loop"):
        make_resolver(text).hops("a")


def test_bad_port_is_a_config_error(make_resolver: MakeResolver) -> None:
    resolver = make_resolver("Host vm\n  Port abc\n")
    with pytest.raises(ConfigError, match=r"(?i)port 'abc'"):
        resolver.resolve(Destination.parse("vm"))


def test_missing_config_file_is_a_config_error(backend: str, tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "config"
    with pytest.raises(ConfigError, match=str(missing)):
        SSHConfigResolver(str(missing), use_openssh=backend == "openssh")


def test_default_config_file(backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    user_config = tmp_path / "user_config"
    monkeypatch.setattr(ssh_config, "user_config_path", lambda: str(user_config))
    empty = SSHConfigResolver(use_openssh=backend == "openssh")
    assert empty.config_file is None and empty.resolve(Destination.parse("relay")).port == 22
    user_config.write_text("Host relay\n  Port 2222\n")
    resolver = SSHConfigResolver(use_openssh=backend == "openssh")
    assert resolver.config_file == str(user_config)
    assert resolver.resolve(Destination.parse("relay")).port == 2222


def test_falls_back_to_paramiko_without_ssh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert SSHConfigResolver(use_openssh=True).backend == "paramiko"


@pytest.mark.skipif(not HAVE_SSH, reason="OpenSSH client not installed")
def test_backends_agree(tmp_path: Path) -> None:
    path = tmp_path / "ssh_config"
    texts = (CHAIN_CONFIG, JUMP_ALIAS_CONFIG, ALIAS_CONFIG)
    path.write_text("\n".join(textwrap.dedent(text) for text in texts))
    openssh = SSHConfigResolver(str(path), use_openssh=True)
    fallback = SSHConfigResolver(str(path), use_openssh=False)
    for target, jump in [("vm", None), ("pc", None), ("socket-vm", None), ("vm", "relay,edge"), ("x", "pc")]:
        assert openssh.hops(target, jump) == fallback.hops(target, jump)
