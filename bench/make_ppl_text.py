#!/usr/bin/env python3
"""Writes an English text for perplexity measurements, available on any machine without network.

Usage: python3 bench/make_ppl_text.py OUT.txt [--chars N]

The text is CPython's own reference documentation as bundled in the standard library
(`pydoc_data/topics.py`: the language reference's topics, about 465,000 characters of English
prose with some code), in sorted topic order, so the same Python version always writes the same
file. The default, 100,000 characters, is about 24,000 tokens for a Llama-family BPE vocabulary
(SmolLM2: ~4.2 characters per token on this text): `llama-perplexity -c 512` needs at least
1,024 and scores ~45 chunks of 512. `--chars 0` writes all of it. The cut is at a paragraph
boundary. Prints the file's characters, words and the Python version to stderr.
"""
import argparse
import sys

import pydoc_data.topics


def text(chars):
    topics = pydoc_data.topics.topics
    paragraphs = []
    for key in sorted(topics):
        for p in topics[key].split("\n\n"):
            p = "\n".join(line.rstrip() for line in p.strip("\n").splitlines())
            if p.strip():
                paragraphs.append(p)
    out, n = [], 0
    for p in paragraphs:
        if chars and n >= chars:
            break
        out.append(p)
        n += len(p) + 2
    return "\n\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--chars", type=int, default=100_000,
                    help="stop after about this many characters (0: all)")
    args = ap.parse_args()
    t = text(args.chars)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(t)
    print(f"{args.out}: {len(t)} characters, {len(t.split())} words "
          f"(pydoc_data.topics of Python {sys.version.split()[0]})", file=sys.stderr)


if __name__ == "__main__":
    main()
