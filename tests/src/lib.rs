//! Helpers for the kernel tests: start target processes and the real
//! `cacheloop` binary, and look at what they did.
//!
//! Every process started here is stopped by its own pid when its handle is
//! dropped, test failures included.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::{fs::FileExt as _, process::ExitStatusExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc::{self, Receiver},
    time::{Duration, Instant},
};

use serde_json::Value;

/// The `cacheloop` binary under test: `CACHELOOP_BIN`, or the one cargo
/// built next to this test binary.
pub fn cacheloop_bin() -> PathBuf {
    built_binary("CACHELOOP_BIN", "cacheloop")
}

/// The fixture target: `CACHELOOP_FIXTURE`, or the one next to this test.
pub fn fixture_bin() -> PathBuf {
    built_binary("CACHELOOP_FIXTURE", "fixture")
}

/// The demo cache service: `CACHELOOP_DEMO`, or the one next to this test.
pub fn demo_bin() -> PathBuf {
    built_binary("CACHELOOP_DEMO", "demo-cache")
}

/// The traffic generator for real caches: `CACHELOOP_WORKLOAD`, or the one
/// next to this test.
pub fn workload_bin() -> PathBuf {
    built_binary("CACHELOOP_WORKLOAD", "workload")
}

/// Starts the workload generator with `args`, its output discarded.
pub fn workload(args: &[&str]) -> std::process::Child {
    Command::new(workload_bin())
        .args(args)
        .stdout(Stdio::null())
        .spawn()
        .expect("the workload generator runs")
}

/// The keys of a loop record's `evidence.key_cycle`, in order.
pub fn key_cycle(record: &Value) -> Vec<&str> {
    record["evidence"]["key_cycle"]
        .as_array()
        .unwrap_or_else(|| panic!("no key cycle: {record}"))
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect()
}

fn built_binary(var: &str, name: &str) -> PathBuf {
    if let Some(bin) = std::env::var_os(var) {
        return bin.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/kernel-HASH -> target/<profile>/NAME
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join(name);
    assert!(
        bin.exists(),
        "{} is missing: build the workspace first (cargo xtask test does), or set {var}",
        bin.display()
    );
    bin
}

/// Kernel tests attach real uprobes: they need root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "kernel tests attach uprobes and need root: run `cargo xtask test` as root"
    );
    steady_guest_kernel();
}

/// In a VM-test guest (`CACHELOOP_GUEST`), keeps one task-bound perf event
/// open for the rest of the test process's life, so the kernel's
/// `perf_sched_events` static key is switched on once and stays on.
///
/// Every uprobe attached through a perf event with a pid (all of them on
/// 6.1, USDT probes with a semaphore on 6.12) is such an event: the first
/// one switches the key on and, a second after the last one closes, the
/// kernel switches it off again, rewriting a jump in `__schedule` each
/// time (int3 on the first byte, the new bytes, IPIs to sync the other
/// CPUs). Under qemu's TCG that can go wrong: seen once on 6.12, an idle
/// vCPU died with "Oops: int3" at `__schedule` on that very jump, the int3
/// already gone by the time the trap was read, while a PHP USDT test
/// attached. Nothing of ours writes kernel text; the tests toggled the key
/// with most attaches, and now toggle it once.
fn steady_guest_kernel() {
    static HELD: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    if std::env::var_os("CACHELOOP_GUEST").is_none() {
        return;
    }
    HELD.get_or_init(|| {
        // perf_event_attr, first fields: type, size, config; bit 0 of the
        // flags word (offset 40) is `disabled`: the event never counts.
        let mut attr = [0u64; 16];
        attr[0] = 1 | (128 << 32); // PERF_TYPE_SOFTWARE, size 128
        attr[1] = 9; // PERF_COUNT_SW_DUMMY
        attr[5] = 1; // disabled
        // SAFETY: attr is a zeroed perf_event_attr of the size it says;
        // pid 0 is this thread, cpu -1 any CPU, no group, no flags.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_perf_event_open,
                attr.as_ptr(),
                0,
                -1,
                -1,
                8, // PERF_FLAG_FD_CLOEXEC
            )
        };
        // The fd is never closed: the key must stay on until the tests end.
        if fd < 0 {
            eprintln!(
                "cacheloop-tests: could not hold a perf event open in the guest ({}); \
                 the kernel's perf_sched_events key will toggle with every perf uprobe",
                std::io::Error::last_os_error()
            );
        }
    });
}

