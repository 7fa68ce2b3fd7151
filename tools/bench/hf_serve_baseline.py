#!/usr/bin/env python3
"""Serving baseline: transformers + PEFT answering a list of requests, one adapter per request.

This is what a transformers + PEFT user does to serve one base with several LoRA adapters:
one PeftModel holding every adapter, and for each request `set_adapter(name)` (the base
through the `disable_adapter()` context), then `model.generate` with greedy decoding and a
fixed output length (max_new_tokens = min_new_tokens = the request's max_tokens), under
torch.set_num_threads(THREADS). Requests are served in the order given, all taken as
arriving at time 0; `--batch N` lets consecutive requests for the same adapter share one
left-padded generate call (at most N rows), the most batching that per-request
set_adapter allows. It reports output tokens/s over the whole run, per-request latency
(from time 0 to the request's last token; time to first token from a streamer), and the
peak RSS of the process.

It is a measuring tool for molt's serving figures (molt serve is compared against it,
side by side in one run); it is not part of molt and never runs in tools/test.sh. It
needs a virtualenv with torch, transformers and peft (bitsandbytes for --quant nf4); see
tools/bench/README.md.

Requests file (JSON lines): {"prompt_ids": [1, 22177, ...], "adapter": "a1" | null,
"max_tokens": 32}; a null, absent or "base" adapter means the base model. Or
--synthetic N makes N requests of --prompt-tokens random ids (after <s>), adapters taken
in turn from base and every --adapter, from --seed.

Module use:
    srv = HFServer("/work/models/small", {"a1": "/path/a1"}, threads=2)
    report = srv.serve([Request([1, 5, 9], "a1", 16)])

Run: python tools/bench/hf_serve_baseline.py --model DIR [--adapter NAME=PATH ...]
        (--requests FILE.jsonl | --synthetic N [--prompt-tokens P] [--max-tokens M])
        [--threads 2] [--batch 1] [--quant none|nf4] [--out REPORT.json]
     python tools/bench/hf_serve_baseline.py --model DIR [--adapter NAME=PATH ...]
        --verify-molt build/molt [--max-tokens 16]
"""
import argparse
import json
import random
import resource
import sys
import time
from dataclasses import dataclass, field

BASE = "base"


@dataclass
class Request:
    prompt_ids: list
    adapter: str | None  # None or "base": the base model
    max_tokens: int


@dataclass
class Result:
    index: int
    adapter: str
    prompt_tokens: int
    output_ids: list
    ttft_s: float  # time 0 to the first generated token
    latency_s: float  # time 0 to the last generated token
    service_s: float  # the generate call that served it
    itl_s: float  # mean time between its generated tokens (after the first)


@dataclass
class Report:
    threads: int
    batch: int
    quant: str
    load_s: float
    wall_s: float
    output_tokens: int
    results: list = field(default_factory=list)
    peak_rss_mib: float = 0.0

    @property
    def output_tok_s(self):
        return self.output_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self):
        lat = sorted(r.latency_s for r in self.results)
        ttft = sorted(r.ttft_s for r in self.results)
        svc = sorted(r.service_s for r in self.results)
        itl = sorted(r.itl_s for r in self.results)
        return {
            "requests": len(self.results), "output_tokens": self.output_tokens,
            "wall_s": round(self.wall_s, 3), "output_tok_s": round(self.output_tok_s, 2),
            "latency_p50_s": round(pct(lat, 50), 3), "latency_p99_s": round(pct(lat, 99), 3),
            "ttft_p50_s": round(pct(ttft, 50), 3), "ttft_p99_s": round(pct(ttft, 99), 3),
            "itl_p50_s": round(pct(itl, 50), 4), "itl_p99_s": round(pct(itl, 99), 4),
            "service_p50_s": round(pct(svc, 50), 3), "load_s": round(self.load_s, 2),
            "peak_rss_mib": round(self.peak_rss_mib, 1), "threads": self.threads,
            "batch": self.batch, "quant": self.quant,
        }


