#!/bin/bash
# Fetches everything hw3_1.sh and hw3_2.sh read into the repository's cache/
# (or $HW3_CACHE); afterwards both run offline. The Python steps and the
# places they fill are in hw3_cache.py. Exits non-zero if any step failed.

# The trained Problem 2 checkpoint: a Google Drive file id (fetched with gdown),
# a https://drive.google.com/uc?id=... link (gdown) or any other URL (wget).
# Keep the quotes: an unquoted & breaks a URL.
P2_CKPT_URL=""

status=0

# 1. the Problem 2 checkpoint: into a .part file, checked, then moved into place
CKPT_PART=$(python3 hw3_cache.py part checkpoint) || exit 1
if [ -z "$P2_CKPT_URL" ]; then
    echo "ERROR: P2_CKPT_URL at the top of hw3_download.sh is empty: the trained Problem 2 checkpoint was NOT downloaded" >&2
    status=1
elif [[ "$P2_CKPT_URL" == http* && "$P2_CKPT_URL" != *drive.google.com* ]]; then
    wget -O "$CKPT_PART" "$P2_CKPT_URL" && python3 hw3_cache.py install checkpoint || status=1
else
    gdown -O "$CKPT_PART" "$P2_CKPT_URL" && python3 hw3_cache.py install checkpoint || status=1
fi

# 2. the CLIP models of Problem 1
python3 hw3_cache.py clip || status=1

# 3. the timm encoder of Problem 2 (the one the checkpoint names)
python3 hw3_cache.py encoder || status=1

# 4. GPT-2's vocabulary (OpenAI's public files), unless the tokenizer already finds it
if ! python3 hw3_cache.py has gpt2; then
    ENCODER_PART=$(python3 hw3_cache.py part encoder.json) || exit 1
    VOCAB_PART=$(python3 hw3_cache.py part vocab.bpe) || exit 1
    wget -O "$ENCODER_PART" "https://openaipublic.blob.core.windows.net/gpt-2/models/124M/encoder.json" || status=1
    wget -O "$VOCAB_PART" "https://openaipublic.blob.core.windows.net/gpt-2/models/124M/vocab.bpe" || status=1
    python3 hw3_cache.py install gpt2 || status=1
fi

if [ "$status" -ne 0 ]; then
    echo "ERROR: hw3_download.sh: some downloads failed (see above)" >&2
fi
exit $status
