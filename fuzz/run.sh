#!/usr/bin/env bash
# Builds the fuzz targets and runs each in turn, one libFuzzer job at a
# time, from its corpus (corpus/<target>/: the committed seeds plus what
# earlier runs added).
#
#   fuzz/run.sh [SECONDS]          each target for SECONDS (default 30)
#   fuzz/run.sh --runs N           each target for N executions
#   fuzz/run.sh ... TARGET...      only these targets
#
# FUZZ_BUILD_FLAGS are passed to `cargo fuzz build` and `run`: CI uses
# `--dev` (an unoptimised build takes minutes, not the release build's
# quarter of an hour; 30 s of fuzzing needs no speed).
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`). libFuzzer's
# instrumentation needs unstable rustc flags, so on a stable toolchain this
# script sets RUSTC_BOOTSTRAP=1 for its own cargo calls only. A crash stops
# the script with libFuzzer's report; the input is kept in artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1

limit=(-max_total_time=30)
case "${1:-}" in
    --runs) limit=("-runs=${2:?--runs needs a number}"); shift 2 ;;
    ''|*[!0-9]*) ;;
    *) limit=("-max_total_time=$1"); shift ;;
esac
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi

read -r -a build_flags <<< "${FUZZ_BUILD_FLAGS:-}"
cargo fuzz build "${build_flags[@]}"
summary=()
for target in "${targets[@]}"; do
    printf '\n== fuzz %s (%s)\n' "$target" "${limit[*]}"
    log="$(mktemp)"
    # -timeout: an input that takes 10 s is a hang, reported as a crash.
    cargo fuzz run "${build_flags[@]}" "$target" -- "${limit[@]}" -timeout=10 -print_final_stats=1 2>&1 | tee "$log"
    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")"
    rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")"
    corpus="$(find "corpus/$target" -type f | wc -l)"
    summary+=("$(printf '%-20s %12s runs %9s exec/s %6s corpus files' "$target" "$runs" "$rate" "$corpus")")
    rm -f "$log"
done
printf '\n== fuzz summary\n'
printf '%s\n' "${summary[@]}"
