// common/opt.h: the command-line conventions every molt command shares, in one parser.
// A command describes its options in a table and hands argv to molt_opts_parse, which
// applies the same rules everywhere:
//   --help / -h anywhere    prints the command's usage text to stdout (exit 0)
//   --name VALUE            a valued option; a missing VALUE, or one that starts with "--",
//                           is refused as missing ("--out needs a value")
//   --name=VALUE            the same, and the only way to pass a value starting with "--"
//   --flag                  a flag; "--flag=x" is refused
//   repeated options        the last value wins, unless the option collects every value
//   anything else           "unknown option '--x'" or "unexpected argument 'x'" (exit 2)
// Messages go to stderr as "CMD: ...", followed by a hint to run "CMD --help".
// Also here: typed readers for option values (integers, numbers, choices) with the same
// message style, for the checks a command makes after parsing.
//
// Not here: what the options mean (each command), the subcommand dispatch (molt.c).
#ifndef MOLT_COMMON_OPT_H
#define MOLT_COMMON_OPT_H

#include <stdbool.h>
#include <stdint.h>

// One option of a command. Exactly one of value, flag and each is set.
typedef struct {
    const char *name;   // "--model"
    const char **value; // a valued option: its (last) value is stored here
    bool *flag;         // a flag: set to true when given
    // a valued option that collects every value: called once per value, in order; returns
    // 0, or 2 after printing why the value is refused
    int (*each)(void *user, const char *value);
} molt_opt;

// Table entries: a valued option, a flag, a valued option collecting every value, the end.
#define MOLT_OPT(name_, dst_) {.name = (name_), .value = (dst_)}
#define MOLT_OPT_FLAG(name_, dst_) {.name = (name_), .flag = (dst_)}
#define MOLT_OPT_EACH(name_, fn_) {.name = (name_), .each = (fn_)}
#define MOLT_OPT_END {.name = NULL}

// Parses argv[first..argc) against opts (terminated by an entry whose name is NULL) for
// the command named cmd ("molt generate"). Returns 0 when the command should run, -1 after
// printing usage for --help (the command then exits 0), 2 after printing a usage error.
// user is passed to each `each` callback.
int molt_opts_parse(const char *cmd, const char *usage, const molt_opt *opts, int argc,
                    char **argv, int first, void *user);

// Prints "CMD: <message>\n(run 'CMD --help' for the options)\n" to stderr and returns 2,
// for usage errors found after parsing (a required option missing, options that exclude
// each other).
int molt_opt_usage_error(const char *cmd, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

// Typed readers of one option's value. Each returns true with *out set, or false after
// printing "CMD: NAME 'VALUE' is not <what is expected>". A NULL value (option not given)
// leaves *out alone and returns true. A bound of INT32_MAX or more (1e300 for numbers)
// counts as none in the message ("an integer >= 0").
bool molt_opt_int(const char *cmd, const char *name, const char *value, int64_t lo, int64_t hi,
                  int64_t *out);
bool molt_opt_uint64(const char *cmd, const char *name, const char *value, uint64_t *out);
// A finite number in [lo, hi].
bool molt_opt_double(const char *cmd, const char *name, const char *value, double lo, double hi,
                     double *out);
// One of choices[0..n): *out gets its index.
bool molt_opt_choice(const char *cmd, const char *name, const char *value,
                     const char *const *choices, int n, int *out);

#endif
