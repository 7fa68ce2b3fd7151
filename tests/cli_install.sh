#!/usr/bin/env bash
# tests/cli_install.sh: molt installs like a tool: `cmake --install BUILD --prefix P` puts
# P/bin/molt and P/share/molt/{models,tokenizers,train,data}; the installed binary finds its
# presets and tokenizers from its prefix from any working directory, before
# $MOLT_DATA_DIR; a binary that is not installed takes $MOLT_DATA_DIR, then the source tree
# it was built from; `cpack -G DEB` makes a Debian package holding the same files (listed
# with dpkg-deb -c; that part is skipped where cpack or dpkg-deb are missing).
# $1: the molt binary, in its build directory. The exit status is the verdict.
. "$(dirname "$0")/harness/cli_lib.sh" "$@" || exit 1
build=$(cd "$(dirname "$molt")" && pwd)
[ -f "$build/cmake_install.cmake" ] || { echo "no cmake_install.cmake beside $molt: skipped"; exit 77; }

run cmake --install "$build" --prefix "$tmp/p"
same "cmake --install" "$rc" 0
for f in bin/molt share/molt/models/tiny.json share/molt/models/mistral-small-4.json \
    share/molt/tokenizers/tekken.json share/molt/tokenizers/deepseek-v3-tokenizer.json \
    share/molt/train/quickstart.yaml share/molt/data/digits-train.jsonl; do
    [ -s "$tmp/p/$f" ] && ok "installed $f" || bad "missing $f"
done
# the data directory `molt info` reports, run from another directory without the
# variables the tests set
data_line() {
    (cd "$tmp/elsewhere" && env -u MOLT_SOURCE_DIR -u MOLT_PRESET_DIR "$@" info) |
        sed -n 's/^data: *\([^ ]*\) .*/\1/p'
}
mkdir -p "$tmp/fake/models" "$tmp/elsewhere"
cp "$src/configs/models/tiny.json" "$tmp/fake/models/"
P=$(cd "$tmp/p" && pwd -P)
fake=$(cd "$tmp/fake" && pwd -P)
built="$build/$(basename "$molt")"
same "installed: data from the prefix" "$(data_line env -u MOLT_DATA_DIR "$P/bin/molt")" \
    "$P/share/molt"
same "installed: the prefix before MOLT_DATA_DIR" \
    "$(data_line env MOLT_DATA_DIR="$tmp/fake" "$P/bin/molt")" "$P/share/molt"
same "build tree: MOLT_DATA_DIR" "$(data_line env MOLT_DATA_DIR="$tmp/fake" "$built")" "$fake"
same "build tree: then the source tree it was built from" \
    "$(data_line env -u MOLT_DATA_DIR "$built")" "$(cd "$src/configs" && pwd -P)"
run env -u MOLT_SOURCE_DIR -u MOLT_DATA_DIR sh -c \
    "cd '$tmp/elsewhere' && '$P/bin/molt' init-model --preset tiny --out '$tmp/m'"
same "installed: init-model --preset tiny from another directory" "$rc" 0
[ -s "$tmp/m/tekken.json" ] && ok "with the installed tokenizer" || bad "no tekken.json"
same "installed --version" "$("$P/bin/molt" --version)" "$("$built" --version)"

if command -v cpack >/dev/null && command -v dpkg-deb >/dev/null; then
    run cpack -G DEB --config "$build/CPackConfig.cmake" -B "$tmp/pkg"
    same "cpack -G DEB" "$rc" 0
    deb=$(ls "$tmp"/pkg/*.deb 2>/dev/null | head -n 1)
    contents=$(dpkg-deb -c "$deb" 2>/dev/null)
    for f in ./usr/bin/molt ./usr/share/molt/models/tiny.json ./usr/share/molt/tokenizers/tekken.json \
        ./usr/share/molt/train/quickstart.yaml; do
        has "the package holds $f" "$contents" "$f"
    done
    has "the package depends on OpenBLAS" "$(dpkg-deb -I "$deb")" "libopenblas0-openmp"
else
    echo "cpack or dpkg-deb missing: the package part is skipped"
fi
cli_done
