#!/usr/bin/env bash
# Builds the binary to install: release, the Swift runtime linked in, stripped, at .build/epokd (its size is
# printed). With --bundle DIR, also copies it to DIR/usr/local/bin/epokd with every shared library it loads
# (those ldd lists, and libcurl's, which epokd loads when it first talks to an API server), under their own
# paths: the root file system of a container image (see Containerfile), checked by running it in a chroot.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/opt/swift/usr/bin:$PATH"

bundle=""
if [ "${1:-}" = "--bundle" ]; then bundle="${2:?--bundle needs a directory}"; fi

swift build -c release --static-swift-stdlib --product epokd 2>&1 | tail -1
bin=$(swift build -c release --static-swift-stdlib --show-bin-path)/epokd
strip -o .build/epokd "$bin"
echo "build: .build/epokd, $(( $(stat -c %s .build/epokd) / 1024 / 1024 )) MiB stripped ($(( $(stat -c %s "$bin") / 1024 / 1024 )) MiB before)"

[ -n "$bundle" ] || exit 0
rm -rf "$bundle"
install -D -m 0755 .build/epokd "$bundle/usr/local/bin/epokd"
# A merged /usr (Debian's): /lib and /lib64 are links, as on the host.
for dir in lib lib64; do [ ! -L "/$dir" ] || { mkdir -p "$bundle/$(readlink "/$dir")"; ln -s "$(readlink "/$dir")" "$bundle/$dir"; }; done
curl_lib=$(ldconfig -p | awk '$1 == "libcurl.so.4" {print $NF; exit}')
libs=$( (ldd .build/epokd; if [ -n "$curl_lib" ]; then ldd "$curl_lib"; echo "libcurl.so.4 => $curl_lib (0)"; fi) \
  | awk '/=> \// {print $3} /^\t\/.*ld-linux/ {print $1}' | sort -u)
for lib in $libs; do
  real=$(readlink -f "$lib")
  install -D -m "$(stat -c %a "$real")" "$real" "$bundle$real"
  # The name the loader looks for, when it is a link to another file.
  [ -e "$bundle$lib" ] || { mkdir -p "$bundle$(dirname "$lib")"; ln -s "$real" "$bundle$lib"; }
done
mkdir -p "$bundle/tmp" "$bundle/etc"
echo "build: $bundle holds epokd and $(echo "$libs" | wc -w) shared libraries, $(du -sm "$bundle" | cut -f1) MiB"
