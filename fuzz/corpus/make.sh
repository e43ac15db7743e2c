#!/bin/sh
# Makes the seeds that are made, not written by hand:
# - symbols/: small real executables with the kinds of symbols cacheloop
#   reads (gcc, g++, binutils);
# - recording/items-*: the item streams inside tests/recordings/*.rec,
#   inflated (python3), which the `recording` target frames itself.
#   sh fuzz/corpus/make.sh
set -eu
corpus=$(cd "$(dirname "$0")" && pwd)
out=$corpus/symbols

# The recordings hold the temporary directory make.sh ran them from; each
# seed names another of the same length instead (postcard strings carry
# their lengths).
python3 - "$corpus/../../tests/recordings" "$corpus/recording" <<'PY'
import glob, os, re, sys, zlib
recordings, out = sys.argv[1:]
for rec in sorted(glob.glob(os.path.join(recordings, "*.rec"))):
    data = open(rec, "rb").read()
    items = zlib.decompressobj(-15).decompress(data[10:])
    # Small seeds fuzz faster; the big recordings add nothing new in kind.
    if len(items) > 40 * 1024:
        continue
    items = re.sub(
        rb"(/[A-Za-z0-9_.-]+)+/tmp\.[A-Za-z0-9]{10}",
        lambda m: (b"/opt/cacheloop-demo" + b"-" * 4096)[: len(m.group())],
        items,
    )
    name = os.path.basename(rec)[: -len(".rec")]
    open(os.path.join(out, "items-" + name), "wb").write(items)
PY
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
# No path of this machine in the files: build in the scratch directory,
# with debug paths mapped away.
flags="-O2 -fdebug-prefix-map=$work=. -Wl,-z,noseparate-code"

cat > cache.c <<'C'
#include <stdio.h>
#include <stdlib.h>
static long entries[64];
__attribute__((noinline)) void cache_invalidate(long key) { entries[key & 63] = 0; }
__attribute__((noinline)) static long scale(long x, long k) { return x * k + (x >> 3); }
__attribute__((noinline, cold)) void cache_fail(const char *why) { fputs(why, stderr); abort(); }
int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 10;
    if (n < 0) cache_fail("negative\n");
    for (long i = 0; i < n; i++) { entries[i & 63] = scale(i, 7); cache_invalidate(i); }
    printf("%ld\n", entries[0]);
    return 0;
}
C
cat > cache.cpp <<'C'
#include <cstdio>
namespace cache {
struct Store {
    long entries[16];
    __attribute__((noinline)) void invalidate(const char *key, unsigned long len);
    template <typename T> __attribute__((noinline)) void put(T key) { entries[key & 15] = key; }
};
void Store::invalidate(const char *key, unsigned long len) { entries[(key[0] + len) & 15] = 0; }
}  // namespace cache
int main(int argc, char **argv) {
    cache::Store s{};
    s.put(argc);
    s.put(static_cast<unsigned char>(argc));
    s.invalidate(argv[0], 1);
    std::printf("%ld\n", s.entries[1]);
    return 0;
}
C
# With a build-id and .symtab and .dynsym, as a distribution builds it
# before stripping.
gcc $flags -Wl,--build-id -o c-unstripped cache.c
g++ $flags -Wl,--build-id -o cpp-unstripped cache.cpp
# Stripped, with its symbols in a debug file found by .gnu_debuglink and
# checked by CRC (no build-id): the input is the file, then its debug file.
gcc $flags -g1 -Wl,--build-id=none -o c cache.c
objcopy --only-keep-debug c c.debug
strip --strip-all c
objcopy --add-gnu-debuglink=c.debug c
cat c c.debug > c-stripped+debuglink
# Stripped, with a build-id: only .dynsym is left.
gcc $flags -Wl,--build-id -s -o c-stripped cache.c
for f in c-unstripped cpp-unstripped c-stripped+debuglink c-stripped; do
    cp "$f" "$out/$f"
done
