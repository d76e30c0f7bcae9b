#!/usr/bin/env bash
# The test command (README; .ci/run calls it): set-up if needed, then the unit and vLLM tests.
# Fast by default (tiny random models built in the tests); SQPLUS_SLOW=1 adds the real-model tests.
# Extra arguments go to pytest.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh
PY="${SQPLUS_VENV:-$ROOT/.venv}/bin/python"
MARK="not slow and not cuda"
[ "${SQPLUS_SLOW:-0}" = 1 ] && MARK="not cuda"
"$PY" -m pytest -q -m "$MARK" -p no:cacheprovider "$@" tests
