#!/usr/bin/env bash
# The asv suite's discovery and structure (`asv check`) against the bncore that
# PYTHON imports, so that a broken benchmark import cannot land.
#
#   benchmarks/ci_check.sh [PYTHON]      (default: $PYTHON, else python)
#
# bncore must import from that Python outside the source tree: installed
# (editable or not), or on PYTHONPATH after an in-place build, which is handed
# on as an absolute ASV_PYTHONPATH (asv >= 0.6.5 drops PYTHONPATH, and runs
# the suite from another directory). Installs asv when missing.
set -euo pipefail
py=${1:-${PYTHON:-python}}
if [[ $py == */* ]]; then  # a path: keep it valid after the cd below
    py="$(cd "$(dirname "$py")" && pwd)/$(basename "$py")"
fi
if [[ -n "${PYTHONPATH:-}" && -z "${ASV_PYTHONPATH:-}" ]]; then
    abs=()
    IFS=: read -ra parts <<< "$PYTHONPATH"
    for p in "${parts[@]}"; do abs+=("$(cd "$p" && pwd)"); done
    export ASV_PYTHONPATH=$(IFS=:; echo "${abs[*]}")
fi
cd "$(dirname "$0")"
if ! (cd / && PYTHONPATH=${ASV_PYTHONPATH:-} "$py" -c "import bncore"); then
    echo "ci_check: $py cannot import bncore (install it, or build in place and set PYTHONPATH)" >&2
    exit 1
fi
"$py" -m asv --version > /dev/null 2>&1 || "$py" -m pip install -q "asv>=0.6.5"
"$py" -m asv check --python=same
