#!/usr/bin/env python3
"""Serving figures: molt serve under concurrent streaming load, against transformers + PEFT.

Starts `molt serve` on a model (the `small` preset by default, NF4 base) with N LoRA adapters
(r=16 on attention and routed experts, written once by `molt export --spec` into --work), then
for each condition sends the same fixed set of requests (fixed prompts, a fixed output length:
ignore_eos) at a given concurrency through the streaming completions API and measures output
tokens/s, time to first token and inter-token latency (p50, p99) on its second pass (the
first, unmeasured and on other prompts, lets the server's buffers grow to the condition's
steady size without filling the prefix cache with the measured prompts):
    base        every request on the base model
    1, 8, 32, 128 distinct adapters, taken in turn by the requests
    1 stream    the base condition at concurrency 1 (32 streams vs one)
All conditions run once per round (--rounds, 3 by default, each with prompts of its own) and
each condition's best round is reported, as tools/bench/bench_llamacpp.py does: a condition
lasts seconds, and the machine's load drifts over the minutes of a run.
Then, side by side in the same run, transformers + PEFT serve the same requests of the
32-adapter condition (tools/bench/hf_serve_baseline.py in the reference virtualenv:
set_adapter per request, generate, the same threads), and the ratio is printed.

Targets (issue 10): 128 adapters keep >= 85% of base-only throughput; 32 streams give >= 8x
one stream; molt >= 10x transformers + PEFT. Only the standard library is used here; the
baseline runs under --hf-python. Not part of tools/test.sh.

Run: python3 tools/bench/bench_serve.py --molt build/molt [--model DIR | --preset small]
        [--quant nf4] [--work DIR] [--concurrency 32] [--requests 64] [--prompt-tokens 64]
        [--max-tokens 32] [--adapters 0,1,8,32,128] [--threads 2] [--rounds 3]
        [--hf-python /work/venv-ref/bin/python] [--hf-requests 32]
"""
import argparse
import json
import os
import random
import re
import selectors
import socket
import statistics
import subprocess
import sys
import threading
import time

TARGETS = ("q_a_proj+q_b_proj+kv_a_proj_with_mqa+kv_b_proj+o_proj+"
           "experts.gate_up_proj+experts.down_proj")


def pct(vals, p):
    if not vals:
        return float("nan")
    s = sorted(vals)
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"bench_serve: {' '.join(cmd)} failed:\n{r.stderr}")
    return r.stdout


def prepare(args):
    os.makedirs(args.work, exist_ok=True)
    model = args.model
    if not model:
        model = os.path.join(args.work, args.preset)
        if not os.path.exists(os.path.join(model, "config.json")):
            print(f"bench_serve: writing the {args.preset} preset to {model}", flush=True)
            run([args.molt, "init-model", "--preset", args.preset, "--seed", "1", "--out", model])
    n = max(args.adapter_counts)
    paths = []
    for i in range(n):
        p = os.path.join(args.work, f"adapter{i:03d}")
        if not os.path.exists(os.path.join(p, "adapter_config.json")):
            spec = f"r={args.rank},alpha={2 * args.rank},seed={i + 1},targets={TARGETS}"
            run([args.molt, "export", "--model", model, "--spec", spec, "--format", "peft",
                 "--out", p, "--force"])
        paths.append(p)
    print(f"bench_serve: {n} adapters (r={args.rank}, attention + experts) in {args.work}",
          flush=True)
    return model, paths


