"""Write docs/options.md from the traitlets in relaykernel.options; --check fails when it is stale."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from relaykernel.options import RelayOptions

TARGET = Path(__file__).resolve().parent.parent / "docs" / "options.md"

HEADER = """\
# Options reference

Generated from `relaykernel/options.py` by `scripts/gen_options_doc.py`; do not edit by hand.

Set them in three places, the later winning:

- a Jupyter config file (`jupyter_server_config.py`, `jupyter_notebook_config.py`, …):
  `c.RelayOptions.lease_seconds = 1200` (applies to every relay kernel);
- the kernelspec's provisioner config (`relaykernel install` writes it):
  `"metadata": {"kernel_provisioner": {"provisioner_name": "relay-provisioner", "config": {"host": "colab"}}}`;
- the command line of `relaykernel launch` / `doctor` for the flags they list.

| option | type | default | what it does |
| --- | --- | --- | --- |
"""


def render() -> str:
    rows = []
    for name, trait in sorted(RelayOptions.class_traits(config=True).items()):
        default = trait.default_value_repr()
        kind = type(trait).__name__
        help_text = " ".join(trait.help.split()).replace("|", "\\|")
        rows.append(f"| `{name}` | {kind} | `{default}` | {help_text} |")
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
