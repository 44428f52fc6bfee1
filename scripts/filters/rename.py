#!/usr/bin/env python3
"""Rename tensors by regular expression.

Usage: rename.py PATTERN REPLACEMENT

    ckpt-read model.safetensors | scripts/filters/rename.py '^encoder\\.' 'model.encoder.' | ckpt-write out.safetensors

Each name becomes re.sub(PATTERN, REPLACEMENT, name): Python's re syntax, every match
replaced, groups as \\1 or \\g<name>. Names the pattern does not match stay. A rename that
gives two tensors one name is refused (exit 65) before anything is written when the input
has a manifest (ckpt-read always sends one), else when the second of them arrives. Data
passes through untouched: chunks byte for byte, still compressed. Needs only Python.
"""
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))
import ckpt_stream as cs  # noqa: E402


def main():
    if len(sys.argv) != 3:
        sys.stderr.write(__doc__)
        return 64
    try:
        pattern = re.compile(sys.argv[1])
    except re.error as e:
        sys.stderr.write(f"rename.py: bad PATTERN {sys.argv[1]!r}: {e}\n")
        return 64
    replacement = sys.argv[2]
    try:
        pattern.sub(replacement, "")  # a bad group reference fails here, before any input is read
    except (re.error, IndexError) as e:
        sys.stderr.write(f"rename.py: bad REPLACEMENT {replacement!r}: {e}\n")
        return 64
    with cs.Filter(producer="rename.py") as f:
        f.plan(lambda d: d.renamed(pattern.sub(replacement, d.name)))
        for t in f:
            f.forward(t)
    return 0


if __name__ == "__main__":
    cs.run(main, "rename.py")
