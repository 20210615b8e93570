#!/usr/bin/env python3
"""Decode speed of two (or more) kiln binaries on one workspace, alternated (ABAB...) so that a shared machine's load
hits both alike. Not a test: it prints, per pair, a fixed pure-Python CPU probe before and after (its wall time
tracks how much CPU we get: discard pairs where it moved), each binary's decode tokens/s (`kiln generate
--ignore-eos`, KILN_THREADS=2) and its CPU ms per decoded token (the child's user+sys time minus that of a -n 1 run
of the same binary: load and prefill cancel; steadier than wall time under load), then medians.

Usage: scripts/bench_decode_abab.py WORKSPACE N_TOKENS PAIRS KILN_A KILN_B [...]
A binary given as KILN::WS runs workspace WS instead (one binary on two workspaces: KILN::WS_A KILN::WS_B)."""
import json, os, resource, statistics, subprocess, sys, time
ws, n, pairs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
bins = sys.argv[4:]
env = dict(os.environ, KILN_THREADS="2")

def probe():  # fixed pure-Python work; its wall time tracks how much CPU we get
    t = time.perf_counter(); s = 0
    for i in range(3_000_000): s += i * i
    return (time.perf_counter() - t) * 1e3

def run(b, ntok):
    binary, _, w = b.partition("::")
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([binary, "generate", w or ws, "--prompt", "The history of the city", "-n", str(ntok), "--ignore-eos",
                          "--json"], capture_output=True, text=True, env=env, check=True)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return json.loads(out.stdout), (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)

def label(b):
    return "::".join(os.path.basename(x.rstrip("/")) for x in b.split("::"))

res = {b: {"tps": [], "cpu_ms": []} for b in bins}
for p in range(pairs):
    p0 = probe()
    for b in (bins if p % 2 == 0 else bins[::-1]):
        _, c1 = run(b, 1)
        d, cn = run(b, n)
        res[b]["tps"].append(d["timing"]["decode_tokens_per_s"])
        res[b]["cpu_ms"].append((cn - c1) / (n - 1) * 1e3)
        text = d["text"]
    p1 = probe()
    print(f"pair {p}: probe {p0:.0f}/{p1:.0f} ms  " + "  ".join(
        f"{label(b)} {res[b]['tps'][-1]:.1f} tok/s {res[b]['cpu_ms'][-1]:.2f} cpu-ms/tok" for b in bins), flush=True)
for b in bins:
    print(f"{label(b)}: median {statistics.median(res[b]['tps']):.1f} tok/s, "
          f"{statistics.median(res[b]['cpu_ms']):.2f} CPU ms/token (n={len(res[b]['tps'])})")
