//! The collector: at each tick, one raw reading of the kernel's maps and of
//! `/proc` for the watched processes, as a [`Snapshot`]. No decision, no
//! formatting: diffs, rates and verdicts are the analyzer's.
//!
//! Two facts are looked up here because only a live machine has them: the
//! watched function a call site's return address lies in (through the
//! process's mappings and the catalog's code ranges), and the text and
//! frames of keys and stacks the kernel holds, read once when first seen.

use std::{collections::BTreeMap, time::Instant};

// foldhash: see analyze.rs.
use foldhash::{HashMap, HashMapExt as _, HashSet, HashSetExt as _};

use profiler_common::{CallKey, CallerKey, KeyEdge, KeyId, StackKey};

use crate::{
    catalog::{Catalog, FileId},
    cycles,
    probes::{ProbeError, Probes},
    report::unix_now,
    snapshot::{
        CallSite, Count, Fresh, FreshProcess, Glance, KeyCount, KeyEdgeCount, KeyText, NewStack,
        ProcessFacts, Snapshot, StackCount, since,
    },
    target::Process,
};

/// A stack not sampled for this long leaves the kernel's maps.
const STACK_IDLE: std::time::Duration = std::time::Duration::from_secs(30);

/// What the last glance that let its reading go saw: where the next
/// snapshot's fresh part starts ([`Fresh`]).
#[derive(Default)]
struct LetGo {
    at: Option<Instant>,
    counts: HashMap<CallKey, u64>,
    processes: HashMap<u32, LetGoProcess>,
}

/// A process as a glance that let its reading go saw it.
#[derive(Default)]
struct LetGoProcess {
    cpu_nanos: Option<u64>,
    /// The busiest thread's busy nanoseconds since the last snapshot.
    hot_thread_before: Option<u64>,
    /// Each thread's busy nanoseconds.
    threads: Option<HashMap<u32, u64>>,
}

pub struct Collector {
    counts: HashMap<CallKey, u64>,
    callers: HashMap<CallerKey, u64>,
    keys: HashMap<KeyId, u64>,
    key_edges: HashMap<KeyEdge, u64>,
    stacks: HashMap<StackKey, u64>,
    /// Return address -> watched function holding it (or none), per pid,
    /// under catalog version `resolved_for`.
    resolved: HashMap<(u32, u64), Option<u32>>,
    resolved_for: u32,
    known_texts: HashSet<u64>,
    known_stacks: HashSet<u32>,
    /// Per process, each thread's busy nanoseconds at the last reading.
    threads: HashMap<u32, HashMap<u32, u64>>,
    /// Per stack id: its samples summed, and when they last grew.
    stack_activity: HashMap<u32, (u64, Instant)>,
    last_read: Instant,
    /// When the call counters were last read: the end of the snapshot's
    /// time.
    counted: Instant,
    started: Instant,
    /// The counters, each process's CPU time and when, at the last glance
    /// or snapshot: a glance sees what came since.
    glanced_counts: HashMap<CallKey, u64>,
    glanced_cpu: HashMap<u32, u64>,
    glanced_threads: HashMap<u32, HashMap<u32, u64>>,
    glanced: Instant,
    /// The last glance since the last snapshot that let its reading go.
    let_go: Option<LetGo>,
    /// Each process's CPU nanoseconds at the last snapshot.
    read_cpu: HashMap<u32, u64>,
    /// [`Collector::read_processes`]' facts for the next snapshot.
    processes_read: HashMap<u32, (ProcessFacts, Option<u64>)>,
}

impl Collector {
    /// Counting starts at zero now: make it right after attaching.
    pub fn new(started: Instant) -> Self {
        Self {
            counts: HashMap::new(),
            callers: HashMap::new(),
            keys: HashMap::new(),
            key_edges: HashMap::new(),
            stacks: HashMap::new(),
            resolved: HashMap::new(),
            resolved_for: 0,
            known_texts: HashSet::new(),
            known_stacks: HashSet::new(),
            stack_activity: HashMap::new(),
            threads: HashMap::new(),
            last_read: Instant::now(),
            counted: Instant::now(),
            started,
            glanced_counts: HashMap::new(),
            glanced_cpu: HashMap::new(),
            glanced_threads: HashMap::new(),
            glanced: Instant::now(),
            let_go: None,
            read_cpu: HashMap::new(),
            processes_read: HashMap::new(),
        }
    }

