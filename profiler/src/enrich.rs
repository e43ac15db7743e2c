//! The enricher: turns the analyzer's events (ids and hashes) into the
//! records people and programs read: function names from the catalog, key
//! texts (hashed unless `--show-keys`), symbolized stacks.
//!
//! Live, it runs on the pipeline thread, off the control path, with a
//! [`Symbolizer`] reading `/proc`; what it learned about addresses goes into
//! the recording as [`SymbolFact`]s. In `replay` it is fed those facts
//! instead, so both name the same frames the same way.

use std::{collections::HashMap, hash::Hasher as _, sync::Arc};

use serde::{Deserialize, Serialize};
use siphasher::sip::SipHasher13;

use crate::{
    analyze::{self, Event, KeyRef, LoopEvent, Output, StackRef},
    catalog::{Catalog, FileId},
    detect::Rules,
    report::{self, KeyCount, Record, Structure, Summary},
    snapshot::Snapshot,
    symbolize::{Frame, Symbolizer, lookup_address},
};

/// An address of a process, named.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SymbolFact {
    pub pid: u32,
    /// The address looked up (see [`lookup_address`]).
    pub address: u64,
    pub frame: Frame,
}

/// Where frames come from.
enum Frames {
    /// `/proc` and the files, now.
    Live(Symbolizer),
    /// A recording's facts.
    Recorded,
}

pub struct Enricher {
    catalog: Arc<Catalog>,
    rules: Rules,
    show_keys: bool,
    /// The keys of the hash that stands for a key in output: random per run
    /// (kept in its recording), so hashes match within a run and say
    /// nothing across runs.
    seed: (u64, u64),
    /// Symbolize every new stack and call site as it appears (to record
    /// them), not only at verdicts.
    eager: bool,
    /// Texts of the keys the kernel counts now (bounded by its LRU map).
    key_texts: HashMap<u64, String>,
    stacks: HashMap<u32, Vec<u64>>,
    named: HashMap<(u32, u64), Frame>,
    /// Each process's executable at the last snapshot, to notice an exec.
    exes: HashMap<u32, FileId>,
    frames: Frames,
    /// Facts learned since they were last taken.
    learned: Vec<SymbolFact>,
}

impl Enricher {
    /// Live: frames are named from `/proc`; with `eager`, as soon as they
    /// appear (for a recording).
    pub fn live(
        catalog: Arc<Catalog>,
        rules: Rules,
        show_keys: bool,
        seed: (u64, u64),
        eager: bool,
    ) -> Self {
        Self::new(
            catalog,
            rules,
            show_keys,
            seed,
            eager,
            Frames::Live(Symbolizer::default()),
        )
    }

    /// Replay: frames are named from a recording's facts.
    pub fn replay(catalog: Arc<Catalog>, rules: Rules, show_keys: bool, seed: (u64, u64)) -> Self {
        Self::new(catalog, rules, show_keys, seed, false, Frames::Recorded)
    }

    fn new(
        catalog: Arc<Catalog>,
        rules: Rules,
        show_keys: bool,
        seed: (u64, u64),
        eager: bool,
        frames: Frames,
    ) -> Self {
        Self {
            catalog,
            rules,
            show_keys,
            seed,
            eager,
            key_texts: HashMap::new(),
            stacks: HashMap::new(),
            named: HashMap::new(),
            exes: HashMap::new(),
            frames,
            learned: Vec::new(),
        }
    }

    pub fn set_catalog(&mut self, catalog: Arc<Catalog>) {
        self.catalog = catalog;
    }

    /// A recorded fact (replay).
    pub fn add_fact(&mut self, fact: SymbolFact) {
        self.named.insert((fact.pid, fact.address), fact.frame);
    }

    /// Facts learned since the last call (for the recorder).
    pub fn take_facts(&mut self) -> Vec<SymbolFact> {
        std::mem::take(&mut self.learned)
    }

    /// Takes in what a snapshot brings: key texts, new stacks; eagerly,
    /// names their frames and new call sites.
    pub fn observe(&mut self, snap: &Snapshot) {
        for k in &snap.key_texts {
            self.key_texts.insert(k.hash, k.text.clone());
        }
        // A key the kernel no longer counts is in no verdict to come; the
        // collector sends its text again if it comes back.
        if self.key_texts.len() > snap.keys.len() {
            let counted: std::collections::HashSet<u64> =
                snap.keys.iter().map(|k| k.hash).collect();
            self.key_texts.retain(|hash, _| counted.contains(hash));
        }
        for s in &snap.new_stacks {
            self.stacks.insert(s.stack_id, s.ips.clone());
        }
        if self.eager {
            let mut wanted: Vec<(u32, u64)> = Vec::new();
            for s in &snap.stacks {
                if let Some(ips) = self.stacks.get(&s.stack_id) {
                    wanted.extend(
                        ips.iter()
                            .enumerate()
                            .map(|(i, &ip)| (s.pid, lookup_address(ip, i == 0))),
                    );
                }
            }
            wanted.extend(
                snap.call_sites
                    .iter()
                    .map(|c| (c.pid, lookup_address(c.return_address, false))),
            );
            for (pid, address) in wanted {
                self.name(pid, address);
            }
        }
        for p in &snap.processes {
            // Exited, or ran exec (another program at the same addresses):
            // what was named for it no longer holds.
            let was = self.exes.insert(p.pid, p.exe);
            let execed = was.is_some_and(|was| {
                was != FileId::default() && p.exe != FileId::default() && was != p.exe
            });
            if p.alive && !execed {
                continue;
            }
            if let Frames::Live(s) = &mut self.frames {
                s.forget(p.pid);
            }
            self.named.retain(|&(pid, _), _| pid != p.pid);
            if !p.alive {
                self.exes.remove(&p.pid);
            }
        }
    }

