//! Real caches from Debian packages, started on loopback: every function of
//! the presets must fire under the cache's own invalidation paths.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use cacheloop_tests::{
    Cacheloop, Run, Target, free_port, have_programs, http, presets, require_root, total_calls,
    watch_args,
};

/// What the Redis tests run (absent in a VM guest built without them).
const REDIS: &[(&str, &str)] = &[
    ("redis-server", "redis-server"),
    ("redis-cli", "redis-tools"),
];

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cacheloop-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn assert_every_preset_function_fired(run: &Run, preset: &str) {
    assert_eq!(run.code, 0, "{run:?}");
    for function in presets(preset) {
        let calls = total_calls(run, None, &function);
        assert!(
            calls > 0,
            "{preset} preset: {function} never fired:\n{}",
            run.stdout
        );
    }
}

/// A redis-server of our own on 127.0.0.1:`port`, no persistence.
fn start_redis(dir: &Path, port: u16, extra: &[&str]) -> Target {
    let port = port.to_string();
    let mut args = vec![
        "--bind",
        "127.0.0.1",
        "--port",
        &port,
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
    ];
    args.push(dir.to_str().unwrap());
    args.extend(extra);
    Target::spawn(
        Path::new("redis-server"),
        &args,
        "Ready to accept connections",
    )
}

/// Sends commands to redis-cli on stdin.
fn redis(port: u16, commands: &str) {
    let mut cli = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-cli (redis-tools) runs");
    cli.stdin
        .take()
        .unwrap()
        .write_all(commands.as_bytes())
        .unwrap();
    assert!(cli.wait().unwrap().success());
}

#[test]
fn preset_redis_counts_del_unlink_expiry_and_eviction() {
    require_root();
    if !have_programs(REDIS) {
        return;
    }
    let dir = scratch("redis");
    let port = free_port();
    let redis_server = start_redis(
        &dir,
        port,
        &["--maxmemory-policy", "allkeys-lru", "--hz", "50"],
    );
    let keys: String = (0..300).map(|i| format!("SET k{i} v{i}\n")).collect();
    redis(port, &keys);

    let extra = ["--preset", "redis", "--duration", "8s"];
    let watcher = Cacheloop::start(&watch_args(redis_server.pid, &[], &extra));
    watcher.wait_attached(Duration::from_secs(60));
    redis(
        port,
        &(0..100).map(|i| format!("DEL k{i}\n")).collect::<String>(),
    );
    redis(
        port,
        &(100..200)
            .map(|i| format!("UNLINK k{i}\n"))
            .collect::<String>(),
    );
    redis(
        port,
        &(200..300)
            .map(|i| format!("PEXPIRE k{i} 20\n"))
            .collect::<String>(),
    );
    std::thread::sleep(Duration::from_millis(1000));
    let value = "x".repeat(1000);
    let mut fill = String::from("CONFIG SET maxmemory 3mb\n");
    fill.extend((0..4000).map(|i| format!("SET big{i} {value}\n")));
    redis(port, &fill);

    let run = watcher.finish(Duration::from_secs(40));
    assert_every_preset_function_fired(&run, "redis");
    drop(redis_server);
    let _ = fs::remove_dir_all(&dir);
}

/// A tiny HTTP backend on loopback for Varnish to cache.
fn backend() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0; 4096];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
            );
        }
    });
    port
}

