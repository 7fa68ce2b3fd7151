// adapters/adapters.h: the public API of molt's adapters module: LoRA specifications
// (targets, ranks, alphas, init), attaching LoRA matrices to a loaded mdl_model, counting
// trainable parameters per module group, adapter files (molt's own and PEFT directories),
// and merging an adapter into the base weights.
//
// Every adaptable module is a "unit" named by its Hugging Face path:
//   model.layers.N.self_attn.{q_a_proj,q_b_proj,q_proj,kv_a_proj_with_mqa,kv_b_proj,o_proj}
//   model.layers.N.mlp.{gate_proj,up_proj,down_proj}            (dense layers)
//   model.layers.N.mlp.shared_experts.{gate_proj,up_proj,down_proj}
//   model.layers.N.mlp.gate                                     (router, optional)
//   model.layers.N.mlp.experts.{gate_up_proj,down_proj}         (routed experts, 3-D)
//   lm_head                                                     (optional)
// A 2-D unit has A [r, in] and B [out, r]; a routed-expert unit holds PEFT's
// target_parameters layout: A [r*E, in] (rows e*r..e*r+r-1 are expert e) and
// B [out, r*E] (column k*E + e is expert e, rank k).
//
// Not here: the optimizer and checkpoints (train/), the adapter registry for serving.
#ifndef MOLT_ADAPTERS_H
#define MOLT_ADAPTERS_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "../autograd/autograd.h"
#include "../common/err.h"
#include "../model/model.h"

// Module groups, for per-group rank/alpha and the parameter table.
typedef enum {
    LORA_GROUP_ATTN,    // self_attn projections
    LORA_GROUP_DENSE,   // dense-layer MLP (layers below first_k_dense_replace)
    LORA_GROUP_SHARED,  // shared experts
    LORA_GROUP_EXPERTS, // routed experts (3-D parameters)
    LORA_GROUP_ROUTER,  // mlp.gate
    LORA_GROUP_LM_HEAD, // lm_head
    LORA_GROUP_COUNT
} lora_group;

const char *lora_group_name(lora_group g); // "attn", "dense", "shared", "experts", ...

typedef enum {
    LORA_INIT_KAIMING,  // A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform_ with a=sqrt(5)), B = 0
    LORA_INIT_GAUSSIAN, // A ~ N(0, 1/r), B = 0
    LORA_INIT_ZERO,     // A = B = 0 (filled by a loader)
} lora_init;

#define LORA_MAX_TARGETS 32
#define LORA_MAX_PATTERNS 32
#define LORA_NAME_MAX 128

// A rank_pattern / alpha_pattern entry: key matched like PEFT (the regex (.*\.)?(key)$ on
// the unit's PEFT key), first match in order wins.
typedef struct {
    char key[LORA_NAME_MAX];
    double value;
} lora_pattern;

typedef struct {
    int r;             // default rank (> 0)
    double alpha;      // default lora_alpha
    double dropout;    // on the input of 2-D targets only (PEFT has none on parameters)
    bool rslora;       // scale alpha / sqrt(r) instead of alpha / r
    lora_init init;
    uint64_t seed;
    int n_targets;     // patterns: a unit matches when its path equals the pattern or ends
                       // with "." + pattern; '*' is a glob over any characters
    char targets[LORA_MAX_TARGETS][LORA_NAME_MAX];
    int group_r[LORA_GROUP_COUNT];        // 0 = r
    double group_alpha[LORA_GROUP_COUNT]; // 0 = alpha
    int n_rank_pattern, n_alpha_pattern;  // override groups (PEFT semantics)
    lora_pattern rank_pattern[LORA_MAX_PATTERNS];
    lora_pattern alpha_pattern[LORA_MAX_PATTERNS];
} lora_spec;

// r 8, alpha 16, dropout 0, Kaiming init, seed 0, no targets.
void lora_spec_default(lora_spec *s);
// Parses a compact spec: comma-separated key=value among r, alpha, dropout, rslora (0/1),
// init (kaiming|gaussian), seed, targets (patterns separated by '+'), r.GROUP, alpha.GROUP,
// rank:KEY, alpha:KEY (PEFT rank/alpha patterns). Starts from the defaults. MOLT_EARG names
// the offending item.
molt_status lora_spec_parse(const char *text, lora_spec *s);
// The compact form of s (round-trips through lora_spec_parse); MOLT_EARG when cap is short.
molt_status lora_spec_format(const lora_spec *s, char *buf, size_t cap);
// Whether pattern selects path (PEFT target_modules semantics plus '*' globs).
bool lora_pattern_match(const char *pattern, const char *path);

