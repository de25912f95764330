#!/bin/bash
# One prepared check on a GPU machine (issues 13, 23): the benchmarks at full size and a CUDA smoke run
# of the real workflow on tiny models, one JSON (bench/gpu_check.py says what each section does).
#
#   bash bench/gpu_check.sh --out DIR              # GPU machine (H100/H200): about 5 minutes, within 8
#   bash bench/gpu_check.sh --small --out DIR      # toy sizes on the CPU: checks that it still runs (CI)
#   bash bench/gpu_check.sh --fetch-wheels         # here, with a package registry: fill .whl/ (see below)
#   bash bench/gpu_check.sh --out DIR --decoder-before bench/decoder_before.py   # also an earlier decoder.py
#                                                  # (git show COMMIT:decoder.py > bench/decoder_before.py, carried)
#
# The GPU machine has no network and its own Python (3.12) with torch but without clip-anytorch, ftfy,
# wcwidth and the graders' timm 0.9.10; setuptools < 81 keeps `import clip` (pkg_resources) working.
# They travel as wheels in .whl/ (git-ignored; the device tool's `carry`), installed here with no index
# into a folder of their own that PYTHONPATH puts first. The GPT-2 vocabulary (encoder.json, vocab.bpe)
# must be findable by tokenizer.py: $HW3_BPE_DIR, the repository root or cache/gpt2 (carry it);
# without it the smoke section fails and the benchmarks use a stand-in vocabulary.
# Exit code 0 when every section ran without error.
set -u
cd "$(dirname "$0")/.." || exit 2
WHEELS=${HW3_WHEELS:-.whl}
SITE=${HW3_WHEEL_SITE:-/tmp/hw3_site}

if [ "${1:-}" = "--fetch-wheels" ]; then
    mkdir -p "$WHEELS" || exit 2
    for spec in clip-anytorch==2.6.0 ftfy==6.3.1 wcwidth==0.2.13 timm==0.9.10 setuptools==80.9.0; do
        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$WHEELS" "$spec" || exit 1
    done
    ls -l "$WHEELS"
    exit 0
fi

small=0
for arg in "$@"; do [ "$arg" = "--small" ] && small=1; done
# The full run installs the carried wheels; --small uses this machine's packages as they are.
if [ "$small" = 0 ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl || { echo "error: installing the wheels in $WHEELS failed" >&2; exit 2; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
exec python3 bench/gpu_check.py "$@"