/// A process under test.
pub struct Target {
    child: Child,
    pub pid: u32,
    lines: Receiver<String>,
    /// The words after the ready marker on its line.
    pub ready_extra: Vec<String>,
}

impl Target {
    /// Starts the test fixture with a schedule of phases (see its docs).
    pub fn fixture(phases: &[&str]) -> Self {
        Self::spawn(&fixture_bin(), phases, "ready")
    }

    /// Starts `program` and waits for a stdout line containing `ready`.
    pub fn spawn(program: &Path, args: &[&str], ready: &str) -> Self {
        Self::spawn_env(program, args, &[], ready)
    }

    /// As [`Target::spawn`], with `env` added to its environment.
    pub fn spawn_env(program: &Path, args: &[&str], env: &[(&str, &str)], ready: &str) -> Self {
        let mut child = Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let pid = child.id();
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut target = Self {
            child,
            pid,
            lines,
            ready_extra: Vec::new(),
        };
        let line = target
            .wait_line(ready, Duration::from_secs(20))
            .unwrap_or_else(|| panic!("{} never said '{ready}'", program.display()));
        let after = &line[line.find(ready).unwrap_or(0) + ready.len()..];
        target.ready_extra = after.split_whitespace().map(str::to_owned).collect();
        target
    }

    /// Waits for the next stdout line that contains `marker`.
    pub fn wait_line(&mut self, marker: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(marker) => return Some(line),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    /// Sends a signal to the process, by its pid.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid as i32, signal) };
    }

    /// Ends the fixture's phase held with `hold` (SIGUSR1).
    pub fn release(&self) {
        self.signal(libc::SIGUSR1);
    }

    /// Whether the process is still running (not exited, not a zombie).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code().or(status.signal().map(|s| 128 + s));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The `n` bytes of code at `addr` in the live process.
    pub fn code_at(&self, addr: u64, n: usize) -> Vec<u8> {
        let mem =
            std::fs::File::open(format!("/proc/{}/mem", self.pid)).expect("open /proc/PID/mem");
        let mut buf = vec![0; n];
        mem.read_exact_at(&mut buf, addr).expect("read live code");
        buf
    }

    /// Where the fixture says `cache_invalidate` is mapped.
    pub fn invalidate_addr(&self) -> u64 {
        self.ready_hex(1)
    }

    /// Word `n` after the ready marker, a hex number (`0x..`).
    pub fn ready_hex(&self, n: usize) -> u64 {
        let hex = self.ready_extra.get(n).expect("the target prints it");
        u64::from_str_radix(hex.trim_start_matches("0x"), 16).expect("hex address")
    }

