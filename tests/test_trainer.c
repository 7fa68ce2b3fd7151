// tests/test_trainer.c: the `molt train` configuration: YAML keys land in the right fields
// (nested sections, lists, flow lists, defaults for what is absent), --set overrides values
// and lists, the adapter keys become a lora spec that parses back to the same settings,
// every error names the key and FILE:LINE (or the --set item), unsupported settings are
// refused, the resolved YAML loads back to the same configuration, and data.eval_split
// parses, round-trips and is refused with data.eval or at 0.5 and above.
#include "harness/harness.h"
#include "adapters/adapters.h"
#include "train/trainer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char g_path[64];

// Writes text to a temporary YAML file; returns its path.
static const char *yaml(const char *text) {
    snprintf(g_path, sizeof g_path, "/tmp/molt_trcfg_XXXXXX");
    int fd = mkstemp(g_path);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq((int)write(fd, text, strlen(text)), (int)strlen(text));
    close(fd);
    return g_path;
}

static const char *base_yaml =
    "model:\n"
    "  path: /m\n"
    "adapter:\n"
    "  r: 4\n"
    "  alpha: 12\n"
    "  targets: [q_a_proj, o_proj]\n"
    "data:\n"
    "  train:\n"
    "    - a.jsonl\n"
    "    - b.jsonl\n"
    "  max_seq_len: 64\n"
    "train:\n"
    "  steps: 20\n"
    "  grad_accum: 3\n"
    "optim:\n"
    "  lr: 0.002\n"
    "schedule:\n"
    "  kind: cosine\n"
    "  warmup_steps: 4\n"
    "output_dir: out\n";

START_TEST(test_keys_and_defaults) {
    trn_config c;
    ck_assert_int_eq(trn_config_load(yaml(base_yaml), NULL, 0, &c), MOLT_OK);
    unlink(g_path);
    ck_assert_str_eq(c.model, "/m");
    ck_assert_str_eq(c.quant, "none");
    ck_assert_int_eq(c.n_train, 2);
    ck_assert_str_eq(c.train_files[1], "b.jsonl");
    ck_assert_int_eq(c.n_eval, 0);
    ck_assert_int_eq(c.max_seq_len, 64);
    ck_assert_int_eq((int)c.steps, 20);
    ck_assert_int_eq(c.grad_accum, 3);
    ck_assert_int_eq(c.batch_size, 1); // default
    ck_assert(c.lr == 0.002);
    ck_assert_int_eq(c.schedule, SCHED_COSINE);
    ck_assert_int_eq((int)c.warmup_steps, 4);
    ck_assert_str_eq(c.output_dir, "out");
    opt_adamw_config d;
    opt_adamw_defaults(&d);
    ck_assert(c.adamw.beta1 == d.beta1 && c.adamw.beta2 == d.beta2 && c.adamw.eps == d.eps);
    ck_assert(c.adamw.weight_decay == 0.0);
    ck_assert(c.max_grad_norm == 1.0);
    ck_assert(c.packing && c.shuffle && !c.activation_checkpointing);
    lora_spec s;
    ck_assert_int_eq(lora_spec_parse(c.adapter, &s), MOLT_OK);
    ck_assert_int_eq(s.r, 4);
    ck_assert(s.alpha == 12);
    ck_assert_int_eq(s.n_targets, 2);
    ck_assert_str_eq(s.targets[0], "q_a_proj");
    ck_assert_str_eq(s.targets[1], "o_proj");
}
END_TEST