    fn name(&mut self, pid: u32, address: u64) -> Frame {
        if let Some(frame) = self.named.get(&(pid, address)) {
            return frame.clone();
        }
        let Frames::Live(symbolizer) = &mut self.frames else {
            return Frame::default();
        };
        let frame = symbolizer.frame(pid, address);
        self.named.insert((pid, address), frame.clone());
        self.learned.push(SymbolFact {
            pid,
            address,
            frame: frame.clone(),
        });
        frame
    }

    /// The records of one tick's events.
    pub fn records(&mut self, out: &Output) -> Vec<Record> {
        let ts = out.ts;
        let mut records = Vec::with_capacity(out.events.len());
        for event in &out.events {
            let record = match event {
                Event::Sample {
                    pid,
                    ns_pid,
                    func,
                    calls,
                    rate,
                    baseline,
                    estimated,
                } => Record::Sample {
                    ts,
                    pid: *pid,
                    ns_pid: *ns_pid,
                    function: self.catalog.shared_name(*func),
                    calls: *calls,
                    rate: *rate,
                    baseline: *baseline,
                    estimated: *estimated,
                },
                Event::Health { pid, health } => Record::Health {
                    ts,
                    pid: *pid,
                    health: *health,
                },
                Event::Loop(l) => match self.loop_record(ts, l) {
                    Some(r) => r,
                    None => continue,
                },
                Event::Recovered(r) => {
                    let name = match r.key.func {
                        crate::detect::ALL_FUNCTIONS => "the watched functions together".to_owned(),
                        f => self.catalog.name(f),
                    };
                    report::recovered_record(ts, r, &name)
                }
                Event::TargetExit { pid } => Record::TargetExit { ts, pid: *pid },
                Event::Dropped { count } => Record::Warning {
                    ts,
                    pid: None,
                    kind: "dropped_hits".to_owned(),
                    message: format!(
                        "{count} call(s) were not counted in this interval: the counter map is full; \
                         rates read low"
                    ),
                    count: Some(*count),
                },
                Event::Interval {
                    dropped,
                    evicted,
                    counters,
                    capacity,
                } => Record::Interval {
                    ts,
                    dropped: *dropped,
                    evicted: *evicted,
                    counters: *counters,
                    counters_capacity: *capacity,
                },
                Event::Evicted { count } => Record::Warning {
                    ts,
                    pid: None,
                    kind: "evicted".to_owned(),
                    message: format!(
                        "the kernel's key and call-site tables are full and let {count} entries go \
                         in this interval; key counts and call cycles now cover the recent calls \
                         (each interval's `evicted` says how many)"
                    ),
                    count: Some(*count),
                },
                Event::MapPressure { used, capacity } => Record::Warning {
                    ts,
                    pid: None,
                    kind: "map_pressure".to_owned(),
                    message: format!(
                        "the counter map holds {used} of {capacity} entries; once full, calls \
                         of new processes are dropped"
                    ),
                    count: Some(*used as u64),
                },
            };
            records.push(record);
        }
        records
    }

    fn loop_record(&mut self, ts: f64, l: &LoopEvent) -> Option<Record> {
        let top: Vec<KeyCount> = l
            .top_keys
            .iter()
            .map(|&(key, count)| KeyCount {
                key: self.key_label(key),
                count,
            })
            .collect();
        let structure = Structure {
            cycle: l
                .cycle
                .as_ref()
                .map(|c| c.iter().map(|&f| self.catalog.name(f)).collect()),
            key_cycle: l
                .key_cycle
                .as_ref()
                .map(|keys| keys.iter().map(|&k| self.key_label(k)).collect()),
            functions: l.functions.iter().map(|&f| self.catalog.name(f)).collect(),
            processes: l.processes.clone(),
            top_keys: (!top.is_empty()).then_some(top),
            repeating: l.repeating,
            stack: l.stack.map(|s| self.stack(s)),
        };
        let catalog = &self.catalog;
        let mut record = report::loop_record(
            ts,
            &l.verdicts,
            |f| catalog.name(f),
            &self.rules,
            l.target,
            structure,
        )?;
        // A pool's loop is named after its busiest process.
        if let Record::Loop { pid, .. } = &mut record {
            *pid = l.pid;
        }
        Some(record)
    }

