#!/usr/bin/env bash
# Install the real clients the client tests drive (tests/test_clients_*.py); idempotent, run by CI.
#   tests/clients/install.sh [python|node|all] [NODE_DIR]
# python: onnxruntime-genai into the project's environment (PYTHON, default .venv/bin/python).
# node:   @huggingface/transformers (transformers.js on onnxruntime-node) into NODE_DIR (default
#         .cache/clients/node, git-ignored). Its CPU binaries ship in the package; the install script only
#         downloads GPU binaries (it fails offline), so it is skipped: ONNXRUNTIME_NODE_INSTALL=skip, --ignore-scripts.
set -euo pipefail
cd "$(dirname "$0")/../.."
what="${1:-all}"
node_dir="${2:-${PERCH_NODE_MODULES:-.cache/clients/node}}"
GENAI_SPEC="${GENAI_SPEC:-onnxruntime-genai==0.18.0}"
TJS_SPEC="${TJS_SPEC:-@huggingface/transformers@4.3.1}"

if [[ "$what" == python || "$what" == all ]]; then
  py="${PYTHON:-.venv/bin/python}"
  [[ -x "$py" ]] || { echo "install.sh: $py not found: run make install first, or set PYTHON" >&2; exit 1; }
  "$py" -c "import onnxruntime_genai" 2>/dev/null || "$py" -m pip install -q "$GENAI_SPEC"
fi
if [[ "$what" == node || "$what" == all ]]; then
  command -v node >/dev/null || { echo "install.sh: node (>= 18) is needed for transformers.js" >&2; exit 1; }
  mkdir -p "$node_dir"
  [[ -f "$node_dir/package.json" ]] || echo '{"private": true}' > "$node_dir/package.json"
  if [[ ! -f "$node_dir/node_modules/@huggingface/transformers/package.json" ]]; then
    (cd "$node_dir" && ONNXRUNTIME_NODE_INSTALL=skip npm install --ignore-scripts --no-audit --no-fund "$TJS_SPEC")
  fi
fi