// How an adapter relates to the model it is made for.
typedef enum {
    LORA_WIRE_FILES = 0,   // files and merging: 2-D units are wired into the model's linears;
                           // routed experts whose two stacks differ in rank are kept unwired
    LORA_WIRE_FORWARD = 1, // training and single-adapter forwards: everything wired (experts
                           // of unequal ranks refused)
    LORA_WIRE_NONE = 2,    // banks (serving, evaluation): nothing of the model is touched, so
                           // any number of adapters may be loaded for one model at once (the
                           // model must stay unchanged while they live); experts as FORWARD
} lora_wire;

// One adapted unit.
typedef struct {
    char path[LORA_NAME_MAX]; // HF module path (routed experts: ...mlp.experts.gate_up_proj)
    lora_group group;
    int layer;                // -1 for lm_head
    int r;
    double alpha, scale;      // scale = alpha / r or alpha / sqrt(r)
    int64_t in, out, n_exp;   // n_exp = E for routed experts, else 1
    mdl_lin *lin;             // the model's linear for 2-D units (NULL for experts)
    ag_tensor *base;          // the frozen base weight [out, in] or [E, out, in]
    ag_tensor *a;             // [r * n_exp, in]
    ag_tensor *b;             // [out, r * n_exp]
    ag_tensor *bp;            // routed experts after lora_pack_experts: b re-laid per expert
                              // [n_exp, out, r] (ag_expert_lora's bp_*), else NULL
} lora_unit;

typedef struct {
    lora_spec spec;
    ag_arena params;          // A and B of every unit
    int n_units;
    lora_unit *units;         // [n_units], in model order
    mdl_model *model;         // the model the 2-D units are wired into
    int64_t group_params[LORA_GROUP_COUNT];
    int64_t total_params;
    ag_rng *dropout_rng;      // owned: the LoRA-dropout stream of every 2-D unit (seeded
                              // from spec.seed); its state belongs in training checkpoints
} lora_adapter;

// Allocates A/B (F32, requires_grad) for every unit the spec's targets select, initializes
// them (spec.init, spec.seed: one ag_rng stream over units in model order) and, unless
// `wire` is LORA_WIRE_NONE, wires them into the model: the lora_a/lora_b/lora_scale fields of the selected mdl_lin, and each MoE
// layer's experts_lora. 2-D units other than the router also get spec.dropout and the
// adapter's dropout_rng (routed experts and the router, adapted as parameters, get none).
// The expert ops take one rank and scale for both expert stacks of a layer: with
// LORA_WIRE_FORWARD or LORA_WIRE_NONE a layer whose gate_up_proj and down_proj differ there
// is refused (MOLT_EUNSUPPORTED); with LORA_WIRE_FILES such experts are kept but not wired.
// Errors: a target pattern matching nothing, or a unit (routed experts included) ending with
// zero parameters (MOLT_EARG); a model already carrying LoRA (MOLT_EARG, unless
// LORA_WIRE_NONE). On failure nothing stays attached and *out is zeroed.
molt_status lora_attach(mdl_model *m, const lora_spec *spec, lora_wire wire,
                        lora_adapter *out);
// The units lora_attach would adapt on m with spec, their ranks and scales, without
// allocating or wiring anything (a and b stay NULL): for memory plans (m may come from
// mdl_create_plan). *units is molt_free'd by the caller. Errors as lora_attach's.
molt_status lora_plan_units(mdl_model *m, const lora_spec *spec, lora_unit **units, int *n);
// Clears the LoRA fields of the model's linears and frees the adapter (NULL-safe).
void lora_detach(lora_adapter *ad);
// Fills every B with N(0, std) from one ag_rng stream seeded with seed (units in order):
// a non-trivial adapter for tests, fixtures and demos.
void lora_randomize_b(lora_adapter *ad, uint64_t seed, double std);
// Prints the trainable parameters per group and the total.
void lora_print_table(const lora_adapter *ad, FILE *f);
// Number of trainable parameters in group g.
int64_t lora_group_params(const lora_adapter *ad, lora_group g);
// The unit with this path, or NULL.
lora_unit *lora_find_unit(lora_adapter *ad, const char *path);

// ---- shards of routed-expert units (adapters/shard.c) ----------------------------------
// On a model holding experts [first, first + count) of E (expert parallelism, model.h's
// mdl_experts_shard), a routed-expert unit holds its experts' part of PEFT's layout: A
// [r*count, in] = rows first*r .. of the full A [r*E, in]; B [out, r*count] with column
// k*count + e = the full B's column k*E + first + e. Files, checkpoints and initialization
// always deal in full matrices (lora_attach draws the full A and keeps its rows, the loaders
// read full tensors and keep their part). Other units are whole on every rank.
bool lora_unit_is_shard(const lora_adapter *ad, const lora_unit *u);
// The full shape of u's A (b false) or B.
void lora_unit_full_shape(const lora_adapter *ad, const lora_unit *u, bool b, int64_t shape[2]);
// shard[numel of u's A or B] = this model's part of the full matrix.
void lora_shard_from_full(const lora_adapter *ad, const lora_unit *u, bool b, const float *full,
                          float *shard);
