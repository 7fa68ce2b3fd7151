#!/usr/bin/env bash
# tests/cli_full_disk.sh: HDF5 write failures are molt errors carrying errno's text, never a
# crash (HDF5 1.10 used to segfault at exit after a failed close):
#   - writes past a file-size limit (`ulimit -f`, SIGXFSZ ignored: writes fail with EFBIG)
#     while writing a checkpoint or a molt adapter file (runs everywhere);
#   - a full disk (a small tmpfs, mounted when run as root, skipped otherwise): a training
#     checkpoint and adapter.h5 that do not fit are refused with "No space left on device",
#     nothing half-written is left, the last good checkpoint stays intact and the run
#     resumes from it once there is room.
# $1: the molt binary. The exit status is the verdict.
. "$(dirname "$0")/harness/cli_lib.sh" "$@" || exit 1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

# no_crash NAME WANT: the last run failed with status 1 and a message holding WANT
no_crash() {
    [ "$rc" -eq 1 ] && ok "$1: exit status 1" || bad "$1: exit status $rc (>128: killed by a signal)"
    has_err "$1: message" "$2"
}

run "$molt" init-model --preset tiny --seed 1 --out "$tmp/base"
same "init-model" "$rc" 0
limited() { (trap '' XFSZ; ulimit -f 64; exec "$@"); } # files of 64 KiB at most

# ---- a file-size limit --------------------------------------------------------------------
run limited env TMPDIR="$tmp" "$molt" bench ckpt --quick
no_crash "checkpoint past the file-size limit" "File too large"
run limited "$molt" export --model "$tmp/base" --spec r=64,targets=o_proj+q_a_proj \
    --format molt --out "$tmp/a.h5"
no_crash "adapter file past the file-size limit" "File too large"
[ -e "$tmp/a.h5" ] && bad "a partial adapter file was left" || ok "no partial adapter file"
ls "$tmp" | grep -q '\.tmp-' && bad "temporaries left: $(ls "$tmp")" || ok "no temporaries"

# ---- a full disk --------------------------------------------------------------------------
if [ "$(id -u)" -ne 0 ]; then
    echo "the full-disk part needs root to mount a tmpfs: skipped"
    [ "$failed" -eq 0 ] && exit 77
    cli_done
fi
disk=$tmp/disk
mkdir -p "$disk"
mount -t tmpfs -o size=2m tmpfs "$disk" || { echo "cannot mount a tmpfs: skipped"; exit 77; }
trap 'umount "$disk" 2>/dev/null; rm -rf "$tmp"' EXIT

head -n 16 "$src/configs/data/digits-train.jsonl" >"$tmp/train.jsonl"
cat >"$tmp/c.yaml" <<YAML
model: {path: $tmp/base}
adapter: {r: 4, targets: [q_a_proj, o_proj]}
data: {train: $tmp/train.jsonl, format: alpaca, max_seq_len: 48}
train: {steps: 2, seed: 1}
checkpoint: {every: 1, keep_last: 0}
output_dir: $disk/run
YAML
run "$molt" train --config "$tmp/c.yaml" --quiet
same "a run that fits" "$rc" 0
good=$(sha256sum <"$disk/run/checkpoints/step-2.h5")
# fill the disk, leaving less than a checkpoint (24 KiB)
used=$(du -sk "$disk" | cut -f1)
head -c $(((2048 - used - 24) * 1024)) /dev/zero >"$disk/filler"
run "$molt" train --config "$tmp/c.yaml" --set train.steps=4 --resume auto --quiet
no_crash "checkpoint on a full disk" "No space left on device"
has_err "the message names the checkpoint" "step-3.h5"
ls "$disk/run/checkpoints" | grep -q 'tmp' && bad "half-written checkpoint left" ||
    ok "no half-written checkpoint"
same "the last good checkpoint is intact" "$(sha256sum <"$disk/run/checkpoints/step-2.h5")" "$good"
run "$molt" export --model "$tmp/base" --spec r=64,targets=o_proj+q_a_proj --format molt \
    --out "$disk/a.h5"
no_crash "adapter file on a full disk" "No space left on device"
rm -f "$disk/filler"
run "$molt" train --config "$tmp/c.yaml" --set train.steps=4 --resume auto --quiet
same "resumes once there is room" "$rc" 0
[ -s "$disk/run/checkpoints/step-4.h5" ] && [ -s "$disk/run/adapter.h5" ] &&
    ok "the run finished" || bad "no final checkpoint or adapter"

cli_done