    /// Whether the byte at `addr` is a breakpoint now.
    pub fn trapped_at(&self, addr: u64) -> bool {
        self.code_at(addr, 1)[0] == 0xCC
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        // Our own child, by its pid.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The C and C++ fixtures, compiled once per test process.
pub struct Native {
    /// Stripped C program whose symbols are only in `c_cache.debug`
    /// (found through `.gnu_debuglink`).
    pub c_cache: PathBuf,
    /// C++ program with a `cache::Store::invalidate` method.
    pub cpp_cache: PathBuf,
    /// C program calling `lib_cache_invalidate` in `libcachehelper.so`.
    pub uses_lib: PathBuf,
    /// One C program in two builds, `cache_invalidate` at other offsets
    /// (`fixtures/deploy_cache.c`).
    pub deploy_v1: PathBuf,
    pub deploy_v2: PathBuf,
}

/// The native fixtures: prebuilt in `CACHELOOP_NATIVE` (the VM runner ships
/// them to guests without a compiler), or built on first use by
/// `fixtures/build.sh` (gcc, g++, binutils).
pub fn native() -> &'static Native {
    static NATIVE: std::sync::OnceLock<Native> = std::sync::OnceLock::new();
    NATIVE.get_or_init(|| {
        let dir = match std::env::var_os("CACHELOOP_NATIVE") {
            Some(dir) => PathBuf::from(dir),
            None => {
                let dir =
                    std::env::temp_dir().join(format!("cacheloop-native-{}", std::process::id()));
                let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/build.sh");
                let status = Command::new("sh")
                    .arg(&script)
                    .arg(&dir)
                    .status()
                    .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
                assert!(status.success(), "{} failed", script.display());
                dir
            }
        };
        Native {
            c_cache: dir.join("c_cache"),
            cpp_cache: dir.join("cpp_cache"),
            uses_lib: dir.join("uses_lib"),
            deploy_v1: dir.join("deploy_v1"),
            deploy_v2: dir.join("deploy_v2"),
        }
    })
}

/// The demo's dependency configurations: `CACHELOOP_DEMO_CONFIG`, or the
/// ones in the source tree.
pub fn demo_config(name: &str) -> PathBuf {
    std::env::var_os("CACHELOOP_DEMO_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../demo/config"))
        .join(name)
}

/// Says on stderr that the calling test skips and why. Written straight to
/// the stream, past libtest's capture, so it shows for a passing test too;
/// the VM runner counts these lines.
pub fn skip(why: &str) {
    let current = std::thread::current();
    let test = current.name().unwrap_or("a test");
    let _ = writeln!(std::io::stderr(), "cacheloop-test skipped: {test}: {why}");
}

/// Whether every program is on PATH; if not, skips the test naming the
/// first one missing and the Debian package that has it.
pub fn have_programs(programs: &[(&str, &str)]) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for (program, package) in programs {
        if !std::env::split_paths(&path).any(|dir| dir.join(program).is_file()) {
            skip(&format!("needs {program} (Debian package {package})"));
            return false;
        }
    }
    true
}

/// The running kernel's release string, for messages.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_owned())
        .unwrap_or_default()
}

