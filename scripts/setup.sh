#!/usr/bin/env bash
# Install what the demo and the tests need on Debian/Ubuntu: OpenSSH (client and server binaries), socat,
# iproute2, nftables (fault tests drop one connection's packets), Debian's python3 with ipykernel (the test VM's
# python), and .venv with relaykernel + test tools.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(openssh-server openssh-client socat iproute2 procps rsync nftables python3-venv python3-ipykernel)
missing=()
for package in "${packages[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  as_root=()
  [ "$(id -u)" -eq 0 ] || as_root=(sudo)
  "${as_root[@]}" apt-get update -qq
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
