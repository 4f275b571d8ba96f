#!/usr/bin/env bash
# scripts/gpu_check.sh: check the CUDA backend on the GPU machine (which has no Rust toolchain).
#
#   scripts/gpu_check.sh            here: build the release test binaries (CUDA parity, CUDA model
#                                   tests, engine golden tests) and the moeflux binary, copy them
#                                   into gpu-carry/ (git-ignored), print the `run` command to use.
#   scripts/gpu_check.sh --remote   on the GPU machine: run the parity tests (one process per
#                                   test, so a device fault cannot hide the other results), the
#                                   model tests, the engine golden tests with
#                                   MOEFLUX_TEST_DEVICE=cuda, compute-sanitizer memcheck on the
#                                   parity binary (and racecheck on the shared-memory-heavy
#                                   cases), and write $OUT/summary.md and $OUT/logs.tar.gz.
#
# Environment (local mode): CARGO_TARGET_DIR (default <repo>/target), JOBS (cargo -j, default
# cargo's own), SKIP_BIN=1 to skip building the moeflux binary. Remote: BUDGET (seconds for all
# checks, default 270), STORE_BENCH=1 (tiered-store benchmarks), PROFILE=1 (per-kernel times
# under Nsight Compute, scripts/gpu_profile.sh).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CARRY="$ROOT/gpu-carry"

