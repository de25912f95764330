#!/bin/bash
# Fetches everything hw3_1.sh and hw3_2.sh read into the repository's cache/
# (or $HW3_CACHE); afterwards both run offline. The Python steps and the
# places they fill are in hw3_cache.py. Exits non-zero if any step failed.

# The trained Problem 2 checkpoint: a Google Drive file id (fetched with gdown),
# a https://drive.google.com/uc?id=... link (gdown) or any other URL (wget).
# Keep the quotes: an unquoted & breaks a URL.
P2_CKPT_URL=""

status=0

# 1. the Problem 2 checkpoint: into a .part file, checked, then moved into place; a failed download
#    leaves neither the .part file nor an empty cache folder behind
if [ -z "$P2_CKPT_URL" ]; then
    echo "ERROR: P2_CKPT_URL at the top of hw3_download.sh is empty: the trained Problem 2 checkpoint was NOT downloaded" >&2
    status=1
else
    CKPT_PART=$(python3 hw3_cache.py part checkpoint) || exit 1
    if [[ "$P2_CKPT_URL" == http* && "$P2_CKPT_URL" != *drive.google.com* ]]; then
        wget -O "$CKPT_PART" "$P2_CKPT_URL"
    else
        gdown -O "$CKPT_PART" "$P2_CKPT_URL"
    fi && python3 hw3_cache.py install checkpoint || { python3 hw3_cache.py discard checkpoint; status=1; }
fi

# 2. the CLIP models of Problem 1, checked against OpenAI's checksums and converted to plain weights
python3 hw3_cache.py clip || status=1

# 3. the timm encoder of Problem 2 (the one the checkpoint names)
python3 hw3_cache.py encoder || status=1

# GPT-2's vocabulary (encoder.json, vocab.bpe) is part of the repository: nothing to fetch.

if [ "$status" -ne 0 ]; then
    echo "ERROR: hw3_download.sh: some downloads failed (see above)" >&2
fi
exit $status
