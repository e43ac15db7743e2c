//! Real traffic for real caches on loopback: the healthy workloads and the
//! loops of the verdict corpus (`tests/recordings/make.sh`) and the kernel
//! tests. Speaks Redis's protocol (RESP) and plain HTTP itself, paced on
//! absolute time so rates are what they say.
//!
//!     workload redis-broker PORT SECONDS JOBS_PER_S
//!     workload redis-expiry PORT KEYS TTL_S SECONDS
//!     workload redis-warmup PORT KEYS SECONDS
//!     workload redis-loop   PORT HEALTHY_S LOOP_S
//!     workload http         PORT SECONDS GETS_PER_S PURGES_PER_S BANS_PER_S
//!     workload serve        PORT   (an HTTP backend: 200 to everything)
//!
//! Prints `phase NAME start TS` (Unix seconds) as each phase begins, so a
//! recording's loop start is known to the millisecond.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::{Duration, Instant, SystemTime},
};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize| -> f64 {
        args.get(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| usage())
    };
    let port = num(1) as u16;
    match args.first().map(String::as_str) {
        Some("redis-broker") => broker(port, num(2), num(3)),
        Some("redis-expiry") => expiry(port, num(2) as u64, num(3) as u64, num(4)),
        Some("redis-warmup") => warmup(port, num(2) as u64, num(3)),
        Some("redis-loop") => redis_loop(port, num(2), num(3)),
        Some("http") => http(port, num(2), num(3), num(4), num(5)),
        Some("serve") => serve(port),
        _ => usage(),
    }
}

fn usage() -> ! {
    eprintln!("usage: see the top of tests/src/bin/workload.rs");
    std::process::exit(2)
}

fn phase(name: &str) {
    let ts = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    println!("phase {name} start {ts:.3}");
}

/// A pipelined Redis connection: commands go out in batches, replies are
/// read and dropped by a thread of their own (the server's pace is the
/// only back-pressure).
struct Redis {
    out: TcpStream,
    buf: Vec<u8>,
}

impl Redis {
    fn connect(port: u16) -> Self {
        let out = TcpStream::connect(("127.0.0.1", port)).expect("redis on loopback");
        let mut replies = out.try_clone().expect("socket");
        std::thread::spawn(move || {
            let mut sink = [0u8; 65536];
            while matches!(replies.read(&mut sink), Ok(n) if n > 0) {}
        });
        Self {
            out,
            buf: Vec::new(),
        }
    }

    fn cmd(&mut self, args: &[&str]) {
        self.buf
            .extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for a in args {
            self.buf
                .extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
        }
    }

    fn flush(&mut self) {
        if self.out.write_all(&self.buf).is_err() {
            // The server is gone (the recording ended and stopped it).
            std::process::exit(0);
        }
        self.buf.clear();
    }
}

