"""What build_report.py records in the report PDF for selfcheck.py: the report's gaps.

A report still lacking something (a result file, a value, a notes section, the
student's name) is not ready to hand in. build_report.py lists each gap with
the command or edit that fills it, and stores the list in the PDF itself: the
document's creator is CREATOR and its keywords are the JSON
`{GAPS_KEY: [[what, how to fill it], ...]}` (ASCII, so a plain PDF string).
selfcheck.py reads it back with `read_gaps`, with no PDF library.
"""
from __future__ import annotations

import json
import re

CREATOR = "build_report.py"
GAPS_KEY = "hw3_report_gaps"


def keywords(gaps: list) -> str:
    """The PDF keywords that record `gaps` ([what, how to fill it] pairs)."""
    return json.dumps({GAPS_KEY: [list(gap) for gap in gaps]})


def pdf_string(data: bytes, key: bytes):
    """The literal string value of `/key (...)` in a PDF's bytes (its last occurrence), unescaped; None
    when absent. build_report.py's creator and keywords are plain ASCII strings of the document's info."""
    start = data.rfind(b"/" + key + b" (")
    if start < 0:
        return None
    out, depth, i = bytearray(), 0, start + len(key) + 3
    escapes = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("b"): b"\b", ord("f"): b"\f"}
    while i < len(data):
        c = data[i]
        if c == ord("\\"):
            i += 1
            if data[i:i + 1].isdigit():  # \ddd, octal
                digits = re.match(rb"[0-7]{1,3}", data[i:i + 3]).group()
                out.append(int(digits, 8))
                i += len(digits)
                continue
            out += escapes.get(data[i], b"" if data[i] in b"\r\n" else data[i:i + 1])
        elif c == ord(")") and depth == 0:
            return out.decode("latin-1")
        else:
            depth += (c == ord("(")) - (c == ord(")"))
            out.append(c)
        i += 1
    return None


def read_gaps(path: str):
    """[(what, how to fill it)] that build_report.py recorded in the PDF at `path`, or None when
    another program made the PDF (or an older build_report.py, which recorded none)."""
    with open(path, "rb") as f:
        data = f.read()
    if pdf_string(data, b"Creator") != CREATOR:
        return None
    try:
        return [tuple(gap) for gap in json.loads(pdf_string(data, b"Keywords") or "")[GAPS_KEY]]
    except (ValueError, KeyError, TypeError):
        return None
