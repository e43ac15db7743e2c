//! The benchmark's target: a static C program with 10,000 probe-able
//! functions (`bench_fn_00000`..`bench_fn_09999`, so [`GLOBS`] pick 1, 100,
//! 1000 and 10,000 of them with the same glob in every tool) and a hot one.
//!
//!     bench_target idle SECONDS            # waits (attach/detach runs)
//!     bench_target calls RATE SECONDS N    # RATE calls/s over bench_fn_00000..N-1
//!     bench_target hot SECONDS             # bench_hot flat out; prints "second N CALLS"
//!
//! Static, so the same file runs from the host and inside the trixie chroot
//! the newer bpftrace runs in.

use std::{fmt::Write as _, fs, path::Path, process::Command};

use crate::cmd::run;

pub const FUNCTIONS: usize = 10_000;

/// (functions, the glob that picks them).
pub const GLOBS: [(usize, &str); 4] = [
    (1, "bench_fn_00000"),
    (100, "bench_fn_000*"),
    (1000, "bench_fn_00*"),
    (10_000, "bench_fn_*"),
];

fn source() -> String {
    let mut c = String::from(
        "#include <stdio.h>\n#include <stdlib.h>\n#include <string.h>\n#include <time.h>\n#include <unistd.h>\n\n",
    );
    for i in 0..FUNCTIONS {
        let _ = writeln!(
            c,
            "__attribute__((noinline)) int bench_fn_{i:05}(int x) {{ asm volatile(\"\"); return x * {} + 1; }}",
            i + 3
        );
    }
    c.push_str("typedef int (*fn_t)(int);\nstatic fn_t table[] = {");
    for i in 0..FUNCTIONS {
        let _ = write!(c, "bench_fn_{i:05},");
    }
    c.push_str(
        r#"};

__attribute__((noinline)) int bench_hot(int x) { asm volatile(""); return x ^ 0x5555; }

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    volatile int sink = 0;
    double start = now();
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready %d\n", (int)getpid());
    if (!strcmp(argv[1], "idle")) {
        while (now() - start < atof(argv[2])) { struct timespec d = {0, 10000000}; nanosleep(&d, NULL); }
    } else if (!strcmp(argv[1], "calls") && argc > 4) {
        double rate = atof(argv[2]), secs = atof(argv[3]);
        long n = atol(argv[4]), done = 0;
        if (n < 1 || n > (long)(sizeof table / sizeof table[0])) return 2;
        while (now() - start < secs) {
            long due = (long)((now() - start) * rate);
            for (; done < due; done++) sink += table[done % n]((int)done);
            struct timespec d = {0, 1000000}; nanosleep(&d, NULL);
        }
    } else if (!strcmp(argv[1], "hot")) {
        int secs = atoi(argv[2]);
        for (int s = 0; s < secs; s++) {
            long calls = 0;
            double end = start + s + 1;
            while (1) {
                for (int i = 0; i < 1000; i++) sink += bench_hot(i);
                calls += 1000;
                if (now() >= end) break;
            }
            printf("second %d %ld\n", s, calls);
        }
    }
    return sink == 42 ? 1 : 0;
}
"#,
    );
    c
}

/// Compiles the target into `dir/bench_target` (gcc, static).
pub fn build(dir: &Path) -> Result<std::path::PathBuf, String> {
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let src = dir.join("bench_target.c");
    fs::write(&src, source()).map_err(|e| format!("cannot write {}: {e}", src.display()))?;
    let out = dir.join("bench_target");
    let mut gcc = Command::new("gcc");
    gcc.args(["-O2", "-static", "-o"]).arg(&out).arg(&src);
    run(gcc)?;
    Ok(out)
}