/// Calls `step(state, i)` for i = 0.. at `rate` per second for `seconds`,
/// flushing after each batch; `rate` 0 means as fast as the server takes
/// it.
fn paced<T>(
    seconds: f64,
    rate: f64,
    state: &mut T,
    mut step: impl FnMut(&mut T, u64),
    mut flush: impl FnMut(&mut T),
) {
    let start = Instant::now();
    let mut done = 0u64;
    loop {
        let elapsed = start.elapsed().as_secs_f64();
        if elapsed >= seconds {
            break;
        }
        let owed = if rate > 0.0 {
            (rate * elapsed) as u64
        } else {
            done + 256
        };
        while done < owed {
            step(state, done);
            done += 1;
        }
        flush(state);
        if rate > 0.0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// A small deterministic generator.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// Redis as Celery, Sidekiq and rate limiters use it: jobs pushed to and
/// popped from three queues in turn (a queue emptied is a key deleted, the
/// same three keys all day), a processed counter, and per-user rate-limit
/// counters that expire each second.
fn broker(port: u16, seconds: f64, jobs: f64) {
    let mut r = Redis::connect(port);
    let mut rng = Lcg(7);
    phase("broker");
    paced(
        seconds,
        jobs,
        &mut r,
        |r, i| {
            let queue = format!("queue:{}", i % 3);
            let user = format!("ratelimit:user:{}", rng.next(200));
            r.cmd(&["LPUSH", &queue, "{\"task\":\"resize\",\"id\":1}"]);
            r.cmd(&["INCR", &user]);
            r.cmd(&["EXPIRE", &user, "1"]);
            r.cmd(&["RPOP", &queue]);
            r.cmd(&["INCR", "stats:processed"]);
        },
        |r| r.flush(),
    );
}

/// Keys loaded with one TTL, then light reads while they all expire at
/// once: a mass expiry of distinct keys.
fn expiry(port: u16, keys: u64, ttl: u64, seconds: f64) {
    let mut r = Redis::connect(port);
    phase("load");
    let ttl = ttl.to_string();
    for k in 0..keys {
        r.cmd(&["SET", &format!("session:{k}"), "v", "EX", &ttl]);
        if k % 1000 == 999 {
            r.flush();
        }
    }
    r.flush();
    phase("reads");
    let mut rng = Lcg(11);
    paced(
        seconds,
        500.0,
        &mut r,
        |r, _| r.cmd(&["GET", &format!("session:{}", rng.next(keys))]),
        |r| r.flush(),
    );
}

/// A cache filled as fast as it takes after a restart, then steady random
/// reads and writes.
fn warmup(port: u16, keys: u64, seconds: f64) {
    let mut r = Redis::connect(port);
    phase("fill");
    for k in 0..keys {
        r.cmd(&["SET", &format!("page:{k}"), "<html>"]);
        if k % 500 == 499 {
            r.flush();
        }
    }
    r.flush();
    phase("steady");
    let mut rng = Lcg(13);
    paced(
        seconds,
        1000.0,
        &mut r,
        |r, i| {
            let key = format!("page:{}", rng.next(keys));
            if i % 10 == 0 {
                r.cmd(&["DEL", &key]);
            } else {
                r.cmd(&["SET", &key, "<html>"]);
            }
        },
        |r| r.flush(),
    );
}

/// Healthy random writes and deletes, then an application stuck in its
/// dependency cycle through Redis: deleting the catalog page deletes the
/// navigation fragment, which deletes the catalog page again.
fn redis_loop(port: u16, healthy: f64, looping: f64) {
    let mut r = Redis::connect(port);
    let mut rng = Lcg(17);
    phase("healthy");
    paced(
        healthy,
        300.0,
        &mut r,
        |r, i| {
            let key = format!("product:{}", rng.next(500));
            r.cmd(&["SET", &key, "v"]);
            if i % 2 == 0 {
                r.cmd(&["DEL", &key]);
            }
        },
        |r| r.flush(),
    );
    phase("loop");
    paced(
        looping,
        0.0,
        &mut r,
        |r, _| {
            for key in ["page:catalog", "fragment:nav"] {
                r.cmd(&["SET", key, "<html>"]);
                r.cmd(&["DEL", key]);
            }
        },
        |r| r.flush(),
    );
}

/// GETs of 1,000 objects through a cache, with PURGEs and BANs at their
/// rates, each request on a connection of its own.
fn http(port: u16, seconds: f64, gets: f64, purges: f64, bans: f64) {
    let mut rng = Lcg(19);
    let send = |method: &str, path: &str| {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = write!(
                s,
                "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            );
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        }
    };
    phase("traffic");
    let total = gets + purges + bans;
    paced(
        seconds,
        total,
        &mut (),
        |_, i| {
            let path = format!("/obj/{}", rng.next(1000));
            let pick = (i as f64 * 0.618_034).fract() * total;
            if pick < purges {
                send("PURGE", &path);
            } else if pick < purges + bans {
                send("BAN", &path);
            } else {
                send("GET", &path);
            }
        },
        |_| {},
    );
}

/// A backend for a cache to fetch from: 200 and a small page to every
/// request, a thread per connection.
fn serve(port: u16) {
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("backend port");
    println!("ready {}", std::process::id());
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        std::thread::spawn(move || {
            let mut buf = [0; 4096];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
            );
        });
    }
}
