#!/usr/bin/env bash
# The mergekit parity suite (tests/test_mergekit_parity.py) with mergekit installed beside the
# project, for a benchmark job: mergekit 0.1.5 and its one extra dependency (immutables) go
# into a separate folder on PYTHONPATH (--no-deps: torch, transformers, pydantic and the rest
# are the project's own), so the project's environment is left as it is.
#   bash benchmarks/mergekit_parity.sh [pytest args...]
# Environment: PYTHON (default: python3), MERGEKIT_DIR (default: /tmp/mergekit-0.1.5).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python3}"
dir="${MERGEKIT_DIR:-/tmp/mergekit-0.1.5}"
if ! PYTHONPATH="$dir" "$py" -c "import mergekit.merge" 2>/dev/null; then
  "$py" -m pip install --quiet --no-deps --target "$dir" "mergekit==0.1.5" "immutables>=0.20"
fi
cd "$here"
PYTHONPATH="$here:$dir${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" \
  "$py" -m pytest tests/test_mergekit_parity.py -v -rs -s "$@"
