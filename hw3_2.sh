#!/bin/bash
# Problem 2 (p2_inference.py --help lists its HW3_* settings). Offline by rule: the checkpoint and encoder come from the cache hw3_download.sh fills; the paths go after `--`, so one may begin with `-`.
[ "$#" -eq 3 ] || { echo "usage: bash hw3_2.sh IMG_DIR OUT_JSON DECODER_WEIGHTS (3 arguments, $# given)" >&2; exit 2; }
HF_HUB_OFFLINE=1 python3 p2_inference.py -- "$1" "$2" "$3"