    /// Reads the call counters; returns when. Then
    /// [`Collector::read_evidence`] and [`Collector::snapshot`], or a
    /// [`Collector::glance`] only.
    pub fn read_counts(&mut self, probes: &mut Probes) -> Result<Instant, ProbeError> {
        probes.read_counts(&mut self.counts)?;
        let counted = Instant::now();
        self.counted = counted;
        Ok(counted)
    }

    /// What the counters just read ([`Collector::read_counts`]) and `/proc`
    /// say of the processes in `live` since the last glance or snapshot,
    /// for the analyzer to judge whether a full reading is needed
    /// ([`crate::analyze::Analyzer::quiet`]). None when a process ended
    /// (its last calls go out in a reading). The next snapshot still
    /// covers all the time since the last one.
    pub fn glance(&mut self, live: &BTreeMap<u32, Process>) -> Option<Glance> {
        let seconds = self
            .counted
            .saturating_duration_since(self.glanced)
            .as_secs_f64()
            .max(1e-3);
        self.glanced = self.counted;
        let mut calls = Vec::new();
        for (key, &now) in &self.counts {
            if !live.contains_key(&key.tgid) {
                continue;
            }
            let before = self.glanced_counts.insert(*key, now).unwrap_or(0);
            // A counter made again (its process exec'd) counts from zero.
            let n = since(before, now);
            if n > 0 {
                calls.push(Count {
                    func: key.func,
                    pid: key.tgid,
                    calls: n,
                });
            }
        }
        // Every watched process's CPU, summed (a pool of processes burning
        // a core shows in it), and the busiest thread's busy time (run
        // plus run-queue wait: a loop on a contended core, as judged).
        // Unknown (a process or thread new since the last glance) is not
        // quiet.
        let mut nanos = 0u64;
        let mut busiest = 0u64;
        let mut known = true;
        for p in live.values() {
            // Gone: its last calls go out in a reading.
            let usage = p.usage_if_alive()?;
            let before = self.glanced_cpu.insert(p.pid, usage.cpu_nanos);
            known &= before.is_some();
            nanos += usage
                .cpu_nanos
                .saturating_sub(before.unwrap_or(usage.cpu_nanos));
            let Some(threads) = p.thread_busy() else {
                known = false;
                self.glanced_threads.remove(&p.pid);
                continue;
            };
            let before = self.glanced_threads.entry(p.pid).or_default();
            for &(tid, busy) in &threads {
                // A thread new since: all its time is.
                let b = before.get(&tid).copied().unwrap_or(0);
                busiest = busiest.max(busy.saturating_sub(b));
            }
            *before = threads.into_iter().collect();
        }
        let cores = |n: u64| n as f64 / (seconds * 1e9);
        Some(Glance {
            seconds,
            calls,
            cores: known.then(|| cores(nanos)),
            hottest_thread: known.then(|| cores(busiest)),
        })
    }

    /// The reading of the last glance is let go: the next snapshot covers
    /// its time, and its fresh part starts here.
    pub fn let_go(&mut self) {
        let mut l = self.let_go.take().unwrap_or_default();
        l.at = Some(self.glanced);
        l.counts.clone_from(&self.glanced_counts);
        l.processes.clear();
        for (&pid, &cpu) in &self.glanced_cpu {
            let threads = self.glanced_threads.get(&pid);
            let hottest = match (threads, self.threads.get(&pid)) {
                (Some(now), Some(before)) if !before.is_empty() => Some(hottest(now, before)),
                _ => None,
            };
            l.processes.insert(
                pid,
                LetGoProcess {
                    cpu_nanos: Some(cpu),
                    hot_thread_before: hottest,
                    threads: threads.cloned(),
                },
            );
        }
        self.let_go = Some(l);
    }

