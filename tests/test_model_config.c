// tests/test_model_config.c: config.json parsing for Mistral Small 4: the real 119B numbers,
// the Mistral3 wrapper, q_lora_rank null, defaults, legacy rope keys, each error with its
// exact message, and the rotary settings handed to autograd.
#include "harness/harness.h"
#include "model/model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

// The text config of Mistral Small 4 119B as published (SPECS.md section 1).
#define SMALL4_FIELDS                                                                              \
    "\"hidden_size\": 4096, \"num_hidden_layers\": 36, \"num_attention_heads\": 32,"               \
    "\"num_key_value_heads\": 32, \"vocab_size\": 131072, \"q_lora_rank\": 1024,"                  \
    "\"kv_lora_rank\": 256, \"qk_nope_head_dim\": 64, \"qk_rope_head_dim\": 64,"                   \
    "\"v_head_dim\": 128, \"n_routed_experts\": 128, \"n_shared_experts\": 1,"                     \
    "\"num_experts_per_tok\": 4, \"moe_intermediate_size\": 2048,"                                 \
    "\"intermediate_size\": 12288, \"first_k_dense_replace\": 0, \"n_group\": 1,"                  \
    "\"topk_group\": 1, \"norm_topk_prob\": true, \"routed_scaling_factor\": 1.0,"                 \
    "\"rms_norm_eps\": 1e-06, \"max_position_embeddings\": 1048576,"                               \
    "\"rope_interleave\": true, \"tie_word_embeddings\": false, \"pad_token_id\": 11,"             \
    "\"bos_token_id\": 1, \"eos_token_id\": 2, \"hidden_act\": \"silu\","                          \
    "\"attention_bias\": false,"                                                                   \
    "\"rope_parameters\": {\"rope_type\": \"yarn\", \"rope_theta\": 10000.0, \"factor\": 128.0,"   \
    "\"original_max_position_embeddings\": 8192, \"beta_fast\": 32.0, \"beta_slow\": 1.0,"         \
    "\"mscale\": 1.0, \"mscale_all_dim\": 1.0, \"llama_4_scaling_beta\": 0.1}"

static void check_small4(const mcfg *c) {
    ck_assert_int_eq(c->hidden_size, 4096);
    ck_assert_int_eq(c->num_hidden_layers, 36);
    ck_assert_int_eq(c->num_attention_heads, 32);
    ck_assert_int_eq(c->num_key_value_heads, 32);
    ck_assert_int_eq(c->vocab_size, 131072);
    ck_assert_int_eq(c->q_lora_rank, 1024);
    ck_assert_int_eq(c->kv_lora_rank, 256);
    ck_assert_int_eq(c->qk_nope_head_dim, 64);
    ck_assert_int_eq(c->qk_rope_head_dim, 64);
    ck_assert_int_eq(c->v_head_dim, 128);
    ck_assert_int_eq(c->n_routed_experts, 128);
    ck_assert_int_eq(c->n_shared_experts, 1);
    ck_assert_int_eq(c->num_experts_per_tok, 4);
    ck_assert_int_eq(c->moe_intermediate_size, 2048);
    ck_assert_int_eq(c->intermediate_size, 12288);
    ck_assert_int_eq(c->first_k_dense_replace, 0);
    ck_assert_int_eq(c->n_group, 1);
    ck_assert_int_eq(c->topk_group, 1);
    ck_assert(c->norm_topk_prob);
    ck_assert_double_eq(c->routed_scaling_factor, 1.0);
    ck_assert_double_eq(c->rms_norm_eps, 1e-6);
    ck_assert_int_eq(c->max_position_embeddings, 1048576);
    ck_assert(c->rope_interleave);
    ck_assert(!c->tie_word_embeddings);
    ck_assert_int_eq(c->pad_token_id, 11);
    ck_assert_int_eq(c->bos_token_id, 1);
    ck_assert_int_eq(c->n_eos, 1);
    ck_assert_int_eq(c->eos_token_ids[0], 2);
    ck_assert(c->rope.yarn);
    ck_assert_double_eq(c->rope.rope_theta, 10000);
    ck_assert_double_eq(c->rope.factor, 128);
    ck_assert_double_eq(c->rope.original_max_position_embeddings, 8192);
    ck_assert_double_eq(c->rope.beta_fast, 32);
    ck_assert_double_eq(c->rope.beta_slow, 1);
    ck_assert_double_eq(c->rope.mscale, 1);
    ck_assert_double_eq(c->rope.mscale_all_dim, 1);
    ck_assert_double_eq(c->rope.llama_4_scaling_beta, 0.1);
    // experts alone: 36 x 128 x 3 x 4096 x 2048 = 116B parameters
    double experts = (double)c->num_hidden_layers * c->n_routed_experts * 3 * c->hidden_size *
                     c->moe_intermediate_size;
    ck_assert_double_eq(experts, 115964116992.0);
}