/// The running kernel's (major, minor) version.
pub fn kernel_version() -> (u32, u32) {
    let release = kernel_release();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// How many quiet readings between reports the run let go, as its `-vv`
/// debug line at exit says (None without it).
pub fn readings_let_go(run: &Run) -> Option<u32> {
    run.stderr.lines().find_map(|l| {
        l.split_once("readings judged; ")?
            .1
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// Sums `calls` over the samples of `function` (all pids when `pid` is
/// `None`).
pub fn total_calls(run: &Run, pid: Option<u32>, function: &str) -> u64 {
    run.of_type("sample")
        .iter()
        .filter(|s| s["function"] == function && pid.is_none_or(|p| s["pid"] == p))
        .map(|s| s["calls"].as_u64().expect("calls"))
        .sum()
}

/// The rates of `function` in `pid`, interval by interval.
pub fn rates(run: &Run, pid: u32, function: &str) -> Vec<f64> {
    run.of_type("sample")
        .iter()
        .filter(|s| s["pid"] == pid && s["function"] == function)
        .map(|s| s["rate"].as_f64().expect("rate"))
        .collect()
}

/// The highest rate the samples report, for one function or (`None`) all.
pub fn peak_rate(run: &Run, function: Option<&str>) -> f64 {
    run.of_type("sample")
        .iter()
        .filter(|s| function.is_none_or(|f| s["function"] == f))
        .map(|s| s["rate"].as_f64().expect("rate"))
        .fold(0.0, f64::max)
}

/// What a finished `cacheloop` run left behind.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// stdout parsed as JSON lines; panics on a line that is not JSON.
    pub fn records(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    pub fn of_type(&self, kind: &str) -> Vec<Value> {
        self.records()
            .into_iter()
            .filter(|r| r["type"] == kind)
            .collect()
    }
}

/// A `cacheloop` process running in the background.
pub struct Cacheloop {
    child: Child,
    /// Its stdout, line by line, as it comes; and the whole of it at the end.
    lines: Receiver<String>,
    stdout: Option<std::thread::JoinHandle<String>>,
}

impl Cacheloop {
    pub fn start<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Self {
        steady_guest_kernel();
        let mut child = Command::new(cacheloop_bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start cacheloop");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        let stdout = std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                all.push_str(&line);
                all.push('\n');
                let _ = tx.send(line);
            }
            all
        });
        Self {
            child,
            lines,
            stdout: Some(stdout),
        }
    }

    /// Waits until cacheloop says it attached (its first `attached` JSON
    /// record): attaching takes seconds in a loaded TCG guest, so a fixed
    /// sleep is not enough before making the calls a test counts.
    pub fn wait_attached(&self, timeout: Duration) {
        self.wait_record("attached", timeout);
    }

    /// Waits for its next JSON record of type `kind` (records before it
    /// are passed over).
    pub fn wait_record(&self, kind: &str, timeout: Duration) {
        self.wait_line(&format!("\"type\":\"{kind}\""), timeout);
    }

    /// Waits for its next line of output holding `marker`; returns it.
    pub fn wait_line(&self, marker: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("cacheloop wrote no {marker} within {timeout:?}"));
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(marker) => return line,
                Ok(_) => {}
                Err(_) => panic!("cacheloop wrote no {marker} within {timeout:?}"),
            }
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends a signal to this cacheloop, by its pid.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid(), signal) };
    }

    /// Waits for it to exit; kills it and panics after `timeout`.
    pub fn finish(mut self, timeout: Duration) -> Run {
        let deadline = Instant::now() + timeout;
        let out = self.stdout.take().expect("stdout reader");
        let mut stderr = self.child.stderr.take().expect("stderr");
        let err = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("cacheloop did not finish within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Run {
            code: status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
            stdout: out.join().expect("stdout reader"),
            stderr: err.join().expect("stderr reader"),
        }
    }
}

/// `watch --pid PID --func F... --json` and `extra`: how most tests watch
/// a process.
pub fn watch_args(pid: u32, funcs: &[&str], extra: &[&str]) -> Vec<String> {
    let mut args = vec!["watch".to_owned(), "--pid".to_owned(), pid.to_string()];
    for func in funcs {
        args.extend(["--func".to_owned(), (*func).to_owned()]);
    }
    args.push("--json".to_owned());
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

/// `watch --binary FILE` counting `funcs`, as JSON, then `extra`.
pub fn watch_binary_args(file: &Path, funcs: &[&str], extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "watch".to_owned(),
        "--binary".to_owned(),
        file.to_str().expect("a UTF-8 path").to_owned(),
    ];
    for func in funcs {
        args.extend(["--func".to_owned(), (*func).to_owned()]);
    }
    args.push("--json".to_owned());
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

/// [`watch_args`] for the fixture's `cache_invalidate`.
pub fn watch_fixture_args(pid: u32, extra: &[&str]) -> Vec<String> {
    watch_args(pid, &["cache_invalidate"], extra)
}

/// The functions of a `cacheloop` preset, as `cacheloop` itself documents
/// them in its help (so the tests follow the presets, not a copy of them).
pub fn presets(name: &str) -> Vec<String> {
    let out = Command::new(cacheloop_bin())
        .args(["presets", name])
        .output()
        .expect("cacheloop presets");
    assert!(out.status.success(), "cacheloop presets {name}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// `setpriv` dropping to the user nobody with no capabilities at all, to
/// run a program unprivileged (util-linux).
pub fn as_nobody() -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
    ]);
    cmd
}