// full = the matrix whose parts are the shards of every rank of the expert group, given one
// after the other in rank order (an allgather of the shards).
void lora_full_from_shards(const lora_adapter *ad, const lora_unit *u, bool b,
                           const float *shards, float *full);

// ---- PEFT directories (adapters/peft.c) -----------------------------------------------
// PEFT's tensor name of a unit's A or B (`base_model.model.<path>.lora_A.weight`; routed
// experts under their module, with ".base_layer" for gate_up_proj when both expert
// parameters are adapted, as PEFT nests its parameter wrappers).
void lora_peft_tensor_name(const lora_adapter *ad, const lora_unit *u, bool b, char *buf,
                           size_t cap);
// Writes dir/adapter_config.json and dir/adapter_model.safetensors (F32) as PEFT does,
// creating dir when missing. Each file is written to a temporary name and renamed; to
// replace a whole directory at once, write into molt_outdir's temporary (common/fsio.h).
// base_model may be NULL (written as null).
molt_status lora_export_peft(const lora_adapter *ad, const char *dir, const char *base_model);
// Reads a PEFT directory and attaches it to m (see lora_attach for `wire`).
// MOLT_EFORMAT / MOLT_EUNSUPPORTED name the file and key: bad JSON, unsupported options
// (use_dora, bias other than "none", modules_to_save, fan_in_fan_out, layers_to_transform),
// tensors that match no unit, missing tensors, shape mismatches.
molt_status lora_import_peft(mdl_model *m, const char *dir, lora_wire wire,
                             lora_adapter *out);

// ---- molt's adapter file (adapters/h5.c) ----------------------------------------------
// One HDF5 file, the adapter only: root attributes format = "molt-lora", version = 1 and
// spec = lora_spec_format, and one f32 dataset per A and B named by lora_peft_tensor_name.
// lora_save writes a temporary file beside path, syncs it and renames it over path (an HDF5
// failure, such as a full disk, is an error with errno's text); the same adapter always
// gives the same bytes.
molt_status lora_save(const lora_adapter *ad, const char *path);
// Reads a molt adapter file and attaches it to m (see lora_attach for `wire`).
// MOLT_EFORMAT names the file and the attribute or dataset and says what was expected: not
// an HDF5 file, a format other than "molt-lora", another version, a spec that does not
// parse, a missing dataset, a dataset of another shape or type than f32, an object no unit
// names, a truncated or damaged file (HDF5's checksums). Nothing stays attached on failure.
molt_status lora_load(mdl_model *m, const char *path, lora_wire wire, lora_adapter *out);
// A directory holding adapter_config.json (lora_import_peft), a regular file starting with
// HDF5's signature (lora_load), or a training checkpoint (step-N.h5, through the loader set
// with lora_set_checkpoint_loader); anything else is MOLT_EFORMAT, a missing path MOLT_EIO.
molt_status lora_load_any(mdl_model *m, const char *path, lora_wire wire, lora_adapter *out);
// Reads the adapter of a training checkpoint (train/ provides it: adapters/ does not depend
// on the trainer; molt.c sets it at start-up).
typedef molt_status (*lora_checkpoint_loader)(mdl_model *m, const char *path, lora_wire wire,
                                              lora_adapter *out);
void lora_set_checkpoint_loader(lora_checkpoint_loader fn);

// ---- banks (adapters/bank.c) ------------------------------------------------------------
// Puts adapter ad (loaded with LORA_WIRE_NONE for m) into slot s of bank b: every 2-D unit on
// its linear, the routed-expert units of each layer as one ag_expert_lora. The slot is
// cleared first; the bank refers to ad's tensors, which must outlive the slot.
molt_status lora_bank_put(const lora_adapter *ad, const mdl_model *m, mdl_bank *b, int s);
// Gives every routed-expert unit of ad (F32) its B re-laid per expert (lora_unit.bp, in ad's
// parameter arena: as many bytes again as those B), which lora_bank_put then hands to the
// batched expert kernel: serving reads one expert's B as one block. Idempotent.
molt_status lora_pack_experts(lora_adapter *ad);
// Largest rank over ad's units.
int lora_max_rank(const lora_adapter *ad);

// ---- merge (adapters/merge.c) ---------------------------------------------------------
// Adds scale * B A into every adapted base weight (per expert for routed experts) and
// detaches: the model then computes what model+adapter computed.
molt_status lora_merge_into(lora_adapter *ad);

// ---- commands (adapters/cli.c) --------------------------------------------------------
int lora_cmd_export(int argc, char **argv); // molt export
int lora_cmd_merge(int argc, char **argv);  // molt merge

#endif