START_TEST(test_small4_file) {
    char dir[] = "/tmp/molt_cfg_XXXXXX", path[128];
    ck_assert_ptr_nonnull(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    fputs("{\"architectures\": [\"Mistral4ForCausalLM\"], \"model_type\": "
          "\"mistral4\", " SMALL4_FIELDS ", \"torch_dtype\": \"bfloat16\"}",
          f);
    fclose(f);
    mcfg c;
    ck_assert_ok(mcfg_load(path, &c));
    ck_assert(!c.wrapped);
    check_small4(&c);
    unlink(path);
    rmdir(dir);
    ck_assert_int_eq(mcfg_load(path, &c), MOLT_EIO);
    char want[160];
    snprintf(want, sizeof want, "%s: cannot open", path);
    ck_assert_str_eq(molt_err_msg(), want);
}
END_TEST

static molt_status parse(const char *text, mcfg *c) {
    return mcfg_parse(text, strlen(text), "config.json", c);
}

START_TEST(test_wrapper_and_defaults) {
    mcfg c;
    const char *wrapped =
        "{\"architectures\": [\"Mistral3ForConditionalGeneration\"], \"model_type\": \"mistral3\","
        "\"vision_config\": {\"model_type\": \"pixtral\", \"hidden_size\": 1024},"
        "\"text_config\": {\"model_type\": \"mistral4\", " SMALL4_FIELDS "}}";
    ck_assert_ok(parse(wrapped, &c));
    ck_assert(c.wrapped);
    check_small4(&c);
    // every field absent: transformers' defaults, which are the Small 4 values
    ck_assert_ok(parse("{\"model_type\": \"mistral4\"}", &c));
    check_small4(&c);
    // a wrapper whose text_config was saved as a diff against the defaults
    ck_assert_ok(parse("{\"model_type\": \"mistral3\", \"text_config\": {\"model_type\": "
                       "\"mistral4\", \"hidden_size\": 64, \"num_hidden_layers\": 2}}",
                       &c));
    ck_assert(c.wrapped);
    ck_assert_int_eq(c.hidden_size, 64);
    ck_assert_int_eq(c.num_hidden_layers, 2);
    ck_assert_int_eq(c.n_routed_experts, 128);
}
END_TEST

START_TEST(test_variants) {
    mcfg c;
    ck_assert_ok(
        parse("{\"model_type\": \"mistral4\", \"q_lora_rank\": null, \"num_key_value_heads\":"
              " null, \"num_attention_heads\": 8, \"pad_token_id\": null,"
              " \"eos_token_id\": [2, 7]}",
              &c));
    ck_assert_int_eq(c.q_lora_rank, 0);
    ck_assert_int_eq(c.num_key_value_heads, 8);
    ck_assert_int_eq(c.pad_token_id, -1);
    ck_assert_int_eq(c.n_eos, 2);
    ck_assert_int_eq(c.eos_token_ids[1], 7);
    // the older keys: rope_scaling with a top-level rope_theta, "type" instead of "rope_type";
    // mscale terms absent stay 0 ("not given")
    ck_assert_ok(parse("{\"model_type\": \"mistral4\", \"rope_theta\": 50000, \"rope_scaling\": "
                       "{\"type\": \"yarn\", \"factor\": 4, \"original_max_position_embeddings\": "
                       "4096}}",
                       &c));
    ck_assert(c.rope.yarn);
    ck_assert_double_eq(c.rope.rope_theta, 50000);
    ck_assert_double_eq(c.rope.factor, 4);
    ck_assert_double_eq(c.rope.original_max_position_embeddings, 4096);
    ck_assert_double_eq(c.rope.beta_fast, 32);
    ck_assert_double_eq(c.rope.beta_slow, 1);
    ck_assert_double_eq(c.rope.mscale, 0);
    ck_assert_double_eq(c.rope.mscale_all_dim, 0);
    ck_assert_double_eq(c.rope.llama_4_scaling_beta, 0);
    ck_assert_ok(parse("{\"model_type\": \"mistral4\", \"rope_parameters\": {\"rope_type\": "
                       "\"default\", \"rope_theta\": 1000000}}",
                       &c));
    ck_assert(!c.rope.yarn);
    ck_assert_double_eq(c.rope.rope_theta, 1e6);
    ck_assert_double_eq(c.rope.factor, 1);
    // a top-level rope_theta with no rope parameters keeps the default yarn settings
    ck_assert_ok(parse("{\"model_type\": \"mistral4\", \"rope_theta\": 20000}", &c));
    ck_assert(c.rope.yarn);
    ck_assert_double_eq(c.rope.rope_theta, 20000);
    ck_assert_double_eq(c.rope.factor, 128);
}
END_TEST

// Each bad config must fail with `st` and exactly `want`, and leave the output untouched.
static void expect_err(const char *text, molt_status st, const char *want) {
    mcfg c;
    memset(&c, 0x5a, sizeof c);
    mcfg before = c;
    molt_status got = parse(text, &c);
    ck_assert_msg(got == st, "%s: got %s", text, molt_status_name(got));
    ck_assert_str_eq(molt_err_msg(), want);
    ck_assert_int_eq(memcmp(&c, &before, sizeof c), 0);
}

START_TEST(test_errors) {
    expect_err("{\"model_type\": \"mistral4\",}", MOLT_EFORMAT,
               "config.json: not valid JSON: string or '}' expected near '}' (line 1, column 27)");
    expect_err("[1]", MOLT_EFORMAT, "config.json: not a JSON object");
    expect_err("{\"hidden_size\": 4096}", MOLT_EFORMAT, "config.json: model_type is missing");
    expect_err("{\"model_type\": \"llama\"}", MOLT_EFORMAT,
               "config.json: model_type 'llama' is not supported (mistral4, or a wrapper whose "
               "text_config has model_type mistral4)");
    expect_err("{\"model_type\": \"mistral3\", \"text_config\": {\"model_type\": \"ministral3\"}}",
               MOLT_EFORMAT,
               "config.json: model_type 'mistral3' is not supported (mistral4, or a wrapper whose "
               "text_config has model_type mistral4)");
    expect_err("{\"model_type\": 4}", MOLT_EFORMAT,
               "config.json: model_type must be a string, got an integer");
    expect_err("{\"model_type\": \"mistral4\", \"hidden_size\": \"4096\"}", MOLT_EFORMAT,
               "config.json: hidden_size must be an integer, got a string");
    expect_err("{\"model_type\": \"mistral4\", \"hidden_size\": 4096.0}", MOLT_EFORMAT,
               "config.json: hidden_size must be an integer, got a real number");
    expect_err("{\"model_type\": \"mistral4\", \"hidden_size\": null}", MOLT_EFORMAT,
               "config.json: hidden_size must be an integer, got null");
    expect_err("{\"model_type\": \"mistral3\", \"text_config\": {\"model_type\": \"mistral4\", "
               "\"norm_topk_prob\": 1}}",
               MOLT_EFORMAT,
               "config.json: text_config.norm_topk_prob must be a boolean, got an integer");
    expect_err("{\"model_type\": \"mistral4\", \"q_lora_rank\": 0}", MOLT_EFORMAT,
               "config.json: q_lora_rank = 0 is out of range [1, 2147483647]");
    expect_err("{\"model_type\": \"mistral4\", \"rms_norm_eps\": 0}", MOLT_EFORMAT,
               "config.json: rms_norm_eps = 0 must be > 0");
    expect_err("{\"model_type\": \"mistral4\", \"vocab_size\": 10}", MOLT_EFORMAT,
               "config.json: pad_token_id = 11 is out of range [0, 9]");
    expect_err("{\"model_type\": \"mistral4\", \"eos_token_id\": [2, \"x\"]}", MOLT_EFORMAT,
               "config.json: eos_token_id[1] must be a token id in [0, 131071]");
    expect_err(
        "{\"model_type\": \"mistral4\", \"num_experts_per_tok\": 9, \"n_routed_experts\": 8}",
        MOLT_EFORMAT, "config.json: num_experts_per_tok 9 > n_routed_experts 8");
    expect_err("{\"model_type\": \"mistral4\", \"n_group\": 3}", MOLT_EFORMAT,
               "config.json: n_routed_experts 128 is not divisible by n_group 3");
    expect_err("{\"model_type\": \"mistral4\", \"topk_group\": 2}", MOLT_EFORMAT,
               "config.json: topk_group 2 > n_group 1");
    expect_err("{\"model_type\": \"mistral4\", \"qk_rope_head_dim\": 63}", MOLT_EFORMAT,
               "config.json: qk_rope_head_dim 63 must be even and <= 512");
    expect_err("{\"model_type\": \"mistral4\", \"num_key_value_heads\": 5}", MOLT_EFORMAT,
               "config.json: num_attention_heads 32 is not divisible by num_key_value_heads 5");
    expect_err("{\"model_type\": \"mistral4\", \"first_k_dense_replace\": 37}", MOLT_EFORMAT,
               "config.json: first_k_dense_replace 37 > num_hidden_layers 36");
    expect_err("{\"model_type\": \"mistral4\", \"hidden_act\": \"gelu\"}", MOLT_EUNSUPPORTED,
               "config.json: hidden_act 'gelu' is not supported (silu)");
    expect_err("{\"model_type\": \"mistral4\", \"attention_bias\": true}", MOLT_EUNSUPPORTED,
               "config.json: attention_bias true is not supported");
    expect_err("{\"model_type\": \"mistral4\", \"rope_parameters\": [1]}", MOLT_EFORMAT,
               "config.json: rope_parameters must be an object, got an array");
    expect_err("{\"model_type\": \"mistral4\", \"rope_parameters\": {\"factor\": 2}}", MOLT_EFORMAT,
               "config.json: rope_parameters.rope_type is missing");
    expect_err("{\"model_type\": \"mistral4\", \"rope_parameters\": {\"rope_type\": \"dynamic\"}}",
               MOLT_EUNSUPPORTED,
               "config.json: rope_parameters.rope_type 'dynamic' is not supported (yarn, default)");
    expect_err("{\"model_type\": \"mistral3\", \"text_config\": {\"model_type\": \"mistral4\", "
               "\"rope_parameters\": {\"rope_type\": \"yarn\", \"factor\": 8}}}",
               MOLT_EFORMAT,
               "config.json: text_config.rope_parameters.factor and "
               "original_max_position_embeddings are required for rope_type yarn");
    expect_err("{\"model_type\": \"mistral4\", \"rope_scaling\": {\"rope_type\": \"yarn\", "
               "\"factor\": 8, \"original_max_position_embeddings\": 4096, \"beta_fast\": \"32\"}}",
               MOLT_EFORMAT, "config.json: rope_scaling.beta_fast must be a number, got a string");
    expect_err("{\"model_type\": \"mistral4\", \"rope_parameters\": {\"rope_type\": \"yarn\", "
               "\"factor\": 8, \"original_max_position_embeddings\": 4096, \"beta_slow\": 40}}",
               MOLT_EFORMAT, "config.json: rope beta_fast 32 must exceed beta_slow 40");
    expect_err("{\"model_type\": \"mistral4\", \"hidden_size\": 1, \"hidden_size\": 2}",
               MOLT_EFORMAT,
               "config.json: not valid JSON: duplicate object key near '\"hidden_size\"' (line 1, "
               "column 58)");
}
END_TEST

// mcfg_rope_config hands the yarn settings to autograd, which accepts them.
START_TEST(test_rope_config) {
    mcfg c;
    ck_assert_ok(
        parse("{\"model_type\": \"mistral4\", \"qk_rope_head_dim\": 32, \"rope_parameters\": "
              "{\"rope_type\": \"yarn\", \"rope_theta\": 5000, \"factor\": 16, "
              "\"original_max_position_embeddings\": 2048, \"beta_fast\": 24, "
              "\"beta_slow\": 2, \"mscale\": 0.7, \"mscale_all_dim\": 0.5}}",
              &c));
    ag_rope_config rc;
    mcfg_rope_config(&c, &rc);
    ck_assert_double_eq(rc.theta, 5000);
    ck_assert_int_eq(rc.rot_dim, 32);
    ck_assert(rc.yarn);
    ck_assert_double_eq(rc.factor, 16);
    ck_assert_double_eq(rc.original_max_pos, 2048);
    ck_assert_double_eq(rc.beta_fast, 24);
    ck_assert_double_eq(rc.beta_slow, 2);
    ck_assert_double_eq(rc.mscale, 0.7);
    ck_assert_double_eq(rc.mscale_all_dim, 0.5);
    ag_rope_table t;
    ck_assert_ok(ag_rope_table_init(&t, &rc));
    ck_assert_int_eq(t.rot_dim, 32);
    double want = (0.1 * 0.7 * log(16) + 1) / (0.1 * 0.5 * log(16) + 1);
    ck_assert_double_eq_tol(t.attn_factor, want, 1e-12);
    // the Small 4 defaults: mscale == mscale_all_dim, so no attention factor
    ck_assert_ok(parse("{\"model_type\": \"mistral4\"}", &c));
    mcfg_rope_config(&c, &rc);
    ck_assert_ok(ag_rope_table_init(&t, &rc));
    ck_assert_double_eq_tol(t.attn_factor, 1.0, 1e-15);
}
END_TEST

int main(void) {
    Suite *s = suite_create("model_config");
    TCase *tc = tcase_create("mcfg");
    tcase_add_test(tc, test_small4_file);
    tcase_add_test(tc, test_wrapper_and_defaults);
    tcase_add_test(tc, test_variants);
    tcase_add_test(tc, test_errors);
    tcase_add_test(tc, test_rope_config);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