    /// A stack's frames, innermost first, named. At a function's first
    /// instruction the kernel's frame-pointer walk skips the immediate
    /// caller (its return address is on top of the stack, not in the rbp
    /// chain): the busiest call site stands in for it.
    fn stack(&mut self, s: StackRef) -> Vec<String> {
        let mut ips = self.stacks.get(&s.stack_id).cloned().unwrap_or_default();
        if let Some(caller) = s.caller
            && ips.get(1) != Some(&caller)
        {
            ips.insert(1.min(ips.len()), caller);
        }
        ips.iter()
            .enumerate()
            .map(|(i, &ip)| self.name(s.pid, lookup_address(ip, i == 0)).describe(ip))
            .collect()
    }

    /// How a key is shown: as it is with `--show-keys`, hashed otherwise.
    fn key_label(&self, key: KeyRef) -> String {
        let text = if key.text {
            let mut text = self
                .key_texts
                .get(&key.hash)
                .cloned()
                .unwrap_or_else(|| format!("{:016x}", key.hash));
            if key.truncated() && !text.ends_with('…') {
                // Longer than the kernel hashes in full: its first bytes.
                text.push('…');
            }
            text
        } else {
            key.hash.to_string()
        };
        if self.show_keys {
            return text;
        }
        let mut hasher = SipHasher13::new_with_keys(self.seed.0, self.seed.1);
        hasher.write(text.as_bytes());
        format!("key#{:016x}", hasher.finish())
    }

    /// The summary with names.
    pub fn summary(&self, s: &analyze::Summary) -> Summary {
        Summary {
            seconds: s.seconds,
            functions: s.functions,
            processes: s.processes,
            busiest: s
                .busiest
                .iter()
                .map(|&(pid, func, calls, peak)| (pid, self.catalog.name(func), calls, peak))
                .collect(),
            loops: s
                .loops
                .iter()
                .map(|(pid, funcs)| (*pid, funcs.iter().map(|&f| self.catalog.name(f)).collect()))
                .collect(),
            silent: s.silent.iter().map(|&f| self.catalog.name(f)).collect(),
            dropped: s.dropped,
        }
    }
}

/// A fresh random seed for key hashes.
pub fn random_seed() -> (u64, u64) {
    use std::hash::BuildHasher as _;
    let state = std::collections::hash_map::RandomState::new();
    (state.hash_one(0x5eed_u64), state.hash_one(0xfeed_u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{KeyText, NewStack};

    fn enricher(show_keys: bool) -> Enricher {
        Enricher::replay(
            Arc::new(Catalog::default()),
            Rules::default(),
            show_keys,
            (1, 2),
        )
    }

    #[test]
    fn keys_are_hashed_with_the_run_s_seed_unless_shown() {
        let snap = Snapshot {
            key_texts: vec![KeyText {
                hash: 5,
                text: "page:catalog".into(),
            }],
            keys: vec![crate::snapshot::KeyCount {
                func: 0,
                pid: 1,
                hash: 5,
                calls: 9,
            }],
            ..Snapshot::default()
        };
        let key = KeyRef {
            text: true,
            hash: 5,
        };
        let mut shown = enricher(true);
        shown.observe(&snap);
        assert_eq!(shown.key_label(key), "page:catalog");
        let mut hidden = enricher(false);
        hidden.observe(&snap);
        let label = hidden.key_label(key);
        assert!(
            label.starts_with("key#") && !label.contains("catalog"),
            "{label}"
        );
        // The same seed, the same label: replay matches the live run.
        assert_eq!(label, hidden.key_label(key));
        let other = Enricher::replay(
            Arc::new(Catalog::default()),
            Rules::default(),
            false,
            (3, 4),
        );
        let mut other = other;
        other.observe(&snap);
        assert_ne!(label, other.key_label(key));
        assert_eq!(
            shown.key_label(KeyRef {
                text: false,
                hash: 77
            }),
            "77"
        );
    }

    #[test]
    fn recorded_frames_name_a_stack_with_its_caller_inserted() {
        let mut e = enricher(true);
        e.observe(&Snapshot {
            new_stacks: vec![NewStack {
                stack_id: 3,
                ips: vec![0x1000, 0x3005],
            }],
            ..Snapshot::default()
        });
        for (address, name) in [(0x1000, "inner"), (0x2004, "caller"), (0x3004, "main")] {
            e.add_fact(SymbolFact {
                pid: 9,
                address,
                frame: Frame {
                    function: Some(name.into()),
                    file: Some("cache".into()),
                },
            });
        }
        let frames = e.stack(StackRef {
            pid: 9,
            stack_id: 3,
            caller: Some(0x2005),
        });
        assert_eq!(frames, ["inner (cache)", "caller (cache)", "main (cache)"]);
    }
}