    /// Reads the evidence maps (call sites, keys, stacks) after the call
    /// counters. Call [`Collector::snapshot`] next.
    pub fn read_evidence(&mut self, probes: &mut Probes) -> Result<(), ProbeError> {
        probes.read_callers(&mut self.callers)?;
        probes.read_keys(&mut self.keys)?;
        probes.read_key_edges(&mut self.key_edges)?;
        probes.read_stacks(&mut self.stacks)?;
        self.rotate_stacks(probes);
        Ok(())
    }

    /// Stacks sampled no more for [`STACK_IDLE`] leave the kernel's maps:
    /// its stack map never forgets on its own, and once full it records no
    /// new stack, so a loop starting after an hour of traffic would show
    /// none.
    fn rotate_stacks(&mut self, probes: &mut Probes) {
        let now = Instant::now();
        let mut totals: HashMap<u32, u64> = HashMap::new();
        for (key, &samples) in &self.stacks {
            *totals.entry(key.stack_id).or_default() += samples;
        }
        self.stack_activity.retain(|id, _| totals.contains_key(id));
        let mut idle = Vec::new();
        for (id, total) in totals {
            let entry = self.stack_activity.entry(id).or_insert((total, now));
            if entry.0 != total {
                *entry = (total, now);
            } else if now.duration_since(entry.1) >= STACK_IDLE {
                idle.push(id);
            }
        }
        for id in idle {
            probes.forget_stack(id);
            self.stack_activity.remove(&id);
            self.known_stacks.remove(&id);
            self.stacks.retain(|k, _| k.stack_id != id);
        }
    }

    /// Every counter read, by (function, process): calls since the pair was
    /// first counted.
    pub fn counts(&self) -> impl Iterator<Item = (&CallKey, &u64)> {
        self.counts.iter()
    }

    /// The processes the counters name, with their calls: under
    /// `--binary`, new processes show up here first.
    pub fn counted(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        let mut per_pid: BTreeMap<u32, u64> = BTreeMap::new();
        for (key, calls) in &self.counts {
            *per_pid.entry(key.tgid).or_default() += calls;
        }
        per_pid.into_iter()
    }

