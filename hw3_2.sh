#!/bin/bash
python3 p2_inference.py "$1" "$2" "$3"