#[test]
fn preset_varnish_counts_purge_ban_and_expiry() {
    require_root();
    // varnishd compiles its VCL with the C compiler.
    if !have_programs(&[("varnishd", "varnish"), ("cc", "gcc")]) {
        return;
    }
    let dir = scratch("varnish");
    let backend = backend();
    let vcl = dir.join("test.vcl");
    fs::write(
        &vcl,
        format!(
            r#"vcl 4.1;
backend default {{ .host = "127.0.0.1"; .port = "{backend}"; }}
sub vcl_recv {{
  if (req.method == "PURGE") {{ return (purge); }}
  if (req.method == "BAN") {{ ban("req.url ~ " + req.url); return (synth(200, "Banned")); }}
}}
sub vcl_backend_response {{ set beresp.ttl = 1s; set beresp.grace = 0s; set beresp.keep = 0s; }}
"#
        ),
    )
    .unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let workdir = dir.join("n");
    // varnishd reports on stderr; `exec` keeps its pid ours.
    let command = format!(
        "exec varnishd -F -f {} -a {listen} -n {} -s malloc,32m -p ban_lurker_sleep=0.1 2>&1",
        vcl.display(),
        workdir.display()
    );
    let mut varnishd = Target::spawn(Path::new("sh"), &["-c", &command], "Child launched OK");
    let deadline = Instant::now() + Duration::from_secs(20);
    while http(port, "GET", "/warm").is_none_or(|s| s != 200) {
        assert!(Instant::now() < deadline, "varnish never served");
        std::thread::sleep(Duration::from_millis(100));
    }

    // No target: the preset watches varnishd and its child by name.
    let watcher = Cacheloop::start(&["watch", "--preset", "varnish", "--json", "--duration", "8s"]);
    watcher.wait_attached(Duration::from_secs(60));
    for i in 0..30 {
        assert_eq!(http(port, "GET", &format!("/p{i}")), Some(200));
    }
    for i in 0..10 {
        assert_eq!(http(port, "PURGE", &format!("/p{i}")), Some(200));
    }
    for i in 10..15 {
        assert_eq!(http(port, "BAN", &format!("/p{i}")), Some(200));
    }
    // The rest expire (TTL 1 s).
    let run = watcher.finish(Duration::from_secs(40));
    assert_every_preset_function_fired(&run, "varnish");

    // The manager stops its child on SIGTERM.
    varnishd.signal(libc::SIGTERM);
    assert!(
        varnishd.wait_exit(Duration::from_secs(20)).is_some(),
        "varnishd stopped"
    );
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn preset_redis_reads_keys_and_catches_a_client_rewriting_the_same_keys() {
    require_root();
    if !have_programs(REDIS) {
        return;
    }
    let dir = scratch("redis-keys");
    let port = free_port();
    let redis_server = start_redis(&dir, port, &[]);
    // The client rewrites as fast as the machine lets it: tens of
    // thousands of writes a second on the host, but 650-1000 a second in a
    // TCG guest on 6.1, where each probe hit costs ~45 us and the probes
    // are windowed. The verdict is about the keys, not the speed.
    let extra = [
        "--preset",
        "redis",
        "--show-keys",
        "--threshold",
        "200",
        "--fail-on-loop",
        "--duration",
        "30s",
    ];
    let watcher = Cacheloop::start(&watch_args(redis_server.pid, &[], &extra));
    watcher.wait_attached(Duration::from_secs(60));
    // A client stuck rewriting the same two keys: each write invalidates
    // them (client-side caching), again and again.
    let mut cli = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-cli runs");
    let mut stdin = cli.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let batch = "SET hot:a 1\nSET hot:b 1\n".repeat(1000);
        for _ in 0..300 {
            if stdin.write_all(batch.as_bytes()).is_err() {
                break;
            }
        }
    });
    let run = watcher.finish(Duration::from_secs(60));
    let _ = cli.kill();
    let _ = cli.wait();
    let _ = writer.join();
    assert_eq!(run.code, 3, "{run:?}");
    let record = &run.of_type("loop")[0];
    assert_eq!(
        record["evidence"]["rule"]["name"], "repeating_keys",
        "{record}"
    );
    let keys: Vec<&str> = record["evidence"]["top_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["key"].as_str().unwrap())
        .collect();
    // Read through robj->ptr: the real key names, each once.
    let mut sorted = keys.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, ["hot:a", "hot:b"], "{record}");
    drop(redis_server);
    let _ = fs::remove_dir_all(&dir);
}