    /// The snapshot of what was read, for the
    /// processes in `live`, whose executables were `exes` just before.
    /// `probed` is the share of the interval the probes were in.
    pub fn snapshot(
        &mut self,
        probes: &Probes,
        catalog: &Catalog,
        live: &BTreeMap<u32, Process>,
        exes: &HashMap<u32, FileId>,
        probed: f64,
    ) -> Snapshot {
        // The counts' time ends where they were read, not after the
        // evidence maps and the discovery that followed.
        let now = self.counted;
        let seconds = now
            .saturating_duration_since(self.last_read)
            .as_secs_f64()
            .max(1e-3);
        self.last_read = now;
        let watched = |pid: &u32| live.contains_key(pid);

        let mut snap = Snapshot {
            catalog: catalog.version,
            ts: unix_now(),
            seconds,
            elapsed: now.duration_since(self.started).as_secs_f64(),
            probed,
            dropped: probes.dropped(),
            counts_capacity: probes.capacity(),
            // Every entry of the hash, watched or not: under --binary it
            // also holds processes not identified yet. Pairs counted in
            // slots of their own cannot fill it.
            counts_entries: probes.hashed(),
            ..Snapshot::default()
        };
        snap.counts = self
            .counts
            .iter()
            .filter(|(k, _)| watched(&k.tgid))
            .map(|(k, &calls)| Count {
                func: k.func,
                pid: k.tgid,
                calls,
            })
            .collect();
        snap.call_sites = self.call_sites(catalog, live);
        snap.keys = self
            .keys
            .iter()
            .filter(|(k, _)| watched(&k.tgid))
            .map(|(k, &calls)| KeyCount {
                func: k.func,
                pid: k.tgid,
                hash: k.hash,
                calls,
            })
            .collect();
        snap.key_edges = self
            .key_edges
            .iter()
            .filter(|(k, _)| watched(&k.tgid))
            .map(|(k, &calls)| KeyEdgeCount {
                func: k.func,
                pid: k.tgid,
                from: k.from,
                to: k.to,
                calls,
            })
            .collect();
        snap.stacks = self
            .stacks
            .iter()
            .filter(|(k, _)| watched(&k.tgid))
            .map(|(k, &samples)| StackCount {
                func: k.func,
                pid: k.tgid,
                stack_id: k.stack_id,
                samples,
            })
            .collect();

        // Texts and frames, once each while the kernel holds them.
        let text_keys: HashSet<u64> = snap
            .keys
            .iter()
            .filter(|k| catalog.has_text_keys(k.func))
            .map(|k| k.hash)
            .collect();
        // Known only once read: the text and frame maps are LRU maps of
        // their own and may lack what the counters name; try again next tick.
        self.known_texts.retain(|hash| text_keys.contains(hash));
        for hash in text_keys {
            if !self.known_texts.contains(&hash)
                && let Some(text) = probes.key_text(hash)
            {
                snap.key_texts.push(KeyText { hash, text });
                self.known_texts.insert(hash);
            }
        }
        let stack_ids: HashSet<u32> = snap.stacks.iter().map(|s| s.stack_id).collect();
        self.known_stacks.retain(|id| stack_ids.contains(id));
        for stack_id in stack_ids {
            if !self.known_stacks.contains(&stack_id)
                && let Some(ips) = probes.stack_frames(stack_id)
            {
                snap.new_stacks.push(NewStack { stack_id, ips });
                self.known_stacks.insert(stack_id);
            }
        }

        self.threads.retain(|pid, _| live.contains_key(pid));
        // Not for a process found since (under --binary, in this reading's
        // counters): all its calls would read as fresh ones.
        let let_go = self
            .let_go
            .take()
            .filter(|l| l.at.is_some() && live.keys().all(|pid| l.processes.contains_key(pid)));
        let mut fresh = let_go.as_ref().map(|l| Fresh {
            seconds: now
                .saturating_duration_since(l.at.unwrap_or(now))
                .as_secs_f64()
                .clamp(1e-3, seconds),
            calls: self
                .counts
                .iter()
                .filter(|(k, _)| watched(&k.tgid))
                .filter_map(|(k, &now)| {
                    let then = l.counts.get(k).copied().unwrap_or(0);
                    // A counter made again counts from zero.
                    let calls = since(then, now);
                    (calls > 0).then_some(Count {
                        func: k.func,
                        pid: k.tgid,
                        calls,
                    })
                })
                .collect(),
            processes: Vec::new(),
        });
        // Read right after the counters where it could be (see
        // `read_processes`); a process found since, now.
        let mut read = std::mem::take(&mut self.processes_read);
        snap.processes = live
            .values()
            .map(|p| {
                let at = let_go.as_ref().and_then(|l| l.processes.get(&p.pid));
                let (mut f, since) = match read.remove(&p.pid) {
                    Some(read) => read,
                    None => self.process_facts(p, at.and_then(|a| a.threads.as_ref())),
                };
                f.exe = exes.get(&p.pid).copied().unwrap_or_default();
                if let Some(fresh) = &mut fresh {
                    fresh.processes.push(FreshProcess {
                        pid: p.pid,
                        cpu_start: self.read_cpu.get(&p.pid).copied(),
                        cpu_nanos: at.and_then(|a| a.cpu_nanos),
                        hot_thread_before: at.and_then(|a| a.hot_thread_before),
                        hot_thread_nanos: since,
                    });
                }
                f
            })
            .collect();
        snap.fresh = fresh;
        // The next glance sees what comes after this reading.
        self.glanced_counts.clone_from(&self.counts);
        self.glanced_cpu = snap
            .processes
            .iter()
            .filter_map(|p| Some((p.pid, p.cpu_nanos?)))
            .collect();
        self.read_cpu.clone_from(&self.glanced_cpu);
        self.glanced_threads.clone_from(&self.threads);
        self.glanced = now;
        snap
    }

    /// What `/proc` says of the processes in `live` now, for the next
    /// snapshot: read right after the counters, so that a reading's CPU
    /// spans the same time as its calls (the evidence maps, read next,
    /// take a while). With the busiest thread's busy time since the last
    /// glance that let its reading go, if one did.
    pub fn read_processes(&mut self, live: &BTreeMap<u32, Process>) {
        let mut read = std::mem::take(&mut self.processes_read);
        read.clear();
        // Out while its thread bases are read (not copied per process).
        let let_go = self.let_go.take();
        for p in live.values() {
            let since = let_go
                .as_ref()
                .and_then(|l| l.processes.get(&p.pid))
                .and_then(|a| a.threads.as_ref());
            read.insert(p.pid, self.process_facts(p, since));
        }
        self.let_go = let_go;
        self.processes_read = read;
    }