# ----------------------------------------------------------------------------- local (build)
if [ "${1:-}" != "--remote" ]; then
    set -e
    cd "$ROOT"
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
    JOBS_ARG=()
    if [ -n "${JOBS:-}" ]; then JOBS_ARG=(-j "$JOBS"); fi

    # Prints "<test target name> <executable>" for each test binary cargo builds.
    executables() {
        python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m.get("profile", {}).get("test"):
        print(m["target"]["name"], m["executable"])
'
    }

    rm -rf "$CARRY"
    mkdir -p "$CARRY/bin"
    echo "== building test binaries (release) in $CARGO_TARGET_DIR"
    {
        cargo test --release "${JOBS_ARG[@]}" -p moeflux-cuda --test parity --test models --no-run --message-format=json
        cargo test --release "${JOBS_ARG[@]}" -p moeflux-engine --test golden --no-run --message-format=json
    } | executables | while read -r name exe; do
        cp "$exe" "$CARRY/bin/$name"
        echo "   $name <- $exe"
    done
    for t in parity models golden; do
        [ -x "$CARRY/bin/$t" ] || { echo "missing test binary: $t" >&2; exit 1; }
    done
    echo "== building the kernel benchmark"
    cargo build --release "${JOBS_ARG[@]}" -p moeflux-cuda --example kernel_bench
    cp "$CARGO_TARGET_DIR/release/examples/kernel_bench" "$CARRY/bin/kernel_bench"
    if [ "${SKIP_BIN:-0}" != "1" ] && grep -q 'name = "moeflux"' crates/cli/Cargo.toml 2>/dev/null; then
        echo "== building the moeflux binary"
        cargo build --release "${JOBS_ARG[@]}" -p moeflux
        cp "$CARGO_TARGET_DIR/release/moeflux" "$CARRY/bin/moeflux"
    fi
    # Host debug info is not needed there (kernels carry -lineinfo); keeps the carry small.
    if command -v strip >/dev/null; then strip --strip-debug "$CARRY"/bin/* || true; fi
    # Tests locate fixtures through paths fixed at build time; the remote side re-creates it.
    echo "$ROOT" >"$CARRY/build_root"
    git -C "$ROOT" rev-parse --short HEAD >"$CARRY/commit" 2>/dev/null || echo unknown >"$CARRY/commit"
    du -sh "$CARRY"
    cat <<EOF

gpu-carry/ is ready. Run on the GPU machine with the device tool:
  run(command="bash scripts/gpu_check.sh --remote", carry=["gpu-carry"], timeout_s=300)
Results come back under \$OUT: summary.md and logs.tar.gz.
EOF
    exit 0
fi

# ----------------------------------------------------------------------------- remote (run)
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu-out}"
LOGS="$OUT/logs"
mkdir -p "$LOGS"
BIN="$CARRY/bin"
SUMMARY="$OUT/summary.md"
export MOEFLUX_FIXTURES="$ROOT/tests/fixtures"
export MOEFLUX_KERNEL_CACHE="${MOEFLUX_KERNEL_CACHE:-/tmp/moeflux-kernel-cache}"
export RUST_BACKTRACE=1

# The engine's golden test finds fixtures under the source path it was built in.
BUILD_ROOT="$(cat "$CARRY/build_root" 2>/dev/null || echo "")"
if [ -n "$BUILD_ROOT" ] && [ "$BUILD_ROOT" != "$ROOT" ] && [ ! -e "$BUILD_ROOT" ]; then
    mkdir -p "$(dirname "$BUILD_ROOT")" && ln -s "$ROOT" "$BUILD_ROOT" || echo "warning: could not link $BUILD_ROOT" >&2
fi

ROWS=()
row() { ROWS+=("| $1 | $2 | $3 | $4 |"); }
now() { date +%s.%N; }
# Everything must fit one device call: checks get at most what is left of BUDGET seconds.
START=$(date +%s)
BUDGET="${BUDGET:-270}"
left() { # min(wanted, remaining budget)
    local rem=$((START + BUDGET - $(date +%s)))
    if [ "$1" -lt "$rem" ]; then echo "$1"; else echo "$rem"; fi
}
secs() { python3 -c "print(f'{$2 - $1:.1f}')" 2>/dev/null || echo "?"; }

{
    echo "# moeflux GPU check"
    echo
    echo "- commit: $(cat "$CARRY/commit" 2>/dev/null || echo unknown)"
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
    echo
} >"$SUMMARY"

# 1. parity: one process per test
PASS=0
FAIL=0
SKIP=0
FAILED=()
T0=$(now)
mapfile -t TESTS < <("$BIN/parity" --list --format terse 2>/dev/null | sed -n 's/: test$//p')
for t in "${TESTS[@]}"; do
    log="$LOGS/parity.$t.log"
    s=$(now)
    to=$(left 120)
    if [ "$to" -lt 5 ]; then
        row "parity: $t" "not run" "" "time budget spent"
        continue
    fi
    timeout "$to" "$BIN/parity" --exact "$t" --nocapture --test-threads=1 >"$log" 2>&1
    rc=$?
    dt=$(secs "$s" "$(now)")
    if grep -q "skipping: no CUDA device" "$log"; then
        SKIP=$((SKIP + 1))
        row "parity: $t" "SKIP" "$dt" "$(grep -m1 'skipping' "$log")"
    elif [ $rc -eq 0 ]; then
        PASS=$((PASS + 1))
        worst=$(grep -o 'rel err [0-9.e+-]*' "$log" | awk '{print $3}' | sort -g | tail -1)
        row "parity: $t" "pass" "$dt" "worst rel err ${worst:-exact}"
    else
        FAIL=$((FAIL + 1))
        FAILED+=("$t")
        why=$(grep -m1 -E "rel err .* > |panicked|error|unwritten|element" "$log" | tr '|' '/' | cut -c1-160)
        row "parity: $t" "**FAIL** (rc $rc)" "$dt" "$why"
    fi
done
PARITY_DT=$(secs "$T0" "$(now)")

# 2. CUDA model tests (whole fixtures vs CPU and references)
run_check() { # name, timeout, log, command...
    local name=$1 to log=$3
    to=$(left "$2")
    shift 3
    if [ "$to" -lt 5 ]; then
        row "$name" "not run" "" "time budget spent"
        return
    fi
    local s rc dt
    s=$(now)
    timeout "$to" "$@" >"$log" 2>&1
    rc=$?
    dt=$(secs "$s" "$(now)")
    local res="pass"
    [ $rc -eq 0 ] || res="**FAIL** (rc $rc)"
    [ $rc -eq 124 ] && res="**TIMEOUT**"
    local notes
    notes=$(grep -E "test result|rel err|ERROR SUMMARY|FAILED|panicked" "$log" | tail -4 | tr '\n|' '; ' | cut -c1-220)
    row "$name" "$res" "$dt" "$notes"
}
run_check "models (CUDA vs CPU vs references)" 150 "$LOGS/models.log" "$BIN/models" --nocapture --test-threads=1
MOEFLUX_TEST_DEVICE=cuda run_check "engine golden, MOEFLUX_TEST_DEVICE=cuda" 150 "$LOGS/golden_cuda.log" "$BIN/golden" --nocapture --test-threads=1

# 3. end-to-end benchmarks (moeflux bench: decode vs the bandwidth floor, prefill) and a
#    sanitizer pass over a real generation
if [ -x "$BIN/moeflux" ]; then
    run_check "bench qwen3-next-80b-a3b" 170 "$LOGS/bench_next80b.log" "$BIN/moeflux" bench --preset qwen3-next-80b-a3b --device cuda --prompt 512,4096 --prefill-chunk 4096 --gen 64 --context 0,4096,32768 --json "$OUT/bench_next80b.json"
    run_check "bench qwen3-30b-a3b" 110 "$LOGS/bench_30b.log" "$BIN/moeflux" bench --preset qwen3-30b-a3b --device cuda --prompt 512,4096 --prefill-chunk 4096 --gen 64 --context 0,4096 --json "$OUT/bench_30b.json"
    if [ "${STORE_BENCH:-0}" = "1" ]; then
        # Tiered store: experts in a packed directory on this machine's disk (written once per
        # preset), host-RAM slab, VRAM cache. qwen3-next x8 layers: 4096 expert records of
        # 1.77 MB (7.25 GB): all in VRAM, half, none. qwen3.5-397b x2 layers: 1024 records of
        # 7.1 MB with a 2 GiB VRAM cache, uniform routing and with the locality of real models.
        # The ctx-64 row runs after the ctx-0 one in the same process: warm caches. A resident
        # run of the same 8 layers is the reference; the half budget also runs without layer
        # pinning (one LRU over every layer).
        run_check "bench next-80b x8 resident (reference)" 60 "$LOGS/bench_store80_resident.log" "$BIN/moeflux" bench --preset qwen3-next-80b-a3b --layers 8 --device cuda --prompt 0 --gen 64 --context 0,64 --json "$OUT/bench_store80_resident.json"
        # RUST_LOG=moeflux_cuda=info: the measured copy and CPU costs of the split go in the log.
        S80=(bench --preset qwen3-next-80b-a3b --layers 8 --device cuda --store /tmp/moeflux-store80 --host-mem 12GiB --preload-experts --prompt 0 --gen 128 --context 0,64)
        run_check "bench store next-80b x8: VRAM all" 200 "$LOGS/bench_store80_all.log" env RUST_LOG=moeflux_cuda=info "$BIN/moeflux" "${S80[@]}" --gpu-mem 8GiB --json "$OUT/bench_store80_all.json"
        run_check "bench store next-80b x8: VRAM half" 100 "$LOGS/bench_store80_half.log" env RUST_LOG=moeflux_cuda=info "$BIN/moeflux" "${S80[@]}" --gpu-mem 3625MiB --json "$OUT/bench_store80_half.json"
        run_check "bench store next-80b x8: VRAM half, no pinning" 100 "$LOGS/bench_store80_half_lru.log" env MOEFLUX_PIN_LAYERS=0 RUST_LOG=moeflux_cuda=info "$BIN/moeflux" "${S80[@]}" --gpu-mem 3625MiB --json "$OUT/bench_store80_half_lru.json"
        run_check "bench store next-80b x8: VRAM half, no CPU misses" 100 "$LOGS/bench_store80_half_nocpu.log" env MOEFLUX_CPU_MISSES=0 "$BIN/moeflux" "${S80[@]}" --gpu-mem 3625MiB --json "$OUT/bench_store80_half_nocpu.json"
        run_check "bench store next-80b x8: VRAM none" 100 "$LOGS/bench_store80_none.log" env RUST_LOG=moeflux_cuda=info "$BIN/moeflux" "${S80[@]}" --gpu-mem 0 --json "$OUT/bench_store80_none.json"
        run_check "bench store next-80b x8: VRAM none, no CPU misses" 100 "$LOGS/bench_store80_none_nocpu.log" env MOEFLUX_CPU_MISSES=0 "$BIN/moeflux" "${S80[@]}" --gpu-mem 0 --json "$OUT/bench_store80_none_nocpu.json"
        S397=(bench --preset qwen3.5-397b-a17b --layers 2 --device cuda --store /tmp/moeflux-store397 --host-mem 8GiB --gpu-mem 2GiB --prompt 0 --gen 32)
        run_check "bench store 397b x2: uniform" 200 "$LOGS/bench_store397_uniform.log" "$BIN/moeflux" "${S397[@]}" --json "$OUT/bench_store397_uniform.json"
        run_check "bench store 397b x2: locality 0.67" 100 "$LOGS/bench_store397_local.log" "$BIN/moeflux" "${S397[@]}" --routing-locality 0.67 --json "$OUT/bench_store397_local.json"
    fi
    run_check "memcheck: generate (bundled model)" 90 "$LOGS/memcheck_generate.log" \
        compute-sanitizer --tool memcheck --error-exitcode 99 "$BIN/moeflux" generate --chat --prompt "4821+377=" --device cuda
fi

# 3b. per-kernel GPU time of a decode and a prefill under Nsight Compute (PROFILE=1)
if [ "${PROFILE:-0}" = "1" ] && [ -x "$BIN/moeflux" ]; then
    run_check "ncu per-kernel profile" 150 "$LOGS/profile.log" bash "$ROOT/scripts/gpu_profile.sh" "$LOGS/profile"
fi

# 4. kernel throughput (ratios to the bandwidth floor; details in the bench section below)
if [ -x "$BIN/kernel_bench" ]; then
    run_check "kernel_bench" 60 "$LOGS/kernel_bench.log" "$BIN/kernel_bench"
fi

# 5. compute-sanitizer (gets what is left of the budget)
if command -v compute-sanitizer >/dev/null; then
    run_check "memcheck: parity (all tests)" 240 "$LOGS/memcheck.log" \
        compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 99 --print-limit 20 "$BIN/parity" --test-threads=1
    for t in gated_delta moe_block_chain attention; do
        run_check "racecheck: parity $t" 90 "$LOGS/racecheck.$t.log" \
            compute-sanitizer --tool racecheck --error-exitcode 99 --print-limit 20 "$BIN/parity" "$t" --test-threads=1
    done
else
    row "compute-sanitizer" "not found" "" ""
fi

{
    echo "Parity: $PASS passed, $FAIL failed, $SKIP skipped (${PARITY_DT}s)${FAILED:+; failed: ${FAILED[*]}}"
    echo
    echo "| check | result | seconds | notes |"
    echo "| --- | --- | --- | --- |"
    printf '%s\n' "${ROWS[@]}"
    echo
    echo "Logs: logs.tar.gz (one log per check)"
    for b in bench_next80b bench_30b bench_store80_resident bench_store80_all bench_store80_half bench_store80_half_lru bench_store80_half_nocpu bench_store80_none bench_store80_none_nocpu bench_store397_uniform bench_store397_local; do
        if [ -s "$LOGS/$b.log" ]; then
            echo
            echo "## $b"
            echo
            echo '```'
            grep -E '^preset|^prefill|^decode|built in|experts|tier|VRAM|RAM|disk|pinned|^error|expert misses' "$LOGS/$b.log" | head -24
            echo '```'
        fi
    done
    if [ -s "$LOGS/memcheck_generate.log" ]; then
        echo
        echo "## generate under memcheck"
        echo
        echo '```'
        tail -5 "$LOGS/memcheck_generate.log"
        echo '```'
    fi
    for f in "$LOGS"/profile/profile_decode.md "$LOGS"/profile/profile_prefill.md "$LOGS"/profile/profile_prefill30.md; do
        if [ -s "$f" ]; then
            echo
            cat "$f"
        fi
    done
    if [ -s "$LOGS/kernel_bench.log" ]; then
        echo
        echo "## kernel_bench"
        echo
        grep -E '^\||device:|measured|prefill|kernel modules' "$LOGS/kernel_bench.log"
    fi
} >>"$SUMMARY"
# One archive: the device tool returns a limited number of files.
tar czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$LOGS"
cat "$SUMMARY"
