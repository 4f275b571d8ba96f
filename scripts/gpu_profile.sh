#!/usr/bin/env bash
# scripts/gpu_profile.sh: per-kernel GPU time of a decode and a prefill, measured with Nsight
# Compute on the GPU machine (caches not flushed, clocks not locked, so the figures are the
# kernels' real durations in sequence). Called by `scripts/gpu_check.sh --remote` when
# PROFILE=1, or alone:  bash scripts/gpu_profile.sh OUTDIR
# Writes OUTDIR/profile_{decode,prefill,prefill30}.md: time per kernel name, summed over the steps, and
# the share of the total.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/gpu-carry/bin"
OUTDIR="${1:-${OUT:-$ROOT/gpu-out}}"
PRESET="${PROFILE_PRESET:-qwen3-next-80b-a3b}"
mkdir -p "$OUTDIR"
command -v ncu >/dev/null || { echo "ncu not found" >"$OUTDIR/profile_decode.md"; exit 0; }

summarise() { # csv, title, steps
    python3 - "$1" "$2" "$3" <<'PY'
import csv, sys, collections
path, title, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = []
with open(path, newline="") as f:
    lines = [l for l in f if l.startswith('"')]
for r in csv.DictReader(lines):
    if r.get("Metric Name") != "gpu__time_duration.sum":
        continue
    v = float(r["Metric Value"].replace(",", ""))
    unit = r.get("Metric Unit", "nsecond")
    ns = v * {"nsecond": 1, "usecond": 1e3, "msecond": 1e6, "second": 1e9}.get(unit, 1)
    rows.append((r["Kernel Name"].split("(")[0], ns))
by = collections.defaultdict(lambda: [0, 0.0])
for name, ns in rows:
    by[name][0] += 1
    by[name][1] += ns
total = sum(v[1] for v in by.values())
print(f"### {title}\n")
print(f"{len(rows)} kernels, {total/1e3:.1f} us of GPU time in all ({total/1e3/max(steps,1):.1f} us per step over {steps} steps)\n")
print("| kernel | launches | total us | us / launch | share |")
print("| --- | --- | --- | --- | --- |")
for name, (c, ns) in sorted(by.items(), key=lambda kv: -kv[1][1]):
    print(f"| {name} | {c} | {ns/1e3:.1f} | {ns/1e3/c:.2f} | {100*ns/total:.1f}% |")
PY
}

NCU=(ncu --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv)
# Decode: 4 layers, 4 generated tokens after a 1-token prompt (prefill kernels are included
# but are few); the first step compiles/loads modules, which ncu does not time.
"${NCU[@]}" --log-file "$OUTDIR/ncu_decode.csv" "$BIN/moeflux" bench --preset "$PRESET" --layers 4 --device cuda \
    --prompt 0 --gen 4 --context 0 >"$OUTDIR/ncu_decode.out" 2>&1
summarise "$OUTDIR/ncu_decode.csv" "decode, $PRESET x4 layers" 4 >"$OUTDIR/profile_decode.md" 2>&1
"${NCU[@]}" --log-file "$OUTDIR/ncu_prefill.csv" "$BIN/moeflux" bench --preset "$PRESET" --layers 2 --device cuda \
    --prompt 4096 --gen 1 --context 0 >"$OUTDIR/ncu_prefill.out" 2>&1
summarise "$OUTDIR/ncu_prefill.csv" "prefill 4096, $PRESET x2 layers" 1 >"$OUTDIR/profile_prefill.md" 2>&1
# Qwen3-30B-A3B prefill of 4096 tokens in one chunk (all attention layers: where its prefill
# time goes when it is slower at 4096 than at 512).
"${NCU[@]}" --log-file "$OUTDIR/ncu_prefill30.csv" "$BIN/moeflux" bench --preset qwen3-30b-a3b --layers 2 --device cuda \
    --prompt 4096 --prefill-chunk 4096 --gen 1 --context 0 >"$OUTDIR/ncu_prefill30.out" 2>&1
summarise "$OUTDIR/ncu_prefill30.csv" "prefill 4096 (one chunk), qwen3-30b-a3b x2 layers" 1 >"$OUTDIR/profile_prefill30.md" 2>&1
cat "$OUTDIR/profile_decode.md" "$OUTDIR/profile_prefill.md" "$OUTDIR/profile_prefill30.md"
