//! One raw reading of everything cacheloop measures, taken by the collector
//! at each tick: the analyzer's only input besides the catalog, and what a
//! recording stores.
//!
//! Counters are cumulative (summed over CPUs) as the kernel holds them: an
//! entry that disappears was removed or evicted, and one that comes back
//! smaller was made again. No decision and no formatting lives here.

use serde::{Deserialize, Serialize};

use crate::catalog::FileId;

/// Calls of a function in a process, since its counter was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Count {
    pub func: u32,
    pub pid: u32,
    pub calls: u64,
}

/// Calls between two readings of a cumulative counter; one that went
/// backwards was made again and counts from zero.
pub fn since(before: u64, now: u64) -> u64 {
    if now >= before { now - before } else { now }
}

/// A glance at the call counters between readings: what came since the
/// last glance or reading. Not recorded: a reading it lets go is folded
/// into the next.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Glance {
    /// Seconds since the last glance or reading.
    pub seconds: f64,
    /// Calls since then, of each (function, process) that had any.
    pub calls: Vec<Count>,
    /// CPU every watched process used since then, in cores, summed; None
    /// when not known for one of them.
    pub cores: Option<f64>,
    /// The busiest thread's busy time (running or waiting to run) since
    /// then, in cores; None when not known for one of them.
    pub hottest_thread: Option<f64>,
}

/// The part of a reading after the last glance that let the readings
/// before it go (that glance found nothing that could move a verdict):
/// the reading is judged as two, the part before it (calm) and this one,
/// each on its own calls, seconds and CPU, as if they had been read
/// apart; the evidence (call sites, stacks) spans the whole reading.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fresh {
    pub seconds: f64,
    /// Calls in it, of each (function, process) that had any.
    pub calls: Vec<Count>,
    /// What each watched process had used as of its start.
    pub processes: Vec<FreshProcess>,
}

/// A process at the start of a reading's fresh part ([`Fresh`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FreshProcess {
    pub pid: u32,
    /// CPU used so far at the reading's start and at its fresh part's,
    /// nanoseconds (as `ProcessFacts::cpu_nanos`).
    pub cpu_start: Option<u64>,
    pub cpu_nanos: Option<u64>,
    /// The busiest thread's busy nanoseconds from the last reading to
    /// then, and in the fresh part (as `ProcessFacts::hot_thread_nanos`).
    pub hot_thread_before: Option<u64>,
    pub hot_thread_nanos: Option<u64>,
}

/// Calls of a function from one call site (return address) in a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CallSite {
    pub func: u32,
    pub pid: u32,
    pub return_address: u64,
    /// The watched function whose code holds the return address, if any:
    /// resolved by the collector through the process's mappings.
    pub caller: Option<u32>,
    pub calls: u64,
}

/// Calls of a function with one key in a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct KeyCount {
    pub func: u32,
    pub pid: u32,
    /// The integer key, or the FNV-1a hash of a text key.
    pub hash: u64,
    pub calls: u64,
}

/// On one thread of a process, a call of `func` with key `to` came right
/// after a call with key `from`, `calls` times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct KeyEdgeCount {
    pub func: u32,
    pub pid: u32,
    pub from: u64,
    pub to: u64,
    pub calls: u64,
}

/// Sampled stacks of a function in a process, by stack id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StackCount {
    pub func: u32,
    pub pid: u32,
    pub stack_id: u32,
    pub samples: u64,
}

/// The frames of a stack id first seen in this snapshot (instruction
/// pointers, innermost first).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewStack {
    pub stack_id: u32,
    pub ips: Vec<u64>,
}

/// The text of a key first seen in this snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyText {
    pub hash: u64,
    pub text: String,
}

/// What `/proc` says of a watched process at this tick.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessFacts {
    pub pid: u32,
    /// The pid inside its own pid namespace, where it differs.
    pub ns_pid: Option<u32>,
    /// Start time in clock ticks since boot: tells a process from a later
    /// one that reuses its pid.
    pub start_time: u64,
    /// The executable it runs.
    pub exe: FileId,
    /// CPU time used so far (user + system), nanoseconds; `None` when
    /// `/proc` could not be read.
    pub cpu_nanos: Option<u64>,
    /// Time the busiest thread ran or waited to run since the previous
    /// reading (schedstat: on-CPU plus run-queue wait; CPU time where the
    /// kernel has no schedstat), nanoseconds; `None` on the first reading,
    /// or past 256 threads.
    pub hot_thread_nanos: Option<u64>,
    pub rss_bytes: u64,
    /// Still running at the end of this tick; `false` is its last snapshot.
    pub alive: bool,
    /// The command name: a restart of the service has the same one, and
    /// starts from what its predecessor learned.
    pub comm: String,
}

/// One tick's reading.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The catalog version the counters are keyed by.
    pub catalog: u32,
    /// Unix time of the reading, seconds.
    pub ts: f64,
    /// Seconds since the previous reading (or since attaching), measured.
    pub seconds: f64,
    /// Seconds since the run began.
    pub elapsed: f64,
    /// Share of those seconds the probes were in (1 unless the overhead
    /// governor windowed them).
    pub probed: f64,
    /// When readings before this one were let go as quiet (see
    /// `Analyzer::quiet`) and folded into it: its fresh part. Not
    /// recorded: readings are not let go while recording, so that a
    /// replay under other rules judges every reading.
    #[serde(skip)]
    pub fresh: Option<Fresh>,
    pub counts: Vec<Count>,
    pub call_sites: Vec<CallSite>,
    pub keys: Vec<KeyCount>,
    /// Key transitions (absent from recordings made before they were
    /// counted).
    #[serde(default)]
    pub key_edges: Vec<KeyEdgeCount>,
    pub stacks: Vec<StackCount>,
    pub new_stacks: Vec<NewStack>,
    pub key_texts: Vec<KeyText>,
    /// Hits the kernel could not count since attaching (counter map full).
    pub dropped: u64,
    /// Capacity of the counter hash, and the entries it holds (for every
    /// process, watched or not), to warn before it fills.
    pub counts_capacity: u32,
    pub counts_entries: u32,
    /// Every watched process, by pid.
    pub processes: Vec<ProcessFacts>,
    /// This reading closes a reporting interval (`--interval`): samples
    /// and health go out. Readings are taken more often than that, so
    /// that a loop is judged within a fraction of a second.
    pub report: bool,
}
