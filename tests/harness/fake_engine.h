// tests/harness/fake_engine.h: the knobs and counters of the fake serving engine
// (fake_engine.c), which implements infer/engine/engine.h for the server's tests only: no
// model, deterministic tokens (the prompt reversed, shifted per adapter), made-up but
// consistent log-probabilities, adapters in a table. Linked into test_server* executables in
// place of the real engine.
//
// Its rules, which the tests rely on:
//   greedy token i = prompt[(n - 1 - i) mod n] (+ the adapter's shift, below the vocabulary);
//   with temperature > 0, token i = prompt[hash(seed, i) mod n] (+ shift);
//   generated token i has log-probability -0.25 * (i % 4 + 1); its alternatives are the ids
//   token, token + 1, ... with log-probabilities lp, lp - 0.5, lp - 1, ...;
//   prompt token j >= 1 has log-probability -0.5 * (j % 3 + 1), alternatives built the same;
//   the k-th adapter ever registered shifts ids by k; a path whose name contains "misfit" is
//   refused as not fitting the base (MOLT_EFORMAT naming a tensor); a missing path MOLT_EIO;
//   one token per step, steps fake_eng_set_step_ms apart (default 1 ms);
//   the KV cache has 16-token blocks, kv_cache_mib * 4 of them;
//   after fake_eng_set_fail_after(k), requests end with ENG_EV_ERROR once k tokens are out.
#ifndef MOLT_TESTS_FAKE_ENGINE_H
#define MOLT_TESTS_FAKE_ENGINE_H

void fake_eng_set_step_ms(int ms);
void fake_eng_set_fail_after(int k); // requests fail (ENG_EV_ERROR) after k tokens; -1: never
long fake_eng_cancels(void);  // eng_cancel / eng_release of unfinished requests, cumulative
long fake_eng_submits(void);  // requests accepted, cumulative
int fake_eng_live(void);      // requests not finished yet (all engines)

#endif