class Server:
    def __init__(self, args, model, adapters):
        cmd = [args.molt, "serve", "--model", model, "--port", "0",
               "--max-loaded-adapters", str(max(1, len(adapters))),
               "--max-num-seqs", str(max(args.concurrency, 1)),
               "--max-batch-tokens", str(args.max_batch_tokens),
               "--kv-cache-mib", str(args.kv_cache_mib), "--access-log", "none",
               "--served-model-name", "base"]
        if args.quant != "none":
            cmd += ["--base-quant", args.quant]
        for i, p in enumerate(adapters):
            cmd += ["--adapter", f"a{i:03d}={p}"]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env)
        self.port = None
        t0 = time.time()
        for line in self.p.stdout:
            if not re.match(r"\s+a\d{3} = ", line):  # one line per adapter: too many
                print("  " + line.rstrip(), flush=True)
            if "listening on" in line or "http://" in line:
                tail = line.rsplit(":", 1)[-1]
                digits = "".join(ch for ch in tail if ch.isdigit())
                if digits:
                    self.port = int(digits)
                    break
            if time.time() - t0 > 600:
                break
        if not self.port:
            self.p.kill()
            sys.exit("bench_serve: molt serve did not print its address:\n" + self.p.stderr.read())
        threading.Thread(target=self.p.stdout.read, daemon=True).start()
        threading.Thread(target=self.p.stderr.read, daemon=True).start()

    def stop(self):
        self.p.terminate()
        try:
            self.p.wait(60)
        except subprocess.TimeoutExpired:
            self.p.kill()


class Stream:
    """One streaming completion on a raw socket: the HTTP/1.1 response is read as it comes,
    its chunked body decoded and split into server-sent events. Every event read in one
    recv() gets that recv's time."""

    def __init__(self, port, model, prompt, max_tokens):
        body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                           "temperature": 0, "ignore_eos": True, "stream": True,
                           "stream_options": {"include_usage": True}}).encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n").encode()
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.t0 = time.perf_counter()
        self.sock.sendall(head + body)
        self.raw = b""       # bytes not decoded yet
        self.sse = b""       # decoded body not split into events yet
        self.status = None
        self.chunk_left = -1  # bytes left in the current chunk (-1: a size line is next)
        self.crlf = False     # a chunk's closing CRLF is next
        self.done = False
        self.first, self.last, self.gaps, self.tokens = None, None, [], 0

    def feed(self, data, now):
        """Takes the bytes of one recv(); an empty one is the end of the connection."""
        if not data:
            if not self.done:
                raise RuntimeError(f"connection closed mid-response (HTTP {self.status}): "
                                   f"{(self.raw + self.sse)[:300]!r}")
            return
        self.raw += data
        if self.status is None:
            end = self.raw.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.raw = self.raw[:end].decode("latin-1"), self.raw[end + 4:]
            self.status = int(head.split(None, 2)[1])
            if self.status != 200 or "chunked" not in head.lower():
                raise RuntimeError(f"HTTP {self.status}: {head[:300]}")
        while self.raw and not self.done:
            if self.crlf:  # the CRLF that ends a chunk's data
                if len(self.raw) < 2:
                    break
                self.raw, self.crlf = self.raw[2:], False
            if self.chunk_left < 0:
                eol = self.raw.find(b"\r\n")
                if eol < 0:
                    break
                size = int(self.raw[:eol].split(b";")[0], 16)
                self.raw = self.raw[eol + 2:]
                if size == 0:
                    self.done = True
                    break
                self.chunk_left = size
            take = self.raw[:self.chunk_left]
            self.sse += take
            self.raw = self.raw[len(take):]
            self.chunk_left -= len(take)
            if self.chunk_left == 0:
                self.chunk_left, self.crlf = -1, True
        *events, self.sse = self.sse.split(b"\n\n")
        for e in events:
            self.event(e.strip(), now)

    def event(self, line, now):
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            return
        ev = json.loads(line[6:])
        if ev.get("error"):
            raise RuntimeError(f"stream error: {ev['error']}")
        if ev.get("usage"):
            self.tokens = ev["usage"]["completion_tokens"]
        if ev.get("choices"):
            if self.first is None:
                self.first = now - self.t0
            elif self.last is not None:
                self.gaps.append(now - self.last)
            self.last = now

    def result(self):
        return self.first or 0.0, self.gaps, self.tokens, time.perf_counter() - self.t0


