#!/usr/bin/env bash
# scripts/pack_cuda_deps.sh [DEST]   (default DEST: <repo>/.deps, git-ignored)
#
# Run on a Debian machine that has the build's header-only dependencies installed (libboost-dev,
# nlohmann-json3-dev, libcli11-dev, doctest-dev, libstb-dev, zlib1g-dev). Copies the headers into DEST/include,
# doctest's CMake scripts into DEST/cmake/doctest and the Debian copyright files into DEST/licenses, so that a
# machine that cannot download anything (the GPU box: pip LibTorch, no -dev packages) builds with
#   cmake -DISP_HEADER_DEPS_DIR=<DEST>/include ...        (scripts/build_cuda.sh does this)
# see cmake/IspHeaderDeps.cmake. Of Boost only the headers the sources actually pull in are copied: the list
# comes from the preprocessor (g++ -M) run over every source that includes a Boost header and every file that
# includes those. Idempotent: DEST/{include,cmake,licenses} are rebuilt from scratch on every run.
#
# Environment: CXX (default g++), ISP_SYSTEM_INCLUDE (default /usr/include), ISP_DEPS_MAX_MIB (default 20).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest=${1:-$repo/.deps}
sys=${ISP_SYSTEM_INCLUDE:-/usr/include}
cxx=${CXX:-g++}
max_mib=${ISP_DEPS_MAX_MIB:-20}
src_dirs=(registry core apps plugins tests examples)

die() { echo "pack_cuda_deps: $*" >&2; exit 1; }

command -v "$cxx" >/dev/null || die "no C++ compiler '$cxx' (set CXX)"
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
[[ "$dest" != / && "$dest" != "$sys" && "$dest" != "$repo" ]] || die "refusing DEST=$dest"

need() {  # need <path under $sys> <Debian package>
  [[ -e "$sys/$1" ]] || die "$sys/$1 is missing: apt-get install $2"
}
need nlohmann/json.hpp nlohmann-json3-dev
need CLI/CLI.hpp libcli11-dev
need doctest/doctest.h doctest-dev
need zlib.h zlib1g-dev
need zconf.h zlib1g-dev
need boost/version.hpp libboost-dev

# Build into a scratch folder next to DEST, then swap it in: an interrupted run leaves the old pack intact.
work=$(mktemp -d "$dest/.pack.tmp.XXXXXX")
trap 'rm -rf "$work"' EXIT
inc=$work/include
mkdir -p "$inc" "$work/cmake/doctest" "$work/licenses"

cd "$repo"
existing_dirs=()
for d in "${src_dirs[@]}"; do [[ -d $d ]] && existing_dirs+=("$d"); done

# --- whole header-only libraries -------------------------------------------------------------------------
cp -rL "$sys/nlohmann" "$sys/CLI" "$sys/doctest" "$inc/"
cp -L "$sys/zlib.h" "$sys/zconf.h" "$inc/"

# doctest's CMake helpers (tests/CMakeLists.txt: include(doctest) / doctest_discover_tests).
doctest_cmake=""
for d in /usr/lib/cmake/doctest /usr/lib/*/cmake/doctest /usr/share/cmake/doctest /usr/local/lib/cmake/doctest; do
  if [[ -f $d/doctest.cmake && -f $d/doctestAddTests.cmake ]]; then doctest_cmake=$d; break; fi
done
[[ -n $doctest_cmake ]] || die "doctest.cmake / doctestAddTests.cmake not found: apt-get install doctest-dev"
cp -L "$doctest_cmake/doctest.cmake" "$doctest_cmake/doctestAddTests.cmake" "$work/cmake/doctest/"

# --- stb: only the headers the sources include ----------------------------------------------------------
mapfile -t stb_headers < <(grep -rhoE '#[[:space:]]*include[[:space:]]*[<"](stb/)?stb_[A-Za-z0-9_]+\.h[>"]' \
    "${existing_dirs[@]}" 2>/dev/null | grep -oE 'stb_[A-Za-z0-9_]+\.h' | sort -u)
[[ ${#stb_headers[@]} -gt 0 ]] || die "no stb include found in the sources (unexpected)"
mkdir -p "$inc/stb"
for h in "${stb_headers[@]}"; do
  need "stb/$h" libstb-dev
  cp -L "$sys/stb/$h" "$inc/stb/"
done

# --- Boost: the subset the preprocessor actually reads ----------------------------------------------------
# Sources that include a Boost header, plus (transitively) every source/header that includes one of those.
src_re='\.(c|cc|cpp|cxx|h|hh|hpp|hxx)$'
mapfile -t boost_users < <(grep -rlE '#[[:space:]]*include[[:space:]]*[<"]boost/' "${existing_dirs[@]}" 2>/dev/null \
    | grep -E "$src_re" | sort -u)
[[ ${#boost_users[@]} -gt 0 ]] || die "no source includes a Boost header (unexpected)"
declare -A seen=()
queue=("${boost_users[@]}")
while [[ ${#queue[@]} -gt 0 ]]; do
  f=${queue[0]}; queue=("${queue[@]:1}")
  [[ -n ${seen[$f]:-} ]] && continue
  seen[$f]=1
  case $f in *.h|*.hh|*.hpp|*.hxx) ;; *) continue ;; esac
  base=$(basename "$f")
  while IFS= read -r g; do
    [[ -z ${seen[$g]:-} ]] && queue+=("$g")
  done < <(grep -rlE "#[[:space:]]*include[[:space:]]*[<\"]([^\">]*/)?${base//./\\.}[>\"]" "${existing_dirs[@]}" 2>/dev/null \
      | grep -E "$src_re" || true)