START_TEST(test_set_overrides) {
    char *sets[] = {"optim.lr=0.5", "data.train=x.jsonl,y.jsonl,z.jsonl", "model.quant=nf4",
                    "adapter.r=16", "schedule.kind=linear", "data.packing=false"};
    trn_config c;
    ck_assert_int_eq(trn_config_load(yaml(base_yaml), sets, 6, &c), MOLT_OK);
    unlink(g_path);
    ck_assert(c.lr == 0.5);
    ck_assert_int_eq(c.n_train, 3);
    ck_assert_str_eq(c.train_files[2], "z.jsonl");
    ck_assert_str_eq(c.quant, "nf4");
    ck_assert_int_eq(c.schedule, SCHED_LINEAR);
    ck_assert(!c.packing);
    lora_spec s;
    ck_assert_int_eq(lora_spec_parse(c.adapter, &s), MOLT_OK);
    ck_assert_int_eq(s.r, 16);
}
END_TEST

// Loads base_yaml with one line replaced (or the sets applied) and checks the message.
static void expect_error(const char *from, const char *to, char **sets, int n_sets,
                         const char *msg_fmt) {
    char text[2048];
    const char *at = strstr(base_yaml, from);
    ck_assert_ptr_nonnull(at);
    snprintf(text, sizeof text, "%.*s%s%s", (int)(at - base_yaml), base_yaml, to,
             at + strlen(from));
    trn_config c;
    const char *p = yaml(text);
    molt_status st = trn_config_load(p, sets, n_sets, &c);
    ck_assert_int_ne(st, MOLT_OK);
    char want[512];
    snprintf(want, sizeof want, msg_fmt, p);
    ck_assert_str_eq(molt_err_msg(), want);
    unlink(p);
}

START_TEST(test_errors_name_key_and_line) {
    expect_error("  max_seq_len: 64\n", "  max_seq_len: lots\n", NULL, 0,
                 "config %s:11: key 'data.max_seq_len': expected an integer >= 2 (a row holds a "
                 "token and the next one to predict), got 'lots'");
    expect_error("  grad_accum: 3\n", "  grad_acum: 3\n", NULL, 0,
                 "config %s:14: unknown key 'train.grad_acum' (run 'molt train --help' for "
                 "the list)");
    expect_error("  kind: cosine\n", "  kind: wavy\n", NULL, 0,
                 "config %s:18: key 'schedule.kind': expected constant, linear or cosine, "
                 "got 'wavy'");
    expect_error("  lr: 0.002\n", "  lr: [1, 2]\n", NULL, 0,
                 "config %s:16: key 'optim.lr' takes a single value");
    expect_error("output_dir: out\n", "", NULL, 0, "config %s: key 'output_dir' is required");
    char *bad_set[] = {"data.packing=maybe"};
    expect_error("x", "x", bad_set, 1,
                 "config --set data.packing=maybe: key 'data.packing': expected true or false, "
                 "got 'maybe'");
    char *unknown_set[] = {"optim.momentum=0.9"};
    expect_error("x", "x", unknown_set, 1,
                 "config --set optim.momentum=0.9: unknown key 'optim.momentum' (run 'molt "
                 "train --help' for the list)");
    char *no_eq[] = {"optim.lr"};
    expect_error("x", "x", no_eq, 1, "config --set 'optim.lr': expected key=value");
    char *ac[] = {"train.activation_checkpointing=maybe"};
    expect_error("x", "x", ac, 1,
                 "config --set train.activation_checkpointing=maybe: key "
                 "'train.activation_checkpointing': expected true or false, got 'maybe'");
}
END_TEST

START_TEST(test_eval_split_key) {
    trn_config c;
    ck_assert_int_eq(trn_config_load(yaml(base_yaml), NULL, 0, &c), MOLT_OK);
    unlink(g_path);
    ck_assert(c.eval_split == 0); // default: off
    ck_assert(!trn_config_has_eval(&c));
    char *sets[] = {"data.eval_split=0.125"};
    ck_assert_int_eq(trn_config_load(yaml(base_yaml), sets, 1, &c), MOLT_OK);
    unlink(g_path);
    ck_assert(c.eval_split == 0.125);
    ck_assert(trn_config_has_eval(&c));
    char *text = trn_config_yaml(&c);
    ck_assert_ptr_nonnull(strstr(text, "  eval_split: 0.125\n"));
    trn_config back;
    ck_assert_int_eq(trn_config_load(yaml(text), NULL, 0, &back), MOLT_OK);
    unlink(g_path);
    ck_assert(back.eval_split == 0.125);
    molt_free(text);
    // an eval file list cleared with --set lets the split stand
    char *cleared[] = {"data.eval=e.jsonl", "data.eval=", "data.eval_split=0.3"};
    ck_assert_int_eq(trn_config_load(yaml(base_yaml), cleared, 3, &c), MOLT_OK);
    unlink(g_path);
    ck_assert_int_eq(c.n_eval, 0);
    ck_assert(c.eval_split == 0.3);
}
END_TEST

