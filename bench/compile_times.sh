#!/usr/bin/env bash
# bench/compile_times.sh [OUT_DIR] [CONFIG ...]   (default OUT_DIR: /tmp/isp_compile_times; CONFIG: pch nopch)
#
# Cold builds of the whole tree (library, plugins, `isp`, tests), one per configuration, one after the other on
# the same machine, without ccache: each compiler call goes through a launcher that records its wall time. Prints
# per configuration the build's wall time, the sum of the units' compile times, and the slowest units; then, per
# unit, the two configurations side by side. CONFIG is `pch` (ISP_PRECOMPILED_HEADERS=ON, the default) or `nopch`.
# About 15-20 minutes per configuration on 2 cores. docs/building.md has the figures.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-/tmp/isp_compile_times}"
shift || true
configs=("$@")
[ "${#configs[@]}" -gt 0 ] || configs=(pch nopch)
mkdir -p "$out"
launcher="$out/timed_cxx.sh"
cat >"$launcher" <<'EOF'
#!/usr/bin/env bash
# Runs one compiler call and appends "<seconds> <source>" to $ISP_COMPILE_TIMES.
src="-"
for a in "$@"; do case "$a" in *.cpp|*.cxx|*.cc) src="$a" ;; esac; done
start=$(date +%s.%N)
"$@"
rc=$?
echo "$(echo "$(date +%s.%N) - $start" | bc) $src" >>"$ISP_COMPILE_TIMES"
exit $rc
EOF
chmod +x "$launcher"
jobs=$(nproc)
for c in "${configs[@]}"; do
  case "$c" in
    pch) flag=ON ;;
    nopch) flag=OFF ;;
    *) echo "unknown configuration $c (pch or nopch)" >&2; exit 2 ;;
  esac
  rm -rf "$out/build_$c" "$out/$c.times"
  export ISP_COMPILE_TIMES="$out/$c.times"
  start=$(date +%s.%N)
  cmake -S . -B "$out/build_$c" -DISP_PRECOMPILED_HEADERS=$flag -DCMAKE_CXX_COMPILER_LAUNCHER="$launcher" >"$out/$c.configure.log"
  cmake --build "$out/build_$c" -j"$jobs" >"$out/$c.build.log"
  echo "$(echo "$(date +%s.%N) - $start" | bc)" >"$out/$c.wall"
  rm -rf "$out/build_$c"  # the .gch alone is about 600 MB
done
python3 - "$out" "$jobs" "${configs[@]}" <<'EOF'
import sys, os
out, jobs, configs = sys.argv[1], sys.argv[2], sys.argv[3:]
root = os.getcwd() + "/"
def load(c):
    units = {}
    for line in open(f"{out}/{c}.times"):
        t, src = line.split()
        src = src.replace(root, "")
        units[src] = units.get(src, 0.0) + float(t)  # the test fixtures compile one source nine times
    return units
times = {c: load(c) for c in configs}
for c in configs:
    wall = float(open(f"{out}/{c}.wall").read())
    u = times[c]
    print(f"{c}: build wall {wall / 60:.1f} min with -j{jobs}; {len(u)} sources, compile time summed {sum(u.values()):.0f} s")
    for src, t in sorted(u.items(), key=lambda kv: -kv[1])[:8]:
        print(f"    {t:6.1f} s  {src}")
if len(configs) == 2:
    a, b = configs
    print(f"\nper source: {a} / {b} (s), largest differences first")
    srcs = set(times[a]) | set(times[b])
    rows = sorted(srcs, key=lambda s: times[a].get(s, 0) - times[b].get(s, 0))
    for s in rows:
        print(f"  {times[a].get(s, 0):6.1f} {times[b].get(s, 0):6.1f} {times[a].get(s, 0) - times[b].get(s, 0):+6.1f}  {s}")
EOF
