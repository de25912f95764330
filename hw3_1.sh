#!/bin/bash
# Problem 1 (p1_zeroshot.py --help lists its HW3_* settings). Offline by rule: CLIP comes from the cache hw3_download.sh fills; the paths go after `--`, so one may begin with `-`.
[ "$#" -eq 3 ] || { echo "usage: bash hw3_1.sh IMG_DIR ID2LABEL_JSON OUT_CSV (3 arguments, $# given)" >&2; exit 2; }
HF_HUB_OFFLINE=1 python3 p1_zeroshot.py -- "$1" "$2" "$3"