START_TEST(test_eval_split_errors) {
    expect_error("  max_seq_len: 64\n", "  max_seq_len: 64\n  eval_split: 0.1\n  eval: e.jsonl\n",
                 NULL, 0,
                 "config %s: keys 'data.eval' and 'data.eval_split' exclude each other (set "
                 "'data.eval=' to clear the files)");
    char *half[] = {"data.eval_split=0.5"};
    expect_error("x", "x", half, 1, "config %s: key 'data.eval_split' must be below 0.5, got 0.5");
    char *neg[] = {"data.eval_split=-0.1"};
    expect_error("x", "x", neg, 1,
                 "config --set data.eval_split=-0.1: key 'data.eval_split': expected a "
                 "non-negative number, got '-0.1'");
}
END_TEST

START_TEST(test_yaml_syntax_error_has_line) {
    trn_config c;
    const char *p = yaml("model:\n  path: /m\n   bad: [\n");
    ck_assert_int_ne(trn_config_load(p, NULL, 0, &c), MOLT_OK);
    char want[128];
    snprintf(want, sizeof want, "config %s:", p);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), want));
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "YAML error"));
    unlink(p);
}
END_TEST

START_TEST(test_resolved_yaml_roundtrips) {
    char *sets[] = {"data.eval=e1.jsonl,e 2#.jsonl", "train.seed=7", "checkpoint.every=5",
                    "optim.weight_decay=0.1", "data.format=alpaca", "model.quant=nf4"};
    trn_config a, b;
    ck_assert_int_eq(trn_config_load(yaml(base_yaml), sets, 6, &a), MOLT_OK);
    unlink(g_path);
    char *text = trn_config_yaml(&a);
    ck_assert_ptr_nonnull(text);
    ck_assert_int_eq(trn_config_load(yaml(text), NULL, 0, &b), MOLT_OK);
    unlink(g_path);
    char *again = trn_config_yaml(&b);
    ck_assert_str_eq(again, text);
    ck_assert_str_eq(b.eval_files[1], "e 2#.jsonl");
    ck_assert_int_eq((int)b.seed, 7);
    ck_assert_str_eq(b.adapter, a.adapter);
    ck_assert(b.adamw.weight_decay == 0.1);
    molt_free(again);
    molt_free(text);
}
END_TEST

