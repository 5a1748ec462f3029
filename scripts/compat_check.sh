#!/usr/bin/env bash
# Run the test suite on another point of the supported range (torch 2.11–2.14, triton 3.6–3.9) on this machine.
#
#   scripts/compat_check.sh TORCH_VERSION [PYTHON] [-- PYTEST_ARGS...]
#   scripts/compat_check.sh 2.11.0 python3.12                 # the GPU image's stack: torch 2.11, triton 3.6
#   TRITON=3.9.0 scripts/compat_check.sh 2.14.1 python3.11    # triton past torch's own pin (installed --no-deps)
#
# One venv per (torch, triton, python) under ${COMPAT_ROOT:-/tmp/tgolf-compat} is made once (needs the network).
# The working tree is copied beside it (without builds), so its CUDA extension is built against that torch and
# nothing in this checkout is touched; ../shared is linked beside the copy for the tests that read shared data.
set -euo pipefail
TORCH=${1:?usage: scripts/compat_check.sh TORCH_VERSION [PYTHON] [-- PYTEST_ARGS...]}
shift
PYTHON=python3
if (($#)) && [[ $1 != -- ]]; then PYTHON=$1; shift; fi
(($#)) && [[ $1 == -- ]] && shift
REPO=$(cd "$(dirname "$0")/.." && pwd)

TAG=$($PYTHON -c 'import sys; print("py%d.%d" % sys.version_info[:2])')
ROOT=${COMPAT_ROOT:-/tmp/tgolf-compat}/torch$TORCH-triton${TRITON:-pinned}-$TAG
if [[ ! -f $ROOT/venv/.complete ]]; then
  rm -rf "$ROOT/venv"
  $PYTHON -m venv "$ROOT/venv"
  "$ROOT/venv/bin/pip" install -q "torch==$TORCH" numpy sentencepiece ninja pybind11 tqdm brotli zstandard \
    matplotlib nvidia-ml-py pytest "setuptools>=70.1"
  if [[ -n ${TRITON:-} ]]; then "$ROOT/venv/bin/pip" install -q --no-deps "triton==$TRITON"; fi
  touch "$ROOT/venv/.complete"
fi
# The working tree as git sees it: tracked and untracked files, nothing git ignores (builds, shards, wheels).
rm -rf "$ROOT/main" && mkdir -p "$ROOT/main"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | tar -cf - --null -T - --ignore-failed-read) |
  tar -xf - -C "$ROOT/main"
[[ -e $REPO/../shared && ! -e $ROOT/shared ]] && ln -s "$(cd "$REPO/../shared" && pwd)" "$ROOT/shared"
cd "$ROOT/main"
"$ROOT/venv/bin/pip" install -q --no-build-isolation --no-deps -e .
"$ROOT/venv/bin/python" -c 'import sys, torch, triton, numpy
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}")'
"$ROOT/venv/bin/python" -m tgolf.info
"$ROOT/venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
