#!/bin/sh
# Re-makes the committed recordings from live runs (root needed; build
# first with `cargo xtask build`). Each is a real run of the fixture or
# demo-cache with cacheloop attached, recorded with --record.
#
#   sh tests/recordings/make.sh
set -eu
here=$(cd "$(dirname "$0")" && pwd)
bin="$here/../../target/x86_64-unknown-linux-musl/debug"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Run from a scratch directory and through PATH, so that recordings hold
# no path of the machine that made them beyond a temporary one.
for b in cacheloop fixture demo-cache; do cp "$bin/$b" "$work/"; done
PATH="$work:$PATH"
cd "$here"

# Starts a target in the background; its pid is in $target.
start() {
    : > "$work/target.out"
    "$@" > "$work/target.out" &
    target=$!
    while ! grep -q ready "$work/target.out"; do sleep 0.1; done
}
stop() { kill "$target"; wait "$target" 2>/dev/null || true; }

# Healthy x5 and x4.5 bursts: no loop.
start fixture 200:4 1000:3 200:3 900:3 200:30
cacheloop watch --pid "$target" --func cache_invalidate \
    --duration 14s --json --record burst.rec > /dev/null
stop

# invalidate_a and invalidate_b calling each other flat out, then calm.
start fixture 200:4 cycle:max:6 200:30
cacheloop watch --pid "$target" --func cache_invalidate --func 'invalidate_*' \
    --key-arg 0:u64 --duration 16s --json --record call-cycle.rec > /dev/null
stop

# demo-cache: healthy rules, then the cycle page:catalog <-> fragment:nav.
cp "$here/../../demo/config/healthy.deps" "$work/deps"
start demo-cache --deps "$work/deps"
(sleep 6; cp "$here/../../demo/config/cycle.deps" "$work/deps.new"; mv "$work/deps.new" "$work/deps") &
cacheloop watch --pid "$target" --func 'cache_*' --key-arg 0:str \
    --duration 12s --json --record demo-loop.rec > /dev/null
stop
chmod 644 "$here"/*.rec
ls -l "$here"/*.rec
