#!/usr/bin/env bash
# Idempotent developer/CI install of fastdistill into ./.venv.
#
#   1. create .venv (python3 -m venv) if it is missing;
#   2. install the pinned toolchain (CPU torch 2.13.0, triton 3.6.0, numpy<2.4, test tools)
#      unless every pin is already satisfied;
#   3. `pip install --no-build-isolation --no-deps -e .` (builds the optional C++ extension),
#      skipped when nothing that affects the build changed since the last successful install.
#
# Env: FASTDISTILL_REQUIRE_EXT=1 makes a failed extension build an error (CI); PYTHON picks the
# interpreter used to create the venv (default python3); FASTDISTILL_QUIET=1 prints less.
# Never install a bare/unpinned torch: it pulls ~2.6 GB of CUDA wheels (docs/TOOLCHAIN.md).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
export FASTDISTILL_REQUIRE_EXT="${FASTDISTILL_REQUIRE_EXT:-0}"
QUIET="${FASTDISTILL_QUIET:-0}"
say() { [ "$QUIET" = 1 ] || echo "[install.sh] $*"; }

REQS=(torch==2.13.0 "numpy<2.4" triton==3.6.0 pytest pytest-benchmark tqdm pillow ninja
      setuptools wheel)

if [ ! -x "$PY" ]; then
    say "creating $VENV with ${PYTHON:-python3} ($(${PYTHON:-python3} --version 2>&1))"
    "${PYTHON:-python3}" -m venv "$VENV"
else
    say "using existing $VENV ($("$PY" --version 2>&1))"
fi

# Exit 0 when every requirement is installed at an allowed version (pip's own vendored
# `packaging` parses the specifiers, so this works in a fresh venv too).
deps_ok() {
    "$PY" - "$@" <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import PackageNotFoundError, version
from pip._vendor.packaging.requirements import Requirement
for spec in sys.argv[1:]:
    req = Requirement(spec)
    try:
        have = version(req.name)
    except PackageNotFoundError:
        sys.exit(1)
    if not req.specifier.contains(have, prereleases=True):
        sys.exit(1)
PYEOF
}

if deps_ok "${REQS[@]}"; then
    say "pinned dependencies already satisfied"
else
    say "installing pinned dependencies: ${REQS[*]}"
    "$PY" -m pip install --disable-pip-version-check -q "${REQS[@]}"
fi

# Fingerprint of everything that changes the build; the editable install maps the Python source
# directories, so plain .py edits need no reinstall.
fingerprint() {
    {
        "$PY" -c 'import sys; from importlib.metadata import version; print(version("torch"), sys.version)'
        find setup.py pyproject.toml csrc -type f 2>/dev/null | LC_ALL=C sort | xargs sha256sum
        # new packages/subpackages must be registered with the editable finder
        find fastdistill kernels -name __init__.py 2>/dev/null | LC_ALL=C sort
    } | sha256sum | cut -d' ' -f1
}
STAMP="$VENV/.fastdistill-install-stamp"
WANT=$(fingerprint)

installed_here() {
    # fastdistill resolves to this checkout (cheap: no torch import), and when the extension
    # is required its shared library is present (the final probe below imports it).
    "$PY" -I - "$ROOT" >/dev/null 2>&1 <<'PYEOF' || return 1
import importlib.util, os, sys
spec = importlib.util.find_spec("fastdistill")
assert spec is not None
assert os.path.realpath(spec.origin).startswith(os.path.realpath(sys.argv[1]) + os.sep)
PYEOF
    [ "$FASTDISTILL_REQUIRE_EXT" != 1 ] || compgen -G "fastdistill/_C*.so" >/dev/null
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && installed_here; then
    say "fastdistill already installed (editable) and up to date; nothing to build"
else
    say "pip install --no-build-isolation --no-deps -e . (FASTDISTILL_REQUIRE_EXT=$FASTDISTILL_REQUIRE_EXT)"
    start=$(date +%s)
    if [ "$QUIET" = 1 ]; then
        log=$(mktemp)
        if ! "$PY" -m pip install --disable-pip-version-check --no-build-isolation --no-deps -e . >"$log" 2>&1; then
            cat "$log"; rm -f "$log"; exit 1
        fi
        rm -f "$log"
    else
        "$PY" -m pip install --disable-pip-version-check --no-build-isolation --no-deps -e .
    fi
    say "editable install done in $(( $(date +%s) - start )) s"
    fingerprint >"$STAMP"
fi

if "$PY" -c 'import torch, fastdistill._C' >/dev/null 2>&1; then
    say "C++ extension fastdistill._C: loaded"
else
    say "C++ extension fastdistill._C: NOT built (pure-PyTorch reference ops will be used)"
    if [ -f build/fastdistill-ext-status.txt ]; then
        say "  build status: $(cat build/fastdistill-ext-status.txt)"
    fi
    if [ "$FASTDISTILL_REQUIRE_EXT" = 1 ]; then
        echo "[install.sh] FASTDISTILL_REQUIRE_EXT=1 but fastdistill._C does not import" >&2
        exit 1
    fi
fi
