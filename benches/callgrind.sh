#!/bin/sh
# Instructions per call through keyward, counted by callgrind: repeatable where wall-clock
# figures are not (a loaded machine changes latencies, not instruction counts).
#
#   benches/callgrind.sh [KEYWARD_BIN] [N1] [N2] [CONNECTIONS]
#
# Runs keyward (default: the release build `cargo bench` uses) under
# `valgrind --tool=callgrind` twice through `cargo bench --bench compare -- --calls N`, once
# with N1 and once with N2 calls (default 200 and 1200, one connection), and prints
# (Ir(N2) - Ir(N1)) / (N2 - N1): the instructions one call costs with start-up, provisioning
# and shutdown subtracted. Then the functions with the most inclusive instructions in the N2
# run. Output files stay in target/bench/callgrind/. COMPARE=<built compare bench binary> skips
# cargo (e.g. target/release/deps/compare-<hash>, as `cargo bench --bench compare` printed it).
# PEER=nginx counts nginx instead (one process, no master), for the same calls.
set -eu
cd "$(dirname "$0")/.."
bin=${1:-}
n1=${2:-200}
n2=${3:-1200}
conns=${4:-1}
out=target/bench/callgrind
mkdir -p "$out"
tag=$(date +%s)
run() {
    file="$out/callgrind.$tag.$1.out"
    set -- --calls "$1" --calls-conns "$conns" \
        --keyward-wrap "valgrind --tool=callgrind --callgrind-out-file=$PWD/$file"
    if [ -n "${PEER:-}" ]; then
        set -- "$@" --calls-peer "$PEER"
    fi
    if [ -n "$bin" ]; then
        set -- "$@" --keyward-bin "$bin"
    fi
    if [ -n "${COMPARE:-}" ]; then
        "$COMPARE" "$@" >&2
    else
        cargo bench --bench compare -- "$@" >&2
    fi
}
total() {
    # The `summary:` (or `totals:`) line of a callgrind output file: Ir of the whole run.
    awk '/^(summary|totals):/ { print $2; exit }' "$1"
}
run "$n1"
run "$n2"
a=$(total "$out/callgrind.$tag.$n1.out")
b=$(total "$out/callgrind.$tag.$n2.out")
echo "Ir($n1 calls) = $a"
echo "Ir($n2 calls) = $b"
echo "instructions per call: $(( (b - a) / (n2 - n1) ))"
# Per function, inclusive instructions per call: the same difference, function by function.
for n in "$n1" "$n2"; do
    callgrind_annotate --inclusive=yes --threshold=100 \
        "$out/callgrind.$tag.$n.out" >"$out/callgrind.$tag.$n.txt" 2>/dev/null
done
python3 - "$out/callgrind.$tag.$n1.txt" "$out/callgrind.$tag.$n2.txt" "$n1" "$n2" "${TOP:-45}" <<'PY'
import re, sys
def table(path):
    rows = {}
    for line in open(path, errors="replace"):
        m = re.match(r"\s*([\d,]+) \([^)]*\)\s+(\S.*)$", line)
        if m and "PROGRAM TOTALS" not in line:
            name = re.sub(r" \[[^]]*\]$", "", m.group(2))
            rows[name] = rows.get(name, 0) + int(m.group(1).replace(",", ""))
    return rows
a, b = table(sys.argv[1]), table(sys.argv[2])
calls = int(sys.argv[4]) - int(sys.argv[3])
per = sorted(((b[k] - a.get(k, 0)) / calls, k) for k in b)
print("inclusive instructions per call, by function:")
for ir, name in reversed(per[-int(sys.argv[5]):]):
    print(f"{ir:12,.0f}  {name[:150]}")
PY
