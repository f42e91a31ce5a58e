#!/usr/bin/env bash
# Creates .venv/ in the repository root and installs the project into it. Idempotent: a stamp
# file keyed on this script and pyproject.toml makes a second run a no-op.
#   bash scripts/setup.sh          # the runtime stack (the first README command)
#   bash scripts/setup.sh test     # plus the test extras (the second README command)
#   bash scripts/setup.sh docs     # the runtime stack and MkDocs, to build or serve the site in docs/
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3.11}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
key=$(cat scripts/setup.sh pyproject.toml | sha1sum | cut -c1-12)
stamp=".venv/.installed-${key}${extras:+-$extras}"
if [ -f "$stamp" ]; then
  echo "setup: .venv is up to date ($stamp)"; exit 0
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check "$@"; }
pip install -q --upgrade "pip>=24"
# torch/torchvision: the CUDA builds that lie on this machine kind's disk (they run on CPU too).
pip install -q torch==2.14.1 torchvision==0.29.1
# openai-clip (pyiqa's clipiqa) imports pkg_resources; basicsr's setup.py imports torch, so it is
# built against the torch above instead of a second one in an isolated build environment.
pip install -q "setuptools<81" wheel
.venv/bin/python -c "import basicsr" 2>/dev/null || pip install -q --no-build-isolation basicsr==1.4.2
if [ -n "$extras" ]; then pip install -q -e ".[$extras]"; else pip install -q -e .; fi
rm -f .venv/.installed-*
touch "$stamp"
echo "setup: done"
