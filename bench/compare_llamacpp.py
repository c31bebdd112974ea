#!/usr/bin/env python3
"""agentd vs llama.cpp on the same GGUF files, side by side: one run, engines alternated, best of N.

Usage:
  python3 bench/compare_llamacpp.py [--model F.gguf ...] [--runs N] [--threads 2]
      [--agentd target/release/agentd] [--llamacpp-bin /work/llamacpp-bin]
      [--make-quants DIR] [--perplexity TEXT] [--ttft] [--json-out FILE]

For each model file (`--model`, repeatable; default: `agentd model path`):
- throughput: `agentd --threads T --model F bench engine` (prefill of 128/512/2048-token prompts,
  decode of 64 tokens at contexts 0/512/2048) against llama.cpp's `llama-bench -o json`
  (`-p 128,512,2048 -n 0` for prefill, `-n 64 -p 0 -d 0,512,2048` for decode at a depth; a
  llama-bench without `-d` falls back to bench/llamacpp_engine.py, which needs llama-cpp-python).
  The engines alternate N times and the best run of each counts (the machines are shared and
  noisy); ratios are agentd / llama.cpp (above 1: agentd faster).
- memory: the file size, agentd's peak RSS right after load (`peak_rss_mib_after_load`) and the
  bound 1.15 x file size + KV pool (`kv_pool_bytes`, the largest pool the benchmark allocated)
  + 64 MiB, pass or fail.
- `--make-quants DIR`: from the default (Q4_1) file, Q4_K_M, Q6_K and Q8_0 requantisations by
  `agentd model quantize` (llama-quantize --allow-requantize when agentd lacks it, noted in the
  report) and llama.cpp's own Q4_0 and Q8_0 files (llama-quantize --allow-requantize), all
  compared too. Existing files in DIR are reused.
- `--perplexity TEXT`: `agentd bench perplexity --file TEXT` against
  `llama-perplexity -f TEXT -c 512`; make TEXT with bench/make_ppl_text.py.
- `--ttft`: time to first token of a short chat prompt (~20 tokens): `agentd generate
  --max-tokens 1 --stats` (through the scheduler, in process; its `prefill_seconds`) against
  llama-server on loopback (`-t T -c 4096`, POST /completion, n_predict 1, cache_prompt false,
  the same chat template applied by the server's /apply-template), best of N; plus the daemon's
  own socket overhead from `agentd bench serve`.

Prints markdown tables, then one JSON report (also written to --json-out).
"""
import argparse
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MIB = 1024 * 1024
PREFILL = (128, 512, 2048)
DECODE = (0, 512, 2048)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def run(cmd, timeout=3600, check=True):
    """Runs `cmd`; returns (rc, stdout, stderr)."""
    log("  $", " ".join(cmd))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited {p.returncode}: {p.stderr.strip()[-2000:]}")
    return p.returncode, p.stdout, p.stderr


def parse_json(text, want=dict):
    """The last JSON value of type `want` in `text` (logs around it are skipped)."""
    dec = json.JSONDecoder()
    found = None
    i = 0
    while i < len(text):
        if text[i] in "{[":
            try:
                val, end = dec.raw_decode(text, i)
            except ValueError:
                i += 1
                continue
            if isinstance(val, want):
                found = val
            i = end
        else:
            i += 1
    return found


def rnd(x, n=1):
    return None if x is None else round(x, n)


def ratio(a, b):
    return round(a / b, 2) if a and b else None


# ---------------------------------------------------------------- agentd