// The command-line and YAML conventions: --set takes YAML flow lists as well as comma lists,
// a list given to a single-valued key is refused, duplicate YAML keys are an error (written
// twice in one mapping, or once nested and once dotted), a directory is not a config file,
// data.max_seq_len 1 gets a user-level message, data.train items take mixing weights
// (FILE@W, W > 0, and no weights on evaluation files), train.on_nonfinite is stop or skip.
START_TEST(test_conventions) {
    char *flow[] = {"data.train=[x.jsonl, \"y z.jsonl\", w.jsonl@2.5]",
                    "adapter.targets=[q_a_proj]", "train.on_nonfinite=skip"};
    trn_config c;
    ck_assert_ok(trn_config_load(yaml(base_yaml), flow, 3, &c));
    unlink(g_path);
    ck_assert_int_eq(c.n_train, 3);
    ck_assert_str_eq(c.train_files[1], "y z.jsonl");
    ck_assert_str_eq(c.train_files[2], "w.jsonl@2.5");
    ck_assert(c.nonfinite_skip);
    lora_spec sp;
    ck_assert_ok(lora_spec_parse(c.adapter, &sp));
    ck_assert_int_eq(sp.n_targets, 1);
    char *text = trn_config_yaml(&c);
    ck_assert_ptr_nonnull(strstr(text, "  on_nonfinite: skip\n"));
    molt_free(text);
    char *list_to_scalar[] = {"optim.lr=[1, 2]"};
    expect_error("x", "x", list_to_scalar, 1,
                 "config --set optim.lr=[1, 2]: key 'optim.lr' takes a single value, not a list");
    char *bad_flow[] = {"data.train=[a, [b]]"};
    expect_error("x", "x", bad_flow, 1,
                 "config --set data.train=[a, [b]]: key 'data.train': list items must be "
                 "scalars");
    expect_error("  grad_accum: 3\n", "  grad_accum: 3\n  steps: 5\n", NULL, 0,
                 "config %s:15: key 'train.steps' appears twice (first at line 13)");
    expect_error("output_dir: out\n", "output_dir: out\ntrain.steps: 9\n", NULL, 0,
                 "config %s:21: key 'train.steps' is set twice (first at line 13)");
    expect_error("output_dir: out\n", "output_dir: out\ntrain:\n  seed: 3\n", NULL, 0,
                 "config %s:21: key 'train' appears twice (first at line 12)");
    expect_error("  max_seq_len: 64\n", "  max_seq_len: 1\n", NULL, 0,
                 "config %s:11: key 'data.max_seq_len': expected an integer >= 2 (a row holds "
                 "a token and the next one to predict), got '1'");
    char *zero_w[] = {"data.train=a.jsonl@0"};
    expect_error("x", "x", zero_w, 1,
                 "config %s: key 'data.train': data input 'a.jsonl@0': mixing weight '0' is "
                 "not a number > 0");
    char *neg_w[] = {"data.train=a.jsonl@-1"};
    expect_error("x", "x", neg_w, 1,
                 "config %s: key 'data.train': data input 'a.jsonl@-1': mixing weight '-1' is "
                 "not a number > 0");
    char *eval_w[] = {"data.eval=e.jsonl@2"};
    expect_error("x", "x", eval_w, 1,
                 "config %s: key 'data.eval': 'e.jsonl@2': evaluation files take no mixing "
                 "weight");
    char *nf[] = {"train.on_nonfinite=ignore"};
    expect_error("x", "x", nf, 1,
                 "config --set train.on_nonfinite=ignore: key 'train.on_nonfinite': expected "
                 "stop or skip, got 'ignore'");
    ck_assert_int_eq(trn_config_load("/tmp", NULL, 0, &c), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "config /tmp is a directory (give the YAML file)");
}
END_TEST

// Every key of --help has its line of help.
START_TEST(test_every_key_has_help) {
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    trn_config_print_keys(f);
    fclose(f);
    int lines = 0;
    for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n"), lines++) {
        char key[64], help[8];
        ck_assert_msg(sscanf(line, " %63s %7s", key, help) == 2, "no help: '%s'", line);
    }
    ck_assert_int_ge(lines, 40);
    free(buf);
}
END_TEST

int main(void) {
    Suite *s = suite_create("trainer");
    TCase *tc = tcase_create("config");
    tcase_add_test(tc, test_keys_and_defaults);
    tcase_add_test(tc, test_set_overrides);
    tcase_add_test(tc, test_errors_name_key_and_line);
    tcase_add_test(tc, test_eval_split_key);
    tcase_add_test(tc, test_eval_split_errors);
    tcase_add_test(tc, test_yaml_syntax_error_has_line);
    tcase_add_test(tc, test_resolved_yaml_roundtrips);
    tcase_add_test(tc, test_conventions);
    tcase_add_test(tc, test_every_key_has_help);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