    /// `p`'s facts (its executable left to the caller), and its busiest
    /// thread's busy nanoseconds since `since` (each thread's then).
    fn process_facts(
        &mut self,
        p: &Process,
        since: Option<&HashMap<u32, u64>>,
    ) -> (ProcessFacts, Option<u64>) {
        let mut f = facts(p, FileId::default());
        let (all, since) = self.hottest_thread(p, since);
        f.hot_thread_nanos = all;
        (f, since)
    }

    /// Nanoseconds the busiest thread of `p` ran or waited to run since the
    /// last reading (threads new since are not counted), and since
    /// `since` (each thread's busy nanoseconds then).
    fn hottest_thread(
        &mut self,
        p: &Process,
        since: Option<&HashMap<u32, u64>>,
    ) -> (Option<u64>, Option<u64>) {
        let Some(now) = p.thread_busy() else {
            self.threads.remove(&p.pid);
            return (None, None);
        };
        let now: HashMap<u32, u64> = now.into_iter().collect();
        let before = self.threads.entry(p.pid).or_default();
        let first = before.is_empty();
        let all = (!first).then(|| hottest(&now, before));
        let since = since.map(|then| hottest(&now, then));
        // Threads that ended go with this reading.
        *before = now;
        (all, since)
    }

    /// Call sites with the watched function each lies in, if any.
    fn call_sites(&mut self, catalog: &Catalog, live: &BTreeMap<u32, Process>) -> Vec<CallSite> {
        if self.resolved_for != catalog.version {
            // New functions may hold addresses that held none before.
            self.resolved.clear();
            self.resolved_for = catalog.version;
        }
        let mut maps: HashMap<u32, Vec<cycles::Mapping>> = HashMap::new();
        let mut sites = Vec::with_capacity(self.callers.len());
        for (key, &calls) in &self.callers {
            if !live.contains_key(&key.tgid) {
                continue;
            }
            let caller = *self
                .resolved
                .entry((key.tgid, key.return_address))
                .or_insert_with(|| {
                    let maps = maps.entry(key.tgid).or_insert_with(|| {
                        let text = std::fs::read_to_string(format!("/proc/{}/maps", key.tgid));
                        cycles::parse_maps(&text.unwrap_or_default())
                    });
                    let map = maps
                        .iter()
                        .find(|m| (m.start..m.end).contains(&key.return_address))?;
                    catalog.function_at(
                        &map.path,
                        map.inode,
                        key.return_address - map.start + map.offset,
                    )
                });
            sites.push(CallSite {
                func: key.func,
                pid: key.tgid,
                return_address: key.return_address,
                caller,
                calls,
            });
        }
        sites
    }

    /// Forgets what was cached for a process that exited.
    pub fn forget(&mut self, pid: u32) {
        self.resolved.retain(|&(p, _), _| p != pid);
    }
}

/// The most busy nanoseconds one thread added from `before` to `now` (each
/// thread's busy nanoseconds); threads not in `before` are not counted.
fn hottest(now: &HashMap<u32, u64>, before: &HashMap<u32, u64>) -> u64 {
    now.iter()
        .filter_map(|(tid, n)| Some(n.saturating_sub(*before.get(tid)?)))
        .max()
        .unwrap_or(0)
}

/// What `/proc` says of a process now.
/// `exe` is the executable the controller found before the maps were read:
/// the one reading exec decisions rest on, in the controller (counters out)
/// and in the analyzer (history forgotten) alike.
fn facts(p: &Process, exe: FileId) -> ProcessFacts {
    let usage = p.usage();
    ProcessFacts {
        pid: p.pid,
        ns_pid: p.ns_pid,
        start_time: p.start_time,
        exe,
        cpu_nanos: usage.map(|u| u.cpu_nanos),
        rss_bytes: usage.map_or(0, |u| u.rss_bytes),
        alive: p.is_alive(),
        comm: p.comm.clone(),
        hot_thread_nanos: None,
    }
}
