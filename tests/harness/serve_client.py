"""tests/harness/serve_client.py: the official `openai` client against a running `molt serve`,
for the end-to-end tests (tests/cli_serve_*.sh; run with the project virtualenv's python).

    serve_client.py suite URL KEY BASE ADAPTER GEN GEN_ADAPTER   completions, chat,
        streaming with usage, echo + logprobs, model = adapter, 404, 401, runtime
        load/unload; GEN and GEN_ADAPTER are `molt generate`'s greedy texts for the same
        prompt without and with the adapter, which the server must reproduce
    serve_client.py concurrency URL KEY N MODEL...          N requests over the models, first
        one at a time, then all at once: every concurrent answer equals its solo one
    serve_client.py stream URL KEY MODEL MAX_TOKENS          streams, says "started" after the
        first chunk, then reads to the end and prints the finish reason

Each check prints "ok: ..." or "FAIL: ..."; the exit status is 0 only when all passed.
"""
import concurrent.futures
import json
import sys
import urllib.error
import urllib.request

import openai

PROMPT = "Once upon a time"
failed = 0


def check(cond, what):
    global failed
    print(("ok: " if cond else "FAIL: ") + what, flush=True)
    failed += not cond


def client(url, key):
    return openai.OpenAI(base_url=url + "/v1", api_key=key or "none", max_retries=0,
                         timeout=300)


def post(url, key, path, body):
    """(status, text) of a raw POST."""
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          "Authorization": "Bearer " + key})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def suite(url, key, base, adapter, generated, generated_adapter):
    c = client(url, key)
    r = c.completions.create(model=base, prompt=PROMPT, max_tokens=12, temperature=0)
    text = r.choices[0].text
    check(r.object == "text_completion" and r.model == base, "completion object and model")
    # molt generate writes control tokens by name: ask the server to keep them too
    for model, want in ((base, generated), (adapter, generated_adapter)):
        g = c.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0,
                                 extra_body={"skip_special_tokens": False}).choices[0].text
        check(g == want, f"{model}: greedy completion equals molt generate: {g!r} vs {want!r}")
    check(r.usage.completion_tokens >= 1 and r.usage.total_tokens ==
          r.usage.prompt_tokens + r.usage.completion_tokens, "completion usage adds up")
    check(r.choices[0].finish_reason in ("stop", "length"), "finish_reason stop or length")

    chunks = list(c.completions.create(model=base, prompt=PROMPT, max_tokens=12, temperature=0,
                                       stream=True, stream_options={"include_usage": True}))
    streamed = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    check(streamed == text, "streamed text equals the whole response")
    check(chunks[-1].usage is not None and not chunks[-1].choices and
          chunks[-1].usage.completion_tokens == r.usage.completion_tokens,
          "the usage event comes last")

    e = c.completions.create(model=base, prompt=PROMPT, max_tokens=1, temperature=0, echo=True,
                             logprobs=2)
    lp = e.choices[0].logprobs
    n = e.usage.prompt_tokens + e.usage.completion_tokens
    check(e.choices[0].text.startswith(PROMPT), "echo starts with the prompt")
    check(len(lp.tokens) == n and len(lp.token_logprobs) == n and len(lp.text_offset) == n,
          f"echo + logprobs: one entry per prompt and generated token ({n})")
    check(lp.token_logprobs[0] is None and lp.top_logprobs[0] is None,
          "the first prompt token has no log-probability")
    check(all(v is not None and v <= 0 for v in lp.token_logprobs[1:]),
          "every other token has a log-probability <= 0")
    check(all(lp.tokens[i] in lp.top_logprobs[i] for i in range(1, n)),
          "top_logprobs include the token itself")
    check(max(lp.top_logprobs[n - 1].values()) == lp.token_logprobs[n - 1],
          "the greedy token is the most probable")

    ch = c.chat.completions.create(model=base, messages=[{"role": "user", "content": "Hi"}],
                                   max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    m = ch.choices[0].message
    check(ch.object == "chat.completion" and m.role == "assistant" and m.content is not None,
          "chat completion message")
    check(len(ch.choices[0].logprobs.content) == ch.usage.completion_tokens,
          "chat logprobs: one entry per generated token")
    cs = list(c.chat.completions.create(model=base, messages=[{"role": "user", "content": "Hi"}],
                                        max_tokens=8, temperature=0, stream=True,
                                        stream_options={"include_usage": True}))
    check(cs[0].choices[0].delta.role == "assistant", "chat stream: role first")
    check("".join(x.choices[0].delta.content or "" for x in cs if x.choices) == m.content,
          "chat stream text equals the whole message")

    a = c.completions.create(model=adapter, prompt=PROMPT, max_tokens=12, temperature=0)
    check(a.model == adapter, "model = adapter is answered under its name")
    check(a.choices[0].text != text, "the adapter changes the greedy text")
    ids = [m.id for m in c.models.list().data]
    check(ids[0] == base and adapter in ids, f"models lists the base and the adapter: {ids}")

    try:
        c.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)
        check(False, "unknown model refused")
    except openai.NotFoundError as ex:
        check(ex.status_code == 404 and ex.body["type"] == "NotFoundError" and
              ex.body["param"] == "model" and
              ex.body["message"] == "The model `no-such-model` does not exist.",
              "unknown model: 404 NotFoundError")
    try:
        client(url, key + "x").models.list()
        check(False, "wrong key refused")
    except openai.AuthenticationError as ex:
        check(ex.status_code == 401, "wrong key: 401")

    st, _ = post(url, key, "/v1/load_lora_adapter", {"lora_name": "late", "lora_path": "ad2"})
    check(st == 200, f"runtime load: {st}")
    late = c.completions.create(model="late", prompt=PROMPT, max_tokens=12, temperature=0)
    check(late.choices[0].text != text, "the runtime adapter changes the text")
    st, _ = post(url, key, "/v1/load_lora_adapter", {"lora_name": "late", "lora_path": "ad2"})
    check(st == 400, f"loading a loaded name: {st}")
    st, _ = post(url, key, "/v1/unload_lora_adapter", {"lora_name": "late"})
    check(st == 200, f"unload: {st}")
    st, _ = post(url, key, "/v1/unload_lora_adapter", {"lora_name": "late"})
    check(st == 404, f"unloading it again: {st}")
    try:
        c.completions.create(model="late", prompt=PROMPT, max_tokens=2)
        check(False, "an unloaded adapter is refused")
    except openai.NotFoundError:
        check(True, "an unloaded adapter is refused with 404")