/// A copy of the fixture named `name` (so its command name is `name`), in
/// a directory of its own: (the directory, the copy).
pub fn private_fixture(name: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("cacheloop-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let binary = dir.join(name);
    std::fs::copy(fixture_bin(), &binary).unwrap();
    (dir, binary)
}

/// `setpriv` running its command as nobody with exactly `caps` (setpriv's
/// names: `bpf`, `perfmon`, `sys_ptrace`, `dac_read_search`), effective
/// through the ambient set.
pub fn as_nobody_with(caps: &[&str]) -> Command {
    let set: String = caps.iter().map(|c| format!(",+{c}")).collect();
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(format!("--inh-caps=-all{set}"))
        .arg(format!("--ambient-caps=-all{set}"))
        .arg(format!("--bounding-set=-all{set}"));
    cmd
}

/// The processes whose parent is `pid` (from /proc/*/stat).
pub fn children_of(pid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&child| stat_field(child, 1).is_some_and(|ppid| ppid == pid.to_string()))
        .collect()
}

/// Waits until process `pid` has exited (gone, or a zombie).
pub fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if stat_field(pid, 0).is_none_or(|state| state == "Z") {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Field `n` after the command in /proc/PID/stat (0: the state, 1: the
/// parent's pid).
fn stat_field(pid: i32, n: usize) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(n).map(str::to_owned)
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// One HTTP/1.1 request on loopback; returns the status code.
pub fn http(port: u16, method: &str, path: &str) -> Option<u16> {
    use std::io::Write as _;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply.split_whitespace().nth(1)?.parse().ok()
}

/// A response to [`http_get`].
#[derive(Debug)]
pub struct Http {
    pub status: u16,
    /// The header lines, as sent.
    pub headers: String,
    pub body: String,
}

/// One HTTP/1.0 GET on loopback (so no chunked reply), with an `Accept`
/// header when given.
pub fn http_get(port: u16, path: &str, accept: Option<&str>) -> Option<Http> {
    use std::io::Write as _;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n{accept}\r\n"
    )
    .ok()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).ok()?;
    let (head, body) = reply.split_once("\r\n\r\n")?;
    Some(Http {
        status: head.split_whitespace().nth(1)?.parse().ok()?,
        headers: head.to_owned(),
        body: body.to_owned(),
    })
}

/// The most seconds a verdict may take after a loop begins: `host` on the
/// host; three times that in a VM-test guest (`CACHELOOP_GUEST`), where
/// TCG emulation makes every probe hit and attach tens of times slower and
/// the guest has one CPU.
pub fn latency_bound(host: f64) -> f64 {
    if std::env::var_os("CACHELOOP_GUEST").is_some() {
        3.0 * host
    } else {
        host
    }
}

/// Runs `cacheloop` on a fixture whose first phase is held (`RATE:hold`):
/// once cacheloop has attached and watched the held phase for `learn`,
/// releases the fixture into its next phases, then waits for the run to
/// end. A fixed schedule would race the attach, which takes seconds in a
/// loaded TCG guest: the warm-up would learn the runaway as normal.
pub fn watch_held<S: AsRef<std::ffi::OsStr>>(
    target: &Target,
    args: &[S],
    learn: Duration,
    timeout: Duration,
) -> Run {
    let watcher = Cacheloop::start(args);
    watcher.wait_attached(timeout);
    std::thread::sleep(learn);
    target.release();
    watcher.finish(timeout)
}

/// Runs `cacheloop` to completion.
pub fn cacheloop<S: AsRef<std::ffi::OsStr>>(args: &[S], timeout: Duration) -> Run {
    Cacheloop::start(args).finish(timeout)
}

/// The checksum the fixture prints after `calls` calls, computed here
/// independently: the oracle for "probing changed nothing".
pub fn fixture_checksum(calls: u64) -> u64 {
    (0..calls).fold(0u64, |sum, i| {
        let invalidated = i.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17);
        sum.wrapping_add(invalidated) ^ (i ^ 0x5555)
    })
}
