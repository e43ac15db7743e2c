#!/bin/sh
# Re-makes the verdict corpus from live runs (root needed; build first with
# `cargo xtask build`; redis-server, varnishd and gcc from Debian). Each
# recording is a real run of a real workload with cacheloop attached,
# recorded with --record; corpus.tsv lists them with what each is and, for
# loops, the moment the loop began (Unix seconds, from the workload's own
# clock), so a replay can say how long the verdict took.
#
#   sh tests/recordings/make.sh [CASE...]
#
# Columns of corpus.tsv: file, expected (healthy or loop), the loop's start
# (- for healthy cases), the least number of loop records (a restart that
# comes back into its loop is caught twice), and what the case is.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
bin="$here/../../target/x86_64-unknown-linux-musl/debug"
work=$(mktemp -d)
# varnishd's child drops privileges and must reach its working directory.
chmod 755 "$work"
pids=""
cleanup() {
    for p in $pids; do kill "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
# Run from a scratch directory and through PATH, so that recordings hold
# no path of the machine that made them beyond a temporary one.
for b in cacheloop fixture demo-cache workload; do cp "$bin/$b" "$work/"; done
PATH="$work:$PATH"
cd "$work"
cases="${*:-burst call-cycle demo-loop demo-at-attach dips expensive spread pool restart-loop redis-broker redis-expiry redis-warmup redis-loop varnish}"
corpus="$here/corpus.tsv"
[ $# -eq 0 ] && : > "$corpus"

# Starts a program in the background, its output in $work/NAME.out; waits
# for WORD in it; its pid is in $started.
start() {
    name=$1 word=$2
    shift 2
    : > "$work/$name.out"
    "$@" > "$work/$name.out" 2>&1 &
    started=$!
    pids="$pids $started"
    tries=0
    while ! grep -q "$word" "$work/$name.out"; do
        tries=$((tries + 1))
        if [ "$tries" -gt 300 ]; then
            echo "$name never said '$word':" >&2
            cat "$work/$name.out" >&2
            exit 1
        fi
        sleep 0.1
    done
}
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
# The start of phase $2 in $1.out, as printed by the fixture or workload.
phase_ts() { grep "phase $2 start" "$work/$1.out" | head -1 | awk '{print $4}'; }
entry() {
    sed -i "/^$1	/d" "$corpus" 2>/dev/null || true
    printf '%s\t%s\t%s\t%s\t%s\n' "$@" >> "$corpus"
}
# The recording is named relative to its directory: its command line is
# stored in it.
record() {
    out=$1
    shift
    (cd "$here" && cacheloop watch "$@" --json --record "$out" > /dev/null)
}

redis_up() {
    port=$1
    start redis "Ready to accept connections" redis-server --bind 127.0.0.1 \
        --port "$port" --save "" --appendonly no --dir "$work"
    redis=$started
}
# An HTTP backend and varnishd in front of it on 127.0.0.1:$1.
varnish_up() {
    start backend ready workload serve 18081
    backend=$started
    cat > "$work/test.vcl" <<'VCL'
vcl 4.1;
backend default { .host = "127.0.0.1"; .port = "18081"; }
sub vcl_recv {
  if (req.method == "PURGE") { return (purge); }
  if (req.method == "BAN") { ban("req.url ~ " + req.url); return (synth(200, "Banned")); }
}
sub vcl_backend_response { set beresp.ttl = 30s; }
VCL
    start varnish "Child launched OK" varnishd -F -f "$work/test.vcl" -a "127.0.0.1:$1" \
        -n "$work/varnish" -s malloc,64m -p ban_lurker_sleep=0.1
    varnish=$started
}

for case in $cases; do
    echo "== $case"
    case $case in
    burst)
        start fixture ready fixture 200:4 1000:3 200:3 900:3 200:30
        record burst.rec --pid "$started" --func cache_invalidate --duration 14s
        stop "$started"
        entry burst.rec healthy - 0 "bursts: x5 for 3 s and x4.5 for 3 s over 200 calls/s"
        ;;
    call-cycle)
        start fixture ready fixture 200:4 cycle:max:6 200:30
        f=$started
        record call-cycle.rec --pid "$f" --func cache_invalidate --func 'invalidate_*' \
            --key-arg 0:u64 --duration 16s
        stop "$f"
        entry call-cycle.rec loop "$(phase_ts fixture 1)" 1 \
            "invalidate_a and invalidate_b calling each other flat out, then calm"
        ;;
    demo-loop)
        cp "$here/../../demo/config/healthy.deps" "$work/deps"
        start demo ready demo-cache --deps "$work/deps"
        d=$started
        (sleep 6; cp "$here/../../demo/config/cycle.deps" "$work/deps.new"
         date +%s.%N > "$work/switched"; mv "$work/deps.new" "$work/deps") &
        record demo-loop.rec --pid "$d" --func 'cache_*' --key-arg 0:str --duration 12s
        stop "$d"
        entry demo-loop.rec loop "$(cat "$work/switched")" 1 \
            "demo-cache: healthy rules, then the cycle page:catalog -> fragment:nav -> page:catalog"
        ;;
    demo-at-attach)
        cp "$here/../../demo/config/cycle.deps" "$work/deps"
        start demo ready demo-cache --deps "$work/deps"
        d=$started
        sleep 1
        record demo-at-attach.rec --pid "$d" --func 'cache_*' --key-arg 0:str --duration 6s
        stop "$d"
        entry demo-at-attach.rec loop 0 1 "demo-cache already looping when cacheloop attaches"
        ;;
    dips)
        start fixture ready fixture 200:6 max:1.6 200:0.6 max:1.6 200:0.6 max:1.6 200:30
        f=$started
        record dips.rec --pid "$f" --func cache_invalidate --duration 14s
        stop "$f"
        entry dips.rec loop "$(phase_ts fixture 1)" 1 \
            "a runaway that dips back to normal for 0.6 s every 1.6 s: never two whole seconds in a row"
        ;;
    expensive)
        start fixture ready fixture slow:10:6:5000 slow:200:8:5000 10:30
        f=$started
        record expensive.rec --pid "$f" --func cache_invalidate --key-arg 0:u64 --duration 14s
        stop "$f"
        entry expensive.rec loop "$(phase_ts fixture 1)" 1 \
            "200 invalidations/s at 5 ms each after 10/s: a core burnt under --threshold"
        ;;
    spread)
        start fixture ready fixture 200:6 spread:max:6:500 200:30
        f=$started
        record spread.rec --pid "$f" --func cache_invalidate --key-arg 0:u64 --duration 12s
        stop "$f"
        entry spread.rec loop "$(phase_ts fixture 1)" 1 \
            "a runaway over 500 keys in a scrambled order: no key cycle, no few hot keys"
        ;;
    pool)
        # Four workers of one name, each from 30 calls/s to 400 at 0.9 ms a
        # call: a third of a core each, none a loop alone.
        w=""
        for i in 1 2 3 4; do
            start "worker$i" ready fixture slow:30:6:900 slow:400:10:900 30:30
            w="$w $started"
        done
        record pool.rec --name fixture --func cache_invalidate --duration 14s
        for p in $w; do stop "$p"; done
        entry pool.rec loop "$(phase_ts worker1 1)" 1 \
            "a loop spread over a pool of four workers, each at a third of a core"
        ;;
    restart-loop)
        cp "$here/../../demo/config/healthy.deps" "$work/deps"
        start demo ready demo-cache --deps "$work/deps"
        d=$started
        (
            sleep 6; cp "$here/../../demo/config/cycle.deps" "$work/deps.new"
            date +%s.%N > "$work/switched"; mv "$work/deps.new" "$work/deps"
            # The on-call restarts it; it comes back into the same loop.
            sleep 4; kill "$d"
            demo-cache --deps "$work/deps" > "$work/demo2.out" 2>&1 &
            echo $! > "$work/demo2.pid"
        ) &
        record restart-loop.rec --name demo-cache --func 'cache_*' --key-arg 0:str --duration 18s
        kill "$(cat "$work/demo2.pid")" 2>/dev/null || true
        entry restart-loop.rec loop "$(cat "$work/switched")" 2 \
            "demo-cache loops, is restarted, and comes back into the same loop"
        ;;
    redis-broker)
        redis_up 16390
        workload redis-broker 16390 8 1500 > "$work/load.out" &
        l=$!
        sleep 1
        (wait "$l" 2>/dev/null; workload redis-broker 16390 8 4500 > /dev/null) &
        record redis-broker.rec --pid "$redis" --preset redis --duration 15s
        stop "$redis"
        entry redis-broker.rec healthy - 0 \
            "Redis as a job-queue broker: three queues emptied in turn, counters, rate limits; then x3 traffic"
        ;;
    redis-expiry)
        redis_up 16391
        (sleep 3; workload redis-expiry 16391 20000 3 7 > "$work/load.out") &
        record redis-expiry.rec --pid "$redis" --preset redis --duration 11s
        stop "$redis"
        entry redis-expiry.rec healthy - 0 \
            "20,000 keys loaded with one 3 s TTL expire at once under light reads"
        ;;
    redis-warmup)
        redis_up 16392
        (
            workload redis-warmup 16392 2000 6 > /dev/null
            # Restarted: empty, and filled again as fast as it takes.
            kill "$redis"; sleep 0.5
            redis-server --bind 127.0.0.1 --port 16392 --save "" --appendonly no \
                --dir "$work" > "$work/redis2.out" 2>&1 &
            echo $! > "$work/redis2.pid"
            sleep 1
            workload redis-warmup 16392 30000 4 > /dev/null
        ) &
        record redis-warmup.rec --name redis-server --preset redis --duration 16s
        kill "$(cat "$work/redis2.pid")" 2>/dev/null || true
        entry redis-warmup.rec healthy - 0 \
            "Redis restarted and warmed up with 30,000 writes as fast as it takes"
        ;;
    redis-loop)
        redis_up 16393
        (sleep 1; workload redis-loop 16393 6 8 > "$work/load.out") &
        record redis-loop.rec --pid "$redis" --preset redis --duration 14s
        stop "$redis"
        entry redis-loop.rec loop "$(phase_ts load loop)" 1 \
            "an application looping through Redis: DEL page:catalog, DEL fragment:nav, again"
        ;;
    varnish)
        varnish_up 16080
        (
            workload http 16080 6 300 30 5 > /dev/null
            # A ban storm: a cron job banning object after object.
            workload http 16080 4 100 0 300 > /dev/null
            workload http 16080 4 300 30 5 > /dev/null
        ) &
        record varnish.rec --preset varnish --duration 15s
        stop "$varnish"
        stop "$backend"
        entry varnish.rec healthy - 0 \
            "Varnish serving 300 GETs/s with purges and bans, then a storm of 300 bans/s"
        ;;
    *) echo "no case $case" >&2; exit 2 ;;
    esac
done
chmod 644 "$here"/*.rec "$corpus"
ls -l "$here"/*.rec
