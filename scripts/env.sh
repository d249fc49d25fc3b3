# Sourced by the scripts: make (or reuse) the project's venv, with every extra and the test tools.
# Re-installs when pyproject.toml changes, so a fresh clone needs nothing else.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TRITONPILOT_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
stamp="$VENV/.tritonpilot-installed"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e "$ROOT[all,test]"
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
