#!/usr/bin/env python3
"""agentd vs llama.cpp on the same GGUF, measured in one run, alternating, best of N.

Usage: python3 bench/compare_llamacpp.py [--model PATH] [--runs N] [--agentd target/release/agentd]
Runs `agentd bench engine` and bench/llamacpp_engine.py alternately N times (these machines
are shared and noisy: best-of-N keeps the least disturbed run of each) and prints JSON with
both engines' numbers and agentd/llama.cpp ratios.
"""
import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def best(runs, key):
    out = []
    for i in range(len(runs[0][key])):
        out.append(max(runs, key=lambda r: r[key][i]["tokens_per_s"])[key][i])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--agentd", default=os.path.join(HERE, "..", "target", "release", "agentd"))
    ap.add_argument("--model", default=None)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    model = args.model or subprocess.check_output([args.agentd, "model", "path"], text=True).strip()

    ours, theirs = [], []
    for _ in range(args.runs):
        ours.append(json.loads(subprocess.check_output(
            [args.agentd, "--threads", str(args.threads), "--model", model, "bench", "engine"], text=True)))
        theirs.append(json.loads(subprocess.check_output(
            [sys.executable, os.path.join(HERE, "llamacpp_engine.py"), model, "--threads", str(args.threads)],
            text=True)))
    report = {"model": model, "runs": args.runs, "threads": args.threads}
    for key in ("prefill", "decode"):
        a, b = best(ours, key), best(theirs, key)
        label = "tokens" if key == "prefill" else "context"
        report[key] = [
            {label: x[label], "agentd_tokens_per_s": round(x["tokens_per_s"], 1),
             "llamacpp_tokens_per_s": round(y["tokens_per_s"], 1),
             "ratio": round(x["tokens_per_s"] / y["tokens_per_s"], 2)}
            for x, y in zip(a, b)
        ]
    report["agentd_load_seconds"] = min(r["load_seconds"] for r in ours)
    report["llamacpp_load_seconds"] = min(r["load_seconds"] for r in theirs)
    report["agentd_peak_rss_mib"] = max(r["peak_rss_mib"] or 0 for r in ours)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