class Agentd:
    def __init__(self, path, threads):
        self.path = path
        self.threads = threads

    def cmd(self, model, *rest):
        return [self.path, "--threads", str(self.threads), "--model", model, *rest]

    def default_model(self):
        return run([self.path, "model", "path"])[1].strip()

    def has(self, *sub):
        rc, out, err = run([self.path, *sub, "--help"], check=False, timeout=60)
        return rc == 0

    def engine(self, model):
        _, out, _ = run(self.cmd(model, "bench", "engine", "--decode-batches", "1",
                                 "--prefill", ",".join(map(str, PREFILL)),
                                 "--decode-contexts", ",".join(map(str, DECODE))))
        rep = parse_json(out)
        if rep is None:
            raise RuntimeError("agentd bench engine printed no JSON object")
        return rep

    def perplexity(self, model, text):
        rc, out, err = run(self.cmd(model, "bench", "perplexity", "--file", text), check=False)
        rep = parse_json(out)
        if rc != 0 or rep is None:
            return {"error": f"agentd bench perplexity: exit {rc}: {(err or out).strip()[-500:]}"}
        return rep

    def generate_ttft(self, model, prompt):
        rc, out, err = run(self.cmd(model, "generate", "--max-tokens", "1", "--temperature", "0",
                                    "--stats", prompt), check=False)
        stats = parse_json(err)
        if rc != 0 or stats is None or "prefill_seconds" not in stats:
            raise RuntimeError(f"agentd generate --stats: exit {rc}: {err.strip()[-500:]}")
        return stats

    def serve_overhead(self, model, iterations):
        rc, out, err = run(self.cmd(model, "bench", "serve", "--iterations", str(iterations)),
                           check=False)
        rep = parse_json(out)
        return rep if rc == 0 and rep else {"error": f"exit {rc}: {err.strip()[-300:]}"}


# ---------------------------------------------------------------- llama.cpp


class LlamaCpp:
    def __init__(self, bindir, threads):
        self.bindir = bindir
        self.threads = threads
        self.version = None

    def bin(self, name):
        p = os.path.join(self.bindir, name)
        if not os.access(p, os.X_OK):
            found = shutil.which(name)
            if not found:
                raise RuntimeError(f"{name} not found in {self.bindir} or on PATH")
            p = found
        return p

    def bench_has_depth(self):
        _, out, err = run([self.bin("llama-bench"), "--help"], check=False, timeout=60)
        return "--n-depth" in out + err

    def bench(self, model, args):
        _, out, _ = run([self.bin("llama-bench"), "-m", model, "-t", str(self.threads),
                         "-r", "1", "-o", "json", *args])
        rows = parse_json(out, list)
        if not rows:
            raise RuntimeError("llama-bench printed no JSON list")
        if self.version is None:
            r = rows[0]
            self.version = {"build_commit": r.get("build_commit"),
                            "build_number": r.get("build_number"),
                            "cpu_info": r.get("cpu_info"), "backends": r.get("backends"),
                            "type_k": r.get("type_k"), "type_v": r.get("type_v"),
                            "flash_attn": r.get("flash_attn"), "n_batch": r.get("n_batch"),
                            "n_ubatch": r.get("n_ubatch")}
        return rows

    def prefill(self, model):
        rows = self.bench(model, ["-p", ",".join(map(str, PREFILL)), "-n", "0"])
        by = {r["n_prompt"]: r["avg_ts"] for r in rows if r.get("n_gen", 0) == 0}
        return [{"tokens": n, "tokens_per_s": by.get(n)} for n in PREFILL]

    def decode(self, model, tokens=64):
        rows = self.bench(model, ["-n", str(tokens), "-p", "0",
                                  "-d", ",".join(map(str, DECODE))])
        by = {r.get("n_depth", 0): r["avg_ts"] for r in rows if r.get("n_prompt", 0) == 0}
        return [{"context": c, "tokens_per_s": by.get(c)} for c in DECODE]

    def decode_python(self, model):
        """llama-cpp-python via bench/llamacpp_engine.py (a llama-bench without -d)."""
        _, out, _ = run([sys.executable, os.path.join(HERE, "llamacpp_engine.py"), model,
                         "--threads", str(self.threads)])
        rep = parse_json(out)
        return [{"context": d["context"], "tokens_per_s": d["tokens_per_s"]}
                for d in rep["decode"]]

    def quantize(self, src, dst, qtype):
        run([self.bin("llama-quantize"), "--allow-requantize", src, dst, qtype,
             str(self.threads)])

    def perplexity(self, model, text, ctx=512):
        rc, out, err = run([self.bin("llama-perplexity"), "-m", model, "-f", text,
                            "-c", str(ctx), "-t", str(self.threads)], check=False)
        both = out + "\n" + err
        m = re.search(r"Final estimate: PPL = ([0-9.]+)(?: \+/- ([0-9.]+))?", both)
        if rc != 0 or not m:
            return {"error": f"llama-perplexity: exit {rc}: {both.strip()[-500:]}"}
        chunks = re.search(r"calculating perplexity over (\d+) chunks", both)
        return {"perplexity": float(m.group(1)),
                "stderr": float(m.group(2)) if m.group(2) else None, "context": ctx,
                "chunks": int(chunks.group(1)) if chunks else None}


