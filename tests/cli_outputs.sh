#!/usr/bin/env bash
# tests/cli_outputs.sh: what molt writes never destroys what it reads, and never leaves a
# half-written result:
#   - an output equal to, inside, or holding an input is refused before anything is written
#     (merge, quantize, export, init-model, forward), symbolic links and ".." included;
#   - a non-empty output directory is refused without --force, and replaced whole with it
#     (init-model --layout mistral over an HF directory leaves no old weights behind);
#   - a write that fails half-way (a file-size limit, `ulimit -f`, with SIGXFSZ ignored so
#     that writes fail with EFBIG as on a full disk) leaves the previous output as it was,
#     with no temporary files, and says why.
# $1: the molt binary. The exit status is the verdict.
. "$(dirname "$0")/harness/cli_lib.sh" "$@" || exit 1
umask 022

sums() { (cd "$1" && find . -type f | sort | xargs sha256sum); }

run "$molt" init-model --preset tiny --seed 1 --out "$tmp/D"
same "init-model" "$rc" 0
run "$molt" export --model "$tmp/D" --spec r=2,alpha=4,targets=o_proj --b-std 0.1 --out "$tmp/A"
same "export --spec" "$rc" 0
before=$(sums "$tmp/D")
before_a=$(sums "$tmp/A")

# ---- outputs over inputs ----------------------------------------------------------------
refused() { # NAME WANT_IN_STDERR CMD...
    local name=$1 want=$2
    shift 2
    run "$@"
    [ "$rc" -ne 0 ] && ok "$name refused" || bad "$name accepted"
    has_err "$name: message" "$want"
}
refused "merge --out = --model" "is the same as --model" \
    "$molt" merge --model "$tmp/D" --adapter "$tmp/A" --out "$tmp/D"
refused "merge --out inside --model" "lies inside --model" \
    "$molt" merge --model "$tmp/D" --adapter "$tmp/A" --out "$tmp/D/merged"
refused "merge --out = --adapter" "is the same as --adapter" \
    "$molt" merge --model "$tmp/D" --adapter "$tmp/A" --out "$tmp/A" --force
refused "merge --out holding --model (--force)" "which the output would replace" \
    "$molt" merge --model "$tmp/D" --adapter "$tmp/A" --out "$tmp" --force
refused "merge --out via .." "is the same as --model" \
    "$molt" merge --model "$tmp/D" --adapter "$tmp/A" --out "$tmp/A/../D" --force
ln -s "$tmp/D" "$tmp/link"
refused "merge --out through a symbolic link" "is the same as --model" \
    "$molt" merge --model "$tmp/D" --adapter "$tmp/A" --out "$tmp/link" --force
refused "quantize --out = --model" "is the same as --model" \
    "$molt" quantize --model "$tmp/D" --quant nf4 --out "$tmp/D" --force
refused "init-model --out holding --tokenizer" "--tokenizer $tmp/D/tekken.json lies inside" \
    "$molt" init-model --preset tiny --tokenizer "$tmp/D/tekken.json" --out "$tmp/D" --force
refused "export --out = --adapter" "is the same as --adapter" \
    "$molt" export --model "$tmp/D" --adapter "$tmp/A" --out "$tmp/A" --force
refused "forward --out inside --model" "lies inside --model" \
    "$molt" forward --model "$tmp/D" --tokens /dev/null --out "$tmp/D/model.safetensors"
same "the model directory is untouched" "$(sums "$tmp/D")" "$before"
same "the adapter directory is untouched" "$(sums "$tmp/A")" "$before_a"
run "$molt" forward --model "$tmp/D" --tokens <(echo "1 2 3") --out "$tmp/l.safetensors"
same "the model still loads" "$rc" 0

# ---- non-empty output directories -------------------------------------------------------
run "$molt" init-model --preset tiny --seed 2 --layout mistral --out "$tmp/D"
[ "$rc" -ne 0 ] && ok "non-empty --out refused without --force" || bad "non-empty --out accepted"
has_err "non-empty --out: message" "exists and is not empty: pass --force"
same "refused init-model wrote nothing" "$(sums "$tmp/D")" "$before"
cp -r "$tmp/D" "$tmp/H"
run "$molt" init-model --preset tiny --seed 2 --layout mistral --out "$tmp/H" --force
same "init-model --force" "$rc" 0
[ ! -e "$tmp/H/model.safetensors" ] && [ -s "$tmp/H/consolidated.safetensors" ] &&
    ok "--force replaced the directory whole" || bad "old weights left: $(ls "$tmp/H")"
run "$molt" init-model --preset tiny --seed 2 --layout mistral --out "$tmp/M"
same "fresh mistral layout" "$rc" 0
same "--force gives what a fresh directory gets" "$(sums "$tmp/H")" "$(sums "$tmp/M")"
ls "$tmp" | grep -q '\.tmp-\|\.old-' && bad "temporaries left: $(ls "$tmp")" ||
    ok "no temporaries left"
mkdir "$tmp/E"
run "$molt" merge --model "$tmp/D" --adapter "$tmp/A" --out "$tmp/E"
same "an empty --out directory is fine" "$rc" 0
# outputs get the permissions of an ordinary write under the umask (022 here)
same "output directory mode" "$(stat -c %a "$tmp/E")" "$(umask 022; mkdir "$tmp/u"; stat -c %a "$tmp/u")"
same "output file mode" "$(stat -c %a "$tmp/E/config.json")" "644"
run "$molt" merge --model "$tmp/D" --adapter "$tmp/A" --out "$tmp/E"
[ "$rc" -ne 0 ] && ok "merge over its own output needs --force" || bad "merge overwrote"
run "$molt" export --model "$tmp/D" --adapter "$tmp/A" --out "$tmp/E"
[ "$rc" -ne 0 ] && ok "export into a non-empty directory needs --force" || bad "export overwrote"
touch "$tmp/F"
run "$molt" quantize --model "$tmp/D" --quant nf4 --out "$tmp/F" --force
[ "$rc" -ne 0 ] && ok "an --out that is a file is refused" || bad "file replaced by a dir"
has_err "file --out: message" "exists and is not a directory"

# ---- failures half-way leave the old output -----------------------------------------------
limited_write() { (trap '' XFSZ; ulimit -f 2048; exec "$@"); } # 1 MiB files at most
merged=$(sums "$tmp/E")
run limited_write "$molt" merge --model "$tmp/D" --adapter "$tmp/A" --out "$tmp/E" --force
[ "$rc" -ne 0 ] && ok "merge failing half-way exits non-zero" || bad "merge succeeded?"
has_err "merge failing half-way: errno's text" "File too large"
same "merge failing half-way keeps the old output" "$(sums "$tmp/E")" "$merged"
ls "$tmp" | grep -q '\.tmp-\|\.old-' && bad "temporaries left: $(ls "$tmp")" ||
    ok "no temporaries left after the failure"
run "$molt" forward --model "$tmp/D" --tokens <(echo "1 2 3") --out "$tmp/l.safetensors"
logits=$(sha256sum <"$tmp/l.safetensors")
run limited_write "$molt" forward --model "$tmp/D" --tokens <(seq -s ' ' 1 40) \
    --out "$tmp/l.safetensors"
[ "$rc" -ne 0 ] && ok "forward failing half-way exits non-zero" || bad "forward succeeded?"
same "forward failing half-way keeps the old file" "$(sha256sum <"$tmp/l.safetensors")" "$logits"
run limited_write "$molt" export --model "$tmp/D" --adapter "$tmp/A" --format molt \
    --out "$tmp/a.h5"
same "a small export fits" "$rc" 0

cli_done
