#!/bin/bash
python3 p1_zeroshot.py "$1" "$2" "$3"