done
mapfile -t pp_files < <(printf '%s\n' "${!seen[@]}" | sort)

inc_flags=()
for d in */include; do [[ -d $d ]] && inc_flags+=("-I$d"); done
for f in "${pp_files[@]}"; do inc_flags+=("-I$(dirname "$f")"); done

# A few flag sets the real builds use (RelWithDebInfo/Release, LibTorch's ABI flag, -pthread); union of all.
flag_sets=("" "-O2 -DNDEBUG" "-O3 -DNDEBUG -pthread -D_GLIBCXX_USE_CXX11_ABI=1 -fPIC")
deps_list=$work/boost_files.txt
: > "$deps_list"
for f in "${pp_files[@]}"; do
  for fs in "${flag_sets[@]}"; do
    # shellcheck disable=SC2086  # $fs is a list of flags
    "$cxx" -std=c++17 -x c++ -M -MG -DBOOST_DLL_USE_STD_FS $fs "${inc_flags[@]}" "$f" \
      || die "preprocessor failed on $f"
  done
done | sed 's|[\]$||' | tr -s ' ' '\n' | grep -E "^$sys/boost/" | xargs -r realpath -ms | sort -u > "$deps_list"
n_boost=$(wc -l < "$deps_list")
[[ $n_boost -gt 0 ]] || die "the preprocessor listed no Boost header (unexpected)"
(cd "$sys" && sed "s|^$sys/||" "$deps_list" | xargs -r cp -L --parents -t "$inc")
[[ -f $inc/boost/dll/shared_library.hpp ]] || die "boost/dll/shared_library.hpp missing from the pack (unexpected)"

# --- licenses and a manifest ----------------------------------------------------------------------------
for pkg in libboost1.74-dev libboost-dev nlohmann-json3-dev libcli11-dev doctest-dev libstb-dev zlib1g-dev; do
  if [[ -f /usr/share/doc/$pkg/copyright ]]; then
    cp -L "/usr/share/doc/$pkg/copyright" "$work/licenses/$pkg.copyright"
  fi
done
find "$work/licenses" -type f -size +64k -exec gzip -9n {} +   # Boost's is 2 MB of text
{
  echo "# Packed by scripts/pack_cuda_deps.sh on $(hostname) from $sys"
  if command -v dpkg-query >/dev/null; then
    dpkg-query -W -f='# ${Package} ${Version}\n' libboost-dev nlohmann-json3-dev libcli11-dev doctest-dev \
      libstb-dev zlib1g-dev 2>/dev/null || true
  fi
  echo "# Boost files from: ${pp_files[*]}"
  (cd "$work" && find include cmake -type f | sort)
} > "$work/MANIFEST.txt"
rm -f "$deps_list"

# --- swap in ---------------------------------------------------------------------------------------------
rm -rf "$dest/include" "$dest/cmake" "$dest/licenses" "$dest/MANIFEST.txt"
mv "$work/include" "$work/cmake" "$work/licenses" "$work/MANIFEST.txt" "$dest/"

bytes=$(du -sb "$dest/include" "$dest/cmake" "$dest/licenses" "$dest/MANIFEST.txt" | awk '{s += $1} END {print s}')
nfiles=$(find "$dest/include" "$dest/cmake" -type f | wc -l)
echo "pack_cuda_deps: $dest: $nfiles files ($n_boost from Boost, via ${#pp_files[@]} sources), $((bytes / 1024)) KiB"
(( bytes < max_mib * 1024 * 1024 )) || die "the pack is $((bytes / 1048576)) MiB, over the ${max_mib} MiB limit"
echo "pack_cuda_deps: carry $dest to the GPU machine (same place in the checkout), then run scripts/build_cuda.sh"
