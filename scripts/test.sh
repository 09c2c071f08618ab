#!/usr/bin/env bash
# Install (quietly; a no-op when already up to date) and run the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k gd_update -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
FASTDISTILL_QUIET=1 bash scripts/install.sh
exec .venv/bin/python -m pytest -q tests "$@"
