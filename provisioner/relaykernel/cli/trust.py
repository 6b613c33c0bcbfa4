"""``relaykernel trust DEST``: pin the VM's host key, seen through the relay, in the known_hosts ssh config names."""

from __future__ import annotations

import argparse
import sys

from ..common.errors import VM, ChangedHostKey, ConfigError, HostKeyError, UnknownHostKey
from ..options import RelayOptions
from ..relayed import build_chain
from ..ssh.hostkeys import KnownHosts, fingerprint
from .options_args import add_flags, options_for


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("trust", help="trust the VM's host key (the heartbeat cell prints the command)")
    parser.add_argument("host", metavar="DEST", help=RelayOptions.class_traits()["host"].help)
    parser.add_argument("--fingerprint", help="the SHA256:… fingerprint the VM's cell printed; trust only that key")
    parser.add_argument("--replace", action="store_true", help="replace a key known_hosts already holds for DEST")
    add_flags(parser, "trust")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    options = options_for(args, "trust", host=args.host)
    chain = build_chain(options)
    try:
        key = chain.fetch_vm_host_key()
    finally:
        chain.close()
    hop = chain.hops[-1]
    seen = fingerprint(key)
    if args.fingerprint and args.fingerprint.strip() != seen:
        raise HostKeyError(VM, chain.vm_label, f"presents {seen}, not the {args.fingerprint} you expected",
                           "do not trust it: check the fingerprint the VM's cell printed", fingerprint=seen)
    trust_file = hop.known_hosts_files[0] if hop.known_hosts_files else "~/.ssh/known_hosts"
    known = KnownHosts(hop.known_hosts_files)
    try:
        known.verify(hop=VM, where=chain.vm_label, name=hop.known_hosts_name, key=key, trust_file=trust_file,
                     dest=args.host)
        print(f"{hop.known_hosts_name} is already trusted with {seen}")
        return 0
    except UnknownHostKey:
        replacing = False
    except ChangedHostKey:
        if not args.replace:
            raise
        replacing = True
    # Nothing is written before the new key is confirmed: a refusal leaves known_hosts byte for byte as it was.
    if not args.fingerprint and not _confirmed(hop.known_hosts_name, seen):
        raise ConfigError(f"not trusted, {trust_file} is unchanged: run again with --fingerprint SHA256:… as the "
                          "VM's cell printed it (or from a terminal, to confirm it there)")
    if replacing:
        known.replace(hop.known_hosts_name, key, trust_file)
    else:
        known.add(hop.known_hosts_name, key, trust_file)
    print(f"trusted {seen} for {hop.known_hosts_name} in {trust_file}")
    return 0


def _confirmed(name: str, seen: str) -> bool:
    if not sys.stdin.isatty():
        return False
    answer = input(f"{name} presents {seen}. Is that the fingerprint the VM's cell printed? [y/N] ")
    return answer.strip().lower() in ("y", "yes")