class LlamaServer:
    """llama-server on a free loopback port, for the life of a `with` block."""

    def __init__(self, llama, model, ctx=4096):
        self.cmd = [llama.bin("llama-server"), "-m", model, "-t", str(llama.threads),
                    "-tb", str(llama.threads), "-c", str(ctx), "--host", "127.0.0.1",
                    "--port", None, "-np", "1"]

    def __enter__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.cmd[self.cmd.index(None)] = str(self.port)
        log("  $", " ".join(self.cmd))
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError("llama-server exited: " + self.log.read().decode()[-1000:])
            try:
                status, _ = self.request("GET", "/health")
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError("llama-server did not become healthy")

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def request(self, method, path, body=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        try:
            conn.request(method, path, body=json.dumps(body) if body is not None else None,
                         headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            data = r.read()
            return r.status, (json.loads(data) if data else None)
        finally:
            conn.close()


# ---------------------------------------------------------------- measurements


def best(values):
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def compare_engine(agentd, llama, model, runs, use_depth):
    ours, pre, dec = [], [], []
    for i in range(runs):
        log(f"[{os.path.basename(model)}] run {i + 1}/{runs}")
        ours.append(agentd.engine(model))
        pre.append(llama.prefill(model))
        dec.append(llama.decode(model) if use_depth else llama.decode_python(model))
    out = {"prefill": [], "decode": []}
    for k, n in enumerate(PREFILL):
        a = best(next((p["tokens_per_s"] for p in r.get("prefill", []) if p.get("tokens") == n),
                      None) for r in ours)
        b = best(p[k]["tokens_per_s"] for p in pre)
        out["prefill"].append({"tokens": n, "agentd_tokens_per_s": rnd(a),
                               "llamacpp_tokens_per_s": rnd(b), "ratio": ratio(a, b)})
    for k, c in enumerate(DECODE):
        a = best(next((d["tokens_per_s"] for d in r.get("decode", []) if d.get("context") == c),
                      None) for r in ours)
        b = best(d[k]["tokens_per_s"] for d in dec)
        out["decode"].append({"context": c, "agentd_tokens_per_s": rnd(a),
                              "llamacpp_tokens_per_s": rnd(b), "ratio": ratio(a, b)})
    out["agentd_batched_decode"] = [
        {"batch": b["batch"], "context": b.get("context"),
         "tokens_per_s": rnd(best(next((x["tokens_per_s"] for x in r.get("batched_decode", [])
                                        if x.get("batch") == b["batch"]), None) for r in ours))}
        for b in ours[0].get("batched_decode", [])]
    out["agentd_load_seconds"] = rnd(min(r.get("load_seconds", 0) for r in ours), 3)
    out["agentd_avx2"] = ours[0].get("avx2")
    out["memory"] = memory(model, ours)
    return out


def memory(model, ours):
    file_bytes = ours[0].get("file_bytes") or os.path.getsize(model)
    after = [r.get("peak_rss_mib_after_load") for r in ours]
    after = max(after) if None not in after else None
    kv = max(r.get("kv_pool_bytes") or 0 for r in ours)
    end = max((r.get("peak_rss_mib") or 0) for r in ours) or None
    bound = (1.15 * file_bytes + kv + 64 * MIB) / MIB
    m = {"file_bytes": file_bytes, "file_mib": rnd(file_bytes / MIB),
         "weight_bytes": ours[0].get("weight_bytes"), "kv_pool_bytes": kv,
         "peak_rss_mib_after_load": rnd(after), "peak_rss_mib_end": rnd(end),
         "bound_mib": rnd(bound), "bound": "1.15 x file + KV pool + 64 MiB",
         "after_load_within_bound": None if after is None else after <= bound,
         "end_within_bound": None if end is None else end <= bound}
    if after is None:
        m["note"] = "this agentd's bench engine does not report peak_rss_mib_after_load"
    return m


def compare_perplexity(agentd, llama, model, text):
    log(f"[{os.path.basename(model)}] perplexity on {text}")
    a = agentd.perplexity(model, text)
    b = llama.perplexity(model, text)
    pa, pb = a.get("perplexity"), b.get("perplexity")
    return {"agentd": a, "llamacpp": b,
            "relative_difference": round((pa - pb) / pb, 4) if pa and pb else None}


def compare_ttft(agentd, llama, model, runs, user):
    log(f"[{os.path.basename(model)}] TTFT")
    a_ttft, a_tokens, s_wall, s_prompt_ms, s_tokens = [], None, [], [], None
    with LlamaServer(llama, model) as srv:
        status, tmpl = srv.request("POST", "/apply-template",
                                   {"messages": [{"role": "user", "content": user}]})
        prompt = tmpl.get("prompt") if status == 200 and tmpl else None
        if prompt is None:
            prompt = user
        body = {"prompt": prompt, "n_predict": 1, "cache_prompt": False, "temperature": 0}
        srv.request("POST", "/completion", body)  # warm-up
        for _ in range(runs):
            t = time.perf_counter()
            status, rep = srv.request("POST", "/completion", body)
            wall = time.perf_counter() - t
            if status != 200:
                raise RuntimeError(f"llama-server /completion: HTTP {status}: {rep}")
            s_wall.append(wall * 1e3)
            timings = rep.get("timings", {})
            s_prompt_ms.append(timings.get("prompt_ms"))
            s_tokens = timings.get("prompt_n", rep.get("tokens_evaluated"))
            st = agentd.generate_ttft(model, user)
            a_ttft.append(st["prefill_seconds"] * 1e3)
            a_tokens = st.get("prompt_tokens")
    serve = agentd.serve_overhead(model, 20)
    a = min(a_ttft)
    over = serve.get("overhead_p50_ms")
    return {
        "user_message": user, "runs": runs,
        "agentd_prompt_tokens": a_tokens, "llamacpp_prompt_tokens": s_tokens,
        "agentd_ttft_ms": rnd(a, 2),
        "agentd_daemon_overhead_p50_ms": rnd(over, 2),
        "agentd_ttft_via_daemon_estimate_ms": rnd(a + over, 2) if over is not None else None,
        "llamacpp_server_wall_ms": rnd(min(s_wall), 2),
        "llamacpp_server_prompt_ms": rnd(min((x for x in s_prompt_ms if x is not None),
                                             default=None), 2),
        # llama.cpp's time over agentd's: above 1, agentd answers first (as the speed ratios).
        "ratio_llamacpp_wall_over_agentd": ratio(min(s_wall), a + (over or 0)),
        "how": "agentd: `agentd generate --max-tokens 1 --stats` prefill_seconds (scheduler, in "
               "process, no socket) + `agentd bench serve` median socket overhead; llama.cpp: "
               "client wall time of POST /completion (n_predict 1, cache_prompt false) to "
               "llama-server on loopback, and the server's own timings.prompt_ms",
    }


def make_quants(agentd, llama, src, outdir, notes):
    os.makedirs(outdir, exist_ok=True)
    stem = os.path.basename(src).rsplit(".", 2)[0] if src.count(".") >= 2 else \
        os.path.splitext(os.path.basename(src))[0]
    have_agentd_q = agentd.has("model", "quantize")
    if not have_agentd_q:
        notes.append("`agentd model quantize` is missing: the 'agentd' Q4_K_M/Q6_K/Q8_0 files "
                     "were made by llama-quantize --allow-requantize instead")
    files = []
    for t in ("q4_k_m", "q6_k", "q8_0"):
        dst = os.path.join(outdir, f"{stem}.agentd-{t.upper()}.gguf")
        if not os.path.exists(dst):
            tmp = dst + ".part"
            if have_agentd_q:
                run([agentd.path, "--threads", str(agentd.threads), "model", "quantize", src, tmp,
                     "--type", t])
            else:
                llama.quantize(src, tmp, t.upper())
            os.replace(tmp, dst)
        files.append({"path": dst, "made_by": "agentd model quantize" if have_agentd_q
                      else "llama-quantize (fallback)", "from": src, "type": t.upper()})
    for t in ("Q4_0", "Q8_0"):
        dst = os.path.join(outdir, f"{stem}.llamacpp-{t}.gguf")
        if not os.path.exists(dst):
            llama.quantize(src, dst + ".part", t)
            os.replace(dst + ".part", dst)
        files.append({"path": dst, "made_by": "llama-quantize --allow-requantize", "from": src,
                      "type": t})
    return files


# ---------------------------------------------------------------- output


def fmt(x, unit=""):
    return "—" if x is None else f"{x:g}{unit}"


def markdown(report):
    lines = []
    for m in report["models"]:
        lines.append(f"### {os.path.basename(m['model'])}"
                     + (f" ({m['made_by']})" if m.get("made_by") else ""))
        lines.append("")
        if "error" in m:
            lines += [f"error: {m['error']}", ""]
            continue
        lines += ["| | agentd | llama.cpp | ratio |", "|---|---:|---:|---:|"]
        for p in m["prefill"]:
            lines.append(f"| prefill {p['tokens']:,} tokens | {fmt(p['agentd_tokens_per_s'])} tok/s"
                         f" | {fmt(p['llamacpp_tokens_per_s'])} tok/s | {fmt(p['ratio'])} |")
        for d in m["decode"]:
            lines.append(f"| decode at context {d['context']:,} | {fmt(d['agentd_tokens_per_s'])}"
                         f" tok/s | {fmt(d['llamacpp_tokens_per_s'])} tok/s | {fmt(d['ratio'])} |")
        ppl = m.get("perplexity")
        if ppl:
            pa, pb = ppl["agentd"].get("perplexity"), ppl["llamacpp"].get("perplexity")
            lines.append(f"| perplexity | {fmt(rnd(pa, 4))} | {fmt(rnd(pb, 4))} | "
                         f"{fmt(ppl['relative_difference'])} rel. diff |")
        t = m.get("ttft")
        if t and "error" not in t:
            lines.append(f"| TTFT ({t['agentd_prompt_tokens']}/{t['llamacpp_prompt_tokens']}-token"
                         f" prompt) | {fmt(t['agentd_ttft_via_daemon_estimate_ms'] or t['agentd_ttft_ms'])} ms"
                         f" | {fmt(t['llamacpp_server_wall_ms'])} ms | "
                         f"{fmt(t['ratio_llamacpp_wall_over_agentd'])} (llama/agentd) |")
        mem = m["memory"]
        ok = mem["after_load_within_bound"]
        lines += ["", f"file {fmt(mem['file_mib'])} MiB; agentd peak RSS after load "
                  f"{fmt(mem['peak_rss_mib_after_load'])} MiB, at the end "
                  f"{fmt(mem['peak_rss_mib_end'])} MiB; bound (1.15 × file + KV pool "
                  f"{fmt(rnd(mem['kv_pool_bytes'] / MIB))} MiB + 64 MiB) {fmt(mem['bound_mib'])} "
                  f"MiB: {'pass' if ok else 'FAIL' if ok is not None else 'n/a'}", ""]
    return "\n".join(lines)


def main():
    global PREFILL, DECODE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agentd", default=os.path.join(HERE, "..", "target", "release", "agentd"))
    ap.add_argument("--llamacpp-bin", default="/work/llamacpp-bin")
    ap.add_argument("--model", action="append", default=[])
    ap.add_argument("--runs", type=int, default=2, help="alternating runs; best of them counts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--make-quants", metavar="DIR")
    ap.add_argument("--perplexity", metavar="TEXT")
    ap.add_argument("--ttft", action="store_true")
    ap.add_argument("--ttft-runs", type=int, default=5)
    ap.add_argument("--ttft-message", default="Name three primary colors, briefly.")
    ap.add_argument("--skip-engine", action="store_true", help="no throughput comparison")
    ap.add_argument("--json-out")
    ap.add_argument("--prefill", default=",".join(map(str, PREFILL)),
                    help="prompt lengths for prefill, comma-separated (default 128,512,2048)")
    ap.add_argument("--decode-contexts", default=",".join(map(str, DECODE)),
                    help="contexts for decode, comma-separated (default 0,512,2048)")
    args = ap.parse_args()
    PREFILL = tuple(int(x) for x in args.prefill.split(","))
    DECODE = tuple(int(x) for x in args.decode_contexts.split(","))

    agentd = Agentd(os.path.abspath(args.agentd), args.threads)
    llama = LlamaCpp(args.llamacpp_bin, args.threads)
    notes = []
    default = agentd.default_model()
    models = [{"path": os.path.abspath(m)} for m in args.model] or [{"path": default}]
    if args.make_quants:
        models += make_quants(agentd, llama, default, args.make_quants, notes)
    use_depth = llama.bench_has_depth()
    if not use_depth:
        notes.append("llama-bench has no -d/--n-depth: llama.cpp decode measured by "
                     "bench/llamacpp_engine.py (llama-cpp-python)")

    report = {"threads": args.threads, "runs": args.runs, "agentd": agentd.path,
              "llamacpp_bin": llama.bindir, "models": [], "notes": notes}
    for m in models:
        entry = {"model": m["path"]}
        if m.get("made_by"):
            entry.update(made_by=m["made_by"], quant_type=m["type"])
        try:
            if not args.skip_engine:
                entry.update(compare_engine(agentd, llama, m["path"], args.runs, use_depth))
            else:
                entry["memory"] = memory(m["path"], [agentd.engine(m["path"])])
            if args.perplexity:
                entry["perplexity"] = compare_perplexity(agentd, llama, m["path"], args.perplexity)
            if args.ttft:
                try:
                    entry["ttft"] = compare_ttft(agentd, llama, m["path"], args.ttft_runs,
                                                 args.ttft_message)
                except Exception as e:  # noqa: BLE001 - reported, the rest goes on
                    entry["ttft"] = {"error": str(e)}
        except Exception as e:  # noqa: BLE001 - one bad file must not lose the others
            entry["error"] = str(e)
        report["models"].append(entry)
    report["llamacpp_version"] = llama.version
    if report["llamacpp_version"] is None:
        report["llamacpp_version"] = {}
    vf = os.path.join(llama.bindir, "VERSION")
    if os.path.exists(vf):
        report["llamacpp_version"]["source"] = open(vf).read().strip()

    print(markdown(report))
    text = json.dumps(report, indent=2)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