def condition(port, requests, concurrency):
    """Sends requests [(model, prompt_ids, max_tokens)] at `concurrency` from one thread (a
    selector over raw sockets, so that the client takes as little of the machine's CPU as it
    can); returns figures."""
    results = [None] * len(requests)
    sel = selectors.DefaultSelector()
    nxt = 0
    t0 = time.perf_counter()

    def start():
        nonlocal nxt
        m, p, mt = requests[nxt]
        s = Stream(port, m, p, mt)
        sel.register(s.sock, selectors.EVENT_READ, (nxt, s))
        nxt += 1

    while nxt < len(requests) and nxt < concurrency:
        start()
    while sel.get_map():
        for key, _ in sel.select():
            i, s = key.data
            data = s.sock.recv(1 << 16)
            s.feed(data, time.perf_counter())
            if s.done or not data:
                sel.unregister(s.sock)
                s.sock.close()
                results[i] = s.result()
                if nxt < len(requests):
                    start()
    wall = time.perf_counter() - t0
    toks = sum(r[2] for r in results)
    ttft = [r[0] for r in results]
    itl = [g for r in results for g in r[1]]
    return {"tok_s": toks / wall, "tokens": toks, "wall_s": wall,
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
            "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99)}


def keep(best, fig):
    """Keeps in best[name] the figures of a condition's fastest round."""
    if fig["name"] not in best or fig["tok_s"] > best[fig["name"]]["tok_s"]:
        best[fig["name"]] = fig


def make_requests(args, models, seed=None):
    rng = random.Random(args.seed if seed is None else seed)
    out = []
    for i in range(args.requests):
        prompt = [1] + [1000 + rng.randrange(100000) for _ in range(args.prompt_tokens - 1)]
        out.append((models[i % len(models)], prompt, args.max_tokens))
    return out


def hf_baseline(args, model, adapters, reqs):
    path = os.path.join(args.work, "hf_requests.jsonl")
    with open(path, "w") as f:
        for m, p, mt in reqs:
            ad = None if m == "base" else m
            f.write(json.dumps({"prompt_ids": p, "adapter": ad, "max_tokens": mt}) + "\n")
    out = os.path.join(args.work, "hf_report.json")
    used = sorted({m for m, _, _ in reqs if m != "base"})
    cmd = [args.hf_python, os.path.join(os.path.dirname(__file__), "hf_serve_baseline.py"),
           "--model", model, "--requests", path, "--threads", str(args.threads),
           "--quant", args.quant if args.quant in ("none", "nf4") else "none", "--out", out]
    for name in used:
        cmd += ["--adapter", f"{name}={adapters[int(name[1:])]}"]
    print("bench_serve: transformers + PEFT on the same requests ...", flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout + r.stderr)
        return None
    print(r.stdout.strip())
    with open(out) as f:
        rep = json.load(f)
    return rep


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--molt", required=True)
    ap.add_argument("--model", help="model directory (default: write --preset into --work)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--quant", default="nf4", help="molt --base-quant SPEC, or none")
    ap.add_argument("--work", default="/tmp/molt-bench-serve")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--adapters", default="0,1,8,32,128",
                    help="conditions: comma list of distinct adapter counts (0 = base only)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch-tokens", type=int, default=512)
    ap.add_argument("--kv-cache-mib", type=int, default=512)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3,
                    help="passes over all conditions; each condition's best is reported")
    ap.add_argument("--hf-python", help="python of a virtualenv with torch, transformers, peft")
    ap.add_argument("--hf-requests", type=int, default=32,
                    help="requests of the 32-adapter condition served by the baseline")
    args = ap.parse_args()
    args.adapter_counts = [int(x) for x in args.adapters.split(",")]
    model, adapters = prepare(args)
    srv = Server(args, model, adapters)
    try:
        # warm-up: every adapter once; then each condition runs twice and the second pass is
        # measured (the server's buffers grow to a condition's steady size over its first
        # full batches, and the first batches with adapters need room the base does not);
        # the first pass has prompts of its own, so the measured one finds none of its
        # prompts in the prefix cache
        condition(srv.port, [(f"a{i:03d}", [1, 1000, 1001], 2) for i in range(len(adapters))]
                  + [("base", [1, 1000, 1001], 2)], min(args.concurrency, 8))
        # rounds: every condition once per round, in the same order; each keeps its best
        # round (a condition lasts seconds, and a machine's load drifts over minutes). Each
        # round has prompts of its own, so that no measured pass finds its prompts in the
        # prefix cache
        best = {}
        for rnd in range(args.rounds):
            seed = args.seed + 10000 * rnd
            for n in args.adapter_counts:
                models = ["base"] if n == 0 else [f"a{i:03d}" for i in range(n)]
                reqs = make_requests(args, models, seed)
                condition(srv.port, make_requests(args, models, seed + 1000 + n),
                          args.concurrency)
                fig = condition(srv.port, reqs, args.concurrency)
                fig["name"] = ("base only" if n == 0 else "1 adapter" if n == 1
                               else f"{n} adapters")
                keep(best, fig)
                print(f"bench_serve: round {rnd + 1}: {fig['name']}: {fig['tok_s']:.1f} tok/s",
                      flush=True)
            # prompts of its own too: the base condition's are in the prefix cache by now
            single = condition(srv.port, make_requests(args, ["base"], seed + 2000)
                               [: max(4, args.requests // 8)], 1)
            single["name"] = "base, 1 stream"
            keep(best, single)
            print(f"bench_serve: round {rnd + 1}: base, 1 stream: {single['tok_s']:.1f} tok/s",
                  flush=True)
        rows = list(best.values())
        single = best["base, 1 stream"]
    finally:
        srv.stop()
    print(f"\nmolt serve, {os.path.basename(model)} ({args.quant} base), {args.requests} "
          f"requests x {args.max_tokens} output tokens, prompts of {args.prompt_tokens}, "
          f"concurrency {args.concurrency}, {args.threads} threads, best of {args.rounds} "
          f"rounds")
    print("| condition | output tok/s | TTFT p50 / p99 s | ITL p50 / p99 ms |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['tok_s']:.1f} | {r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} | "
              f"{1000 * r['itl_p50']:.0f} / {1000 * r['itl_p99']:.0f} |")
    base = rows[0]["tok_s"] if args.adapter_counts[0] == 0 else None
    for r in rows:
        if base and r["name"].endswith(("adapter", "adapters")):
            print(f"{r['name']}: {100 * r['tok_s'] / base:.1f}% of base-only throughput")
    if base:
        print(f"{args.concurrency} streams vs 1 stream: {base / single['tok_s']:.1f}x")
    if args.hf_python:
        n = 32 if 32 <= len(adapters) else len(adapters)
        models = [f"a{i:03d}" for i in range(n)] if n else ["base"]
        reqs = make_requests(args, models)[: args.hf_requests]
        srv = Server(args, model, adapters)
        try:
            condition(srv.port, make_requests(args, models, args.seed + 999)[: len(reqs)],
                      args.concurrency)  # unmeasured, other prompts, as above
            mine = condition(srv.port, reqs, args.concurrency)
        finally:
            srv.stop()
        rep = hf_baseline(args, model, adapters, reqs)
        if rep:
            hf = rep["summary"]["output_tok_s"] if "summary" in rep else rep["output_tok_s"]
            print(f"same {len(reqs)} requests over {n} adapters: molt serve {mine['tok_s']:.1f} "
                  f"tok/s, transformers + PEFT {hf:.1f} tok/s: {mine['tok_s'] / hf:.1f}x")


if __name__ == "__main__":
    main()