def concurrency(url, key, n, models):
    c = client(url, key)
    reqs = [(models[i % len(models)], f"Request {i}: tell me about the number {i * 7}",
             4 + i % 9) for i in range(n)]

    def run(r):
        out = c.completions.create(model=r[0], prompt=r[1], max_tokens=r[2], temperature=0)
        return out.choices[0].text, out.usage.completion_tokens

    solo = [run(r) for r in reqs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
        together = list(pool.map(run, reqs))
    same = sum(s == t for s, t in zip(solo, together))
    check(same == n, f"{same} of {n} concurrent answers equal their solo runs")
    per_model = {m: sum(1 for r in reqs if r[0] == m) for m in models}
    check(all(per_model.values()), f"requests per model: {per_model}")


def stream(url, key, model, max_tokens):
    c = client(url, key)
    finish = None
    started = False
    for ch in c.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens,
                                   temperature=0, stream=True, extra_body={"ignore_eos": True}):
        if not started:
            print("started", flush=True)
            started = True
        if ch.choices and ch.choices[0].finish_reason:
            finish = ch.choices[0].finish_reason
    print("finish", finish, flush=True)
    check(finish == "length", "the stream ran to its end")


if __name__ == "__main__":
    mode, url, key = sys.argv[1], sys.argv[2], sys.argv[3]
    if mode == "suite":
        # molt generate writes a last unfinished character as raw bytes; the server sends
        # U+FFFD for ill-formed bytes as Python's errors="replace" does
        gen = [a.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
               for a in sys.argv[6:8]]
        suite(url, key, sys.argv[4], sys.argv[5], *gen)
    elif mode == "concurrency":
        concurrency(url, key, int(sys.argv[4]), sys.argv[5:])
    elif mode == "stream":
        stream(url, key, sys.argv[4], int(sys.argv[5]))
    else:
        sys.exit(f"unknown mode {mode}")
    sys.exit(1 if failed else 0)
