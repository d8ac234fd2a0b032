#!/usr/bin/env bash
# Set up a virtual environment in .venv and run the main job or the test suite.
#
#   bash dev.sh main    install, then regenerate every figure into a fresh folder runs/<UTC time>/
#                       (python -m experiments all --quick --fresh; figures/ is the reference)
#   bash dev.sh test    install, then run the whole test suite: python -m pytest
#
# torch is installed first and pinned to 2.13.0 only when no torch is importable: where a CPU
# wheel of that version is provided locally (as on this project's machines) pip takes it
# instead of a CUDA build; elsewhere pip takes the build its index offers for the platform,
# and an older torch (>= 2.1) that is already installed is kept.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
job=${1:-}
case "$job" in main | test) ;; *) echo "usage: bash dev.sh main|test" >&2; exit 2 ;; esac

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
py=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$py" -c "import torch" 2>/dev/null; then
    "$py" -m pip install -q "torch==2.13.0" || "$py" -m pip install -q torch
fi
"$py" -m pip install -q -e ".[test,data]"
# The peer compared in experiments and benchmarks. It declares torchvision (no CPU build for
# this torch, and it would pull another torch), which it does not need for what we use.
"$py" -m pip install -q --no-deps "momentumnet==0.10" \
    || echo "dev.sh: momentumnet not installed; experiments and benchmarks leave that peer out" >&2
"$py" -m pip install -q --no-deps "revlib==1.7.2" "memcnn==1.5.2" \
    || echo "dev.sh: revlib / memcnn not installed; benchmarks/bench_peers.py leaves them out" >&2

case "$job" in
main) exec "$py" -m experiments all --quick --fresh ;;  # a new runs/<UTC time>/; figures/ stays
test) exec "$py" -m pytest ;;
esac
