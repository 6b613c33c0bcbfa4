"""Write docs/options.md from the traitlets in relaykernel.options; --check fails when it is stale."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from relaykernel.cli.options_args import BY_COMMAND, PROVISIONER
from relaykernel.options import RelayOptions

TARGET = Path(__file__).resolve().parent.parent / "docs" / "options.md"

HEADER = """\
# Options reference

Generated from `relaykernel/options.py` by `scripts/gen_options_doc.py`; do not edit by hand.

Every front (the provisioner that JupyterLab and nbclient run, `relaykernel launch` that VS Code runs, and the other
subcommands) loads options the same way, each later source winning:

1. `jupyter_relaykernel_config.py` (or `.json`) in any Jupyter config directory (`jupyter --paths`):
   `c.RelayOptions.lease_seconds = 1200`;
2. the `RelayOptions` section of the Jupyter server's config (`jupyter_server_config.py`, `jupyter_notebook_config.py`,
   `jupyter_config.py`; inside the server, the server's own config including its command line);
3. the kernelspec's provisioner config (`relaykernel install` writes it):
   `"metadata": {"kernel_provisioner": {"provisioner_name": "relay-provisioner", "config": {"host": "colab"}}}`;
4. command-line flags, generated from the options (`lease_seconds` is `--lease-seconds`): each subcommand offers the
   ones in its column below, with their defaults in `--help`.

An unknown name in any of these is an error that names the closest option; a value of the wrong type is an error
that names the option and the type it takes. `relaykernel --debug COMMAND` prints every option that is not at its
default and where it came from.

"read by": **P** the provisioner (JupyterLab, nbclient, papermill), then the subcommands that offer the option as a
flag (and read it from config files and kernelspecs too).

| option | type | default | read by | what it does |
| --- | --- | --- | --- | --- |
"""


def readers(name: str) -> str:
    """Which fronts read an option: P for the provisioner, then the subcommands."""
    fronts = ["P"] if name in PROVISIONER else []
    fronts += [command for command, names in BY_COMMAND.items() if name in names]
    return ", ".join(fronts) or "—"


def render() -> str:
    rows = []
    for name, trait in sorted(RelayOptions.class_traits(config=True).items()):
        default = trait.default_value_repr()
        kind = type(trait).__name__
        help_text = " ".join(trait.help.split()).replace("|", "\\|")
        rows.append(f"| `{name}` | {kind} | `{default}` | {readers(name)} | {help_text} |")
    return HEADER + "\n".join(rows) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if docs/options.md is not up to date")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET} is stale: run python scripts/gen_options_doc.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