def pct(sorted_vals, p):
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not sorted_vals:
        return 0.0
    k = max(0, min(len(sorted_vals) - 1, -(-p * len(sorted_vals) // 100) - 1))
    return sorted_vals[k]


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


class _FirstTokenClock:
    """generate() streamer that notes when the first generated token comes out (its first
    put() call carries the prompt, the second the first new token of every row)."""

    def __init__(self):
        self.calls = 0
        self.first = None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.first is None:
            self.first = time.perf_counter()

    def end(self):
        pass


def _model_class(model_dir):
    """The class named by config.json's architectures (AutoModelForCausalLM does not map
    every model type, mistral4 among them)."""
    import os

    import transformers
    with open(os.path.join(model_dir, "config.json")) as f:
        arch = (json.load(f).get("architectures") or ["AutoModelForCausalLM"])[0]
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise ValueError(f"{model_dir}/config.json: transformers has no class {arch}")
    return cls


class HFServer:
    """One base model wrapped in a PeftModel with every adapter loaded."""

    def __init__(self, model_dir, adapters, threads=2, quant="none"):
        import torch

        torch.set_num_threads(threads)
        self.torch, self.threads, self.quant = torch, threads, quant
        t0 = time.perf_counter()
        kw = {"dtype": torch.float32}
        if quant == "nf4":
            from transformers import BitsAndBytesConfig
            kw["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32)
            kw["device_map"] = "cpu"
        elif quant != "none":
            raise ValueError(f"--quant {quant}: expected none or nf4")
        model = _model_class(model_dir).from_pretrained(model_dir, **kw)
        model.eval()
        self.names = list(adapters)
        if BASE in adapters:
            raise ValueError(f"adapter name '{BASE}' is reserved for the base model")
        if self.names:
            from peft import PeftModel
            first = self.names[0]
            model = PeftModel.from_pretrained(model, adapters[first], adapter_name=first)
            for name in self.names[1:]:
                model.load_adapter(adapters[name], adapter_name=name)
            model.eval()
        self.model = model
        self.load_s = time.perf_counter() - t0

    def _context(self, adapter):
        """set_adapter for a named adapter; the base through disable_adapter()."""
        import contextlib
        if adapter in (None, BASE):
            return self.model.disable_adapter() if self.names else contextlib.nullcontext()
        if adapter not in self.names:
            raise KeyError(f"request names adapter '{adapter}', loaded: {self.names}")
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()

    def generate(self, rows, adapter, max_tokens, fixed_length=True):
        """Greedy generation of max_tokens new tokens for each prompt in rows (lists of ids;
        left-padded together when more than one); exactly that many unless fixed_length is
        False (then an end of sequence stops a row, as in `molt generate`). Returns (new ids
        per row, seconds to the first new token, seconds in all)."""
        torch = self.torch
        width = max(len(r) for r in rows)
        pad = 11  # <pad> of the Tekken vocabulary; masked out below
        ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        clock = _FirstTokenClock()
        t0 = time.perf_counter()
        with torch.inference_mode(), self._context(adapter):
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                max_new_tokens=max_tokens, min_new_tokens=max_tokens if fixed_length else 0,
                pad_token_id=pad,
                streamer=clock, use_cache=True)
        t1 = time.perf_counter()
        new = [row[width:].tolist() for row in out]
        if not fixed_length:  # cut each row after its end of sequence (the rest is padding)
            eos = self.model.config.eos_token_id
            eos = set(eos if isinstance(eos, list) else [eos])
            new = [r[:next((i + 1 for i, t in enumerate(r) if t in eos), len(r))] for r in new]
        return new, (clock.first or t1) - t0, t1 - t0

    def serve(self, requests, batch=1):
        """Serves requests in order (all arriving at time 0); consecutive requests with the
        same adapter and max_tokens share one generate call, up to `batch` of them."""
        results = [None] * len(requests)
        start = time.perf_counter()
        i = 0
        while i < len(requests):
            key = (requests[i].adapter or BASE, requests[i].max_tokens)
            j = i + 1
            while j < len(requests) and j - i < batch and \
                    ((requests[j].adapter or BASE), requests[j].max_tokens) == key:
                j += 1
            t_call = time.perf_counter()
            new, first_s, call_s = self.generate([r.prompt_ids for r in requests[i:j]],
                                                 key[0], key[1])
            done = time.perf_counter() - start
            itl = (call_s - first_s) / (key[1] - 1) if key[1] > 1 else 0.0
            for k in range(i, j):
                results[k] = Result(k, key[0], len(requests[k].prompt_ids), new[k - i],
                                    t_call - start + first_s, done, call_s, itl)
            i = j
        wall = time.perf_counter() - start
        rep = Report(self.threads, batch, self.quant, self.load_s, wall,
                     sum(len(r.output_ids) for r in results), results)
        rep.peak_rss_mib = peak_rss_mib()
        return rep


class TekkenBytes:
    """The bytes molt prints for each token id: special tokens by name, others raw."""

    def __init__(self, tekken_path):
        import base64
        with open(tekken_path) as f:
            raw = json.load(f)
        cfg = raw["config"]
        specials = {e["rank"]: e["token_str"].encode() for e in raw["special_tokens"]}
        self.n_special = cfg["default_num_special_tokens"]
        self.special = [specials.get(i, f"<SPECIAL_{i}>".encode())
                        for i in range(self.n_special)]
        n_inner = cfg["default_vocab_size"] - self.n_special
        self.vocab = [base64.b64decode(e["token_bytes"]) for e in raw["vocab"][:n_inner]]

    def of(self, t):
        return self.special[t] if t < self.n_special else self.vocab[t - self.n_special]


def agreeing_prefix(token_bytes, ids, text):
    """How many leading ids spell a prefix of text (bytes), and whether all of text is
    spelled by the ids."""
    pos = 0
    for k, t in enumerate(ids):
        b = token_bytes.of(t)
        if text[pos:pos + len(b)] != b:
            return k, False
        pos += len(b)
    return len(ids), pos == len(text)


VERIFY_TEXTS = ["The quick brown fox jumps over the lazy dog.",
                "Spell out the digits: 3 1 4",
                "def add(a, b):\n    return",
                "Der schnelle braune Fuchs springt über den faulen Hund."]


def verify_with_molt(srv, molt, model_dir, adapters, max_tokens, texts=VERIFY_TEXTS):
    """For each text and each of base + adapters: `molt generate` (greedy, F32 base) against
    this server's greedy tokens on the same prompt ids (<s> + molt tokenize). Returns rows
    (text, adapter, tokens generated here, leading tokens that agree, full agreement)."""
    import os
    import subprocess
    tb = TekkenBytes(os.path.join(model_dir, "tekken.json"))
    rows = []
    for text in texts:
        ids = [int(x) for x in subprocess.run(
            [molt, "tokenize", "--tokenizer", os.path.join(model_dir, "tekken.json"), "--text",
             text, "--bos"], check=True, capture_output=True, text=True).stdout.split()]
        for name in [BASE] + list(adapters):
            cmd = [molt, "generate", "--model", model_dir, "--prompt", text, "--max-tokens",
                   str(max_tokens)] + ([] if name == BASE else ["--adapter", adapters[name]])
            p = subprocess.run(cmd, check=True, capture_output=True)
            out = p.stdout[:-1] if p.stdout.endswith(b"\n") else p.stdout
            new, _, _ = srv.generate([ids], name, max_tokens, fixed_length=False)
            k, full = agreeing_prefix(tb, new[0], out)
            rows.append((text, name, len(new[0]), k, full))
    return rows


def read_requests(path):
    reqs = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                o = json.loads(line)
                ids = o["prompt_ids"]
                if not ids or not all(isinstance(x, int) and x >= 0 for x in ids):
                    raise ValueError("prompt_ids must be a non-empty list of token ids")
                mt = int(o.get("max_tokens", 16))
                if mt < 1:
                    raise ValueError("max_tokens must be >= 1")
                reqs.append(Request(ids, o.get("adapter"), mt))
            except (ValueError, KeyError, TypeError) as e:
                sys.exit(f"{path}:{n}: {type(e).__name__}: {e}")
    return reqs


def synthetic_requests(n, prompt_tokens, max_tokens, adapters, seed, vocab=131072):
    """n requests of <s> + (prompt_tokens - 1) random ordinary ids (above the 1000 special
    ids), adapters in turn: base, then each adapter."""
    rng = random.Random(seed)
    cycle = [None] + list(adapters)
    return [Request([1] + [rng.randrange(1000, vocab) for _ in range(prompt_tokens - 1)],
                    cycle[i % len(cycle)], max_tokens) for i in range(n)]


def parse_adapters(items):
    out = {}
    for it in items or []:
        name, sep, path = it.partition("=")
        if not sep or not name or not path:
            sys.exit(f"--adapter {it}: expected NAME=PATH")
        if name in out or name == BASE:
            sys.exit(f"--adapter {it}: name '{name}' is repeated or reserved")
        out[name] = path
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="transformers + PEFT serving baseline: set_adapter per request, greedy "
                    "generate of a fixed length; prints tokens/s, latency and peak RSS.")
    ap.add_argument("--model", required=True, help="Hugging Face model directory")
    ap.add_argument("--adapter", action="append", metavar="NAME=PATH",
                    help="PEFT adapter directory (repeatable)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--requests", help="JSON lines {prompt_ids, adapter, max_tokens}")
    src.add_argument("--synthetic", type=int, metavar="N", help="N random requests")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="synthetic prompt length")
    ap.add_argument("--max-tokens", type=int, default=32, help="synthetic output length")
    ap.add_argument("--seed", type=int, default=1, help="synthetic requests' seed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1,
                    help="max consecutive same-adapter requests per generate call")
    ap.add_argument("--quant", default="none", choices=["none", "nf4"],
                    help="base weights: F32, or bitsandbytes NF4 (double quant, F32 compute)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed generate calls (4 tokens) before serving")
    ap.add_argument("--out", help="write the full report (tokens of each request) as JSON")
    ap.add_argument("--verify-molt", metavar="MOLT",
                    help="instead of serving: compare greedy tokens with `molt generate` "
                         "(F32 base) on a few fixed prompts, for the base and each adapter")
    a = ap.parse_args(argv)
    if a.threads < 1 or a.batch < 1:
        sys.exit("--threads and --batch must be >= 1")
    adapters = parse_adapters(a.adapter)
    if a.verify_molt:
        if a.quant != "none":
            sys.exit("--verify-molt compares F32 bases only")
        srv = HFServer(a.model, adapters, a.threads)
        rows = verify_with_molt(srv, a.verify_molt, a.model, adapters, a.max_tokens)
        for text, name, n, k, full in rows:
            print(f"{name:>8} {k:3d}/{n:<3d} tokens agree{' (all)' if full else ''}  {text!r}")
        agree = sum(k for _, _, _, k, _ in rows)
        total = sum(n for _, _, n, _, _ in rows)
        print(f"{agree}/{total} generated tokens agree as leading runs; "
              f"{sum(f for *_, f in rows)}/{len(rows)} outputs identical")
        return 0
    if not a.requests and not a.synthetic:
        sys.exit("give --requests FILE or --synthetic N (or --verify-molt MOLT)")
    if a.requests:
        reqs = read_requests(a.requests)
    else:
        if a.synthetic < 1 or a.prompt_tokens < 1 or a.max_tokens < 1:
            sys.exit("--synthetic, --prompt-tokens and --max-tokens must be >= 1")
        reqs = synthetic_requests(a.synthetic, a.prompt_tokens, a.max_tokens, adapters, a.seed)
    for r in reqs:
        if r.adapter not in (None, BASE) and r.adapter not in adapters:
            sys.exit(f"a request names adapter '{r.adapter}'; loaded: {list(adapters)}")
    srv = HFServer(a.model, adapters, a.threads, a.quant)
    for _ in range(a.warmup):
        srv.generate([reqs[0].prompt_ids], reqs[0].adapter, 4)
    rep = srv.serve(reqs, a.batch)
    s = rep.summary()
    print(json.dumps(s))
    print(f"transformers + PEFT: {s['requests']} requests, {s['output_tokens']} output tokens "
          f"in {s['wall_s']} s = {s['output_tok_s']} tok/s; latency p50 {s['latency_p50_s']} s "
          f"p99 {s['latency_p99_s']} s; first token p50 {s['ttft_p50_s']} s; "
          f"peak RSS {s['peak_rss_mib']} MiB; {a.threads} threads, batch {a.batch}, "
          f"base {a.quant}", file=sys.stderr)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"summary": s, "results": [r.__dict__ for r in rep.results]}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
