#!/usr/bin/env python3
"""llama.cpp's prefill and decode throughput on a GGUF, shaped like `agentd bench engine`.

Usage: python3 bench/llamacpp_engine.py MODEL.gguf [--threads N]
Needs llama-cpp-python (pip install llama-cpp-python), which builds llama.cpp from source.
Prints JSON: prefill tokens/s for 128/512/2048-token prompts, decode tokens/s at contexts
0/512/2048 (64 tokens each), load time.
"""
import argparse
import json
import time

import llama_cpp
import numpy as np

TEXT = (
    "The history of computing is a story of abstractions stacked on abstractions. "
    "Early machines were programmed by rewiring panels; later, stored programs made software "
    "a thing of its own. Compilers, operating systems and networks followed, each hiding the "
    'layer below. fn main() { let v: Vec<u32> = (0..10).collect(); println!("{v:?}"); } '
)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=64)
    args = ap.parse_args()

    start = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=args.model, n_ctx=4096, n_batch=512, n_ubatch=512,
        n_threads=args.threads, n_threads_batch=args.threads, verbose=False,
    )
    load = time.perf_counter() - start
    vocab = llm.n_vocab()
    base = llm.tokenize(TEXT.encode(), add_bos=False, special=False)
    tokens = (base * (2200 // len(base) + 1))[:2200]

    llm.reset()
    llm.eval(tokens[:32])  # warm-up

    prefill = []
    for n in (128, 512, 2048):
        llm.reset()
        t = time.perf_counter()
        llm.eval(tokens[:n])
        s = time.perf_counter() - t
        prefill.append({"tokens": n, "seconds": s, "tokens_per_s": n / s})

    decode = []
    for ctx in (0, 512, 2048):
        llm.reset()
        llm.eval(tokens[: max(ctx, 1)])
        tok = tokens[max(ctx, 1) - 1]
        t = time.perf_counter()
        for _ in range(args.decode_tokens):
            llm.eval([tok])
            logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
            tok = int(np.ctypeslib.as_array(logits, shape=(vocab,)).argmax())
        s = time.perf_counter() - t
        decode.append({"context": ctx, "tokens": args.decode_tokens, "seconds": s,
                       "tokens_per_s": args.decode_tokens / s})

    print(json.dumps({"engine": "llama.cpp", "llama_cpp_python": llama_cpp.__version__,
                      "threads": args.threads, "load_seconds": load,
                      "prefill": prefill, "decode": decode}, indent=2))


if __name__ == "__main__":
    main()
