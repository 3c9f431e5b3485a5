#!/usr/bin/env bash
# The README's test command: install what the tests need on this machine, then run ruff and pytest.
#
# - Debian packages (.ci/apt-packages.txt: the browser, PostgreSQL) are installed when this runs as root or
#   with password-less sudo; otherwise it names the missing ones and their tests skip, saying so.
# - Python packages go into the current interpreter (activate your venv first): requirements-test.txt, and
#   requirements-tensorflow.txt as well on CI (CI=true) or with PICTRACE_TEST_TENSORFLOW=1: a 274 MB wheel,
#   so elsewhere its tests skip, naming that file.
# Extra arguments go to pytest (bash scripts/test.sh -x tests/test_search.py).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

apt_missing=()
if [ -s .ci/apt-packages.txt ] && command -v dpkg >/dev/null; then
  while read -r pkg; do
    dpkg -s "$pkg" >/dev/null 2>&1 || apt_missing+=("$pkg")
  done < <(grep -v '^\s*#' .ci/apt-packages.txt | grep -v '^\s*$')
fi
if [ "${#apt_missing[@]}" -gt 0 ]; then
  as_root=()
  if [ "$(id -u)" -ne 0 ] && sudo -n true 2>/dev/null; then as_root=(sudo -n); fi
  if [ "$(id -u)" -eq 0 ] || [ "${#as_root[@]}" -gt 0 ]; then
    echo "test.sh: installing Debian packages: ${apt_missing[*]}"
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_missing[@]}"
  else
    echo "test.sh: not root and no sudo: their tests will skip. To run them: sudo apt-get install ${apt_missing[*]}"
  fi
fi

python -m pip install -q -r requirements-test.txt
if [ "${PICTRACE_TEST_TENSORFLOW:-0}" = "1" ] || [ "${CI:-}" = "true" ]; then
  python -m pip install -q -r requirements-tensorflow.txt
fi

ruff check .
python -m pytest "$@"
