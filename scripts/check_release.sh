#!/usr/bin/env bash
# Release check: build the sdist and wheel, check their metadata, make sure the wheel ships no test harness, then
# install the wheel alone into a fresh venv and run `relaykernel --version` and `relaykernel demo` from it.
set -euo pipefail
cd "$(dirname "$0")/.."

dist="$(mktemp -d)"
trap 'rm -rf "$dist"' EXIT
.venv/bin/python -m build --outdir "$dist" . >"$dist/build.log" 2>&1 || { cat "$dist/build.log"; exit 1; }
.venv/bin/twine check --strict "$dist"/*.whl "$dist"/*.tar.gz
wheel=("$dist"/*.whl)
if .venv/bin/python -m zipfile -l "${wheel[0]}" | grep -E '(^| )(tests|scripts|\.ci)/'; then
  echo "the wheel ships test or CI files (above): users need none of them" >&2
  exit 1
fi
"${PYTHON:-python3}" -m venv "$dist/venv"
"$dist/venv/bin/python" -m pip install -q --disable-pip-version-check "${wheel[0]}"
version="$("$dist/venv/bin/relaykernel" --version)"
expected="$(.venv/bin/python -c 'import relaykernel; print(relaykernel.__version__)')"
case "$version" in
  *"$expected"*) echo "wheel installs and reports: $version" ;;
  *) echo "relaykernel --version printed '$version', expected $expected" >&2; exit 1 ;;
esac
(cd "$dist" && "$dist/venv/bin/relaykernel" demo)
