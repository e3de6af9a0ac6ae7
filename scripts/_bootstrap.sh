# Sourced by scripts/run and scripts/test: find Python >= 3.12, create .venv, install the project (idempotent).
# shellcheck shell=bash
AIBRIDGE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$AIBRIDGE_ROOT/.venv"

_py_ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }

find_python() {
  local c v
  for c in ${AIBRIDGE_PYTHON:-} python3.13 python3.12 python3 python; do
    if command -v "$c" >/dev/null 2>&1 && _py_ok "$c"; then command -v "$c"; return 0; fi
  done
  # pyenv keeps versions that are installed but not active; look at them directly.
  local roots=("${PYENV_ROOT:-$HOME/.pyenv}/versions")
  for v in $(ls -1 "${roots[0]}" 2>/dev/null | grep -E '^3\.(1[2-9]|[2-9][0-9])(\.[0-9]+)?$' | sort -t. -k1,1n -k2,2n -k3,3n -r); do
    c="${roots[0]}/$v/bin/python3"
    if [ -x "$c" ] && _py_ok "$c"; then echo "$c"; return 0; fi
  done
  return 1
}

bootstrap() {
  # $1: pip extras to install ("" for the gateway, "test" for the suite).
  local extras="$1" py hash stamp spec
  if [ ! -x "$VENV/bin/python" ] || ! _py_ok "$VENV/bin/python"; then
    if ! py="$(find_python)"; then
      echo "aibridge needs Python >= 3.12 (none found on PATH or in pyenv)." >&2
      echo "Install one (e.g. 'pyenv install 3.12' or your OS package python3.12) or set AIBRIDGE_PYTHON=/path/to/python3.12." >&2
      exit 1
    fi
    echo "aibridge: creating .venv with $py" >&2
    rm -rf "$VENV"
    "$py" -m venv "$VENV"
  fi
  # Reinstall only when pyproject.toml changed since the last install with these extras.
  hash="$(sha256sum "$AIBRIDGE_ROOT/pyproject.toml" | cut -c1-16)"
  stamp="$VENV/.aibridge-installed${extras:+-$extras}"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$hash" ]; then
    echo "aibridge: installing dependencies into .venv" >&2
    spec="$AIBRIDGE_ROOT"
    [ -n "$extras" ] && spec="$AIBRIDGE_ROOT[$extras]"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$spec" \
      || { echo "aibridge: pip install failed" >&2; exit 1; }
    echo "$hash" > "$stamp"
  fi
}
