//! The on-CPU sampler (discovery, see `discover.rs`): a perf-event program
//! on a CPU-clock tick on every CPU, counting the innermost user frames of
//! the watched processes. Kernel-facing; owned by [`crate::probes::Probes`]
//! (the program lives in the same eBPF object), driven by the controller.
//!
//! Nothing it does can touch a target: a perf event samples, it places no
//! breakpoint. Its links are file descriptors and go with cacheloop, however
//! it ends.

use std::collections::HashSet;

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData, PerCpuHashMap},
    programs::{
        PerfEvent,
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
    },
};
use profiler_common::{SAMPLE_PROGRAM, SAMPLED_MAP, SAMPLES_MAP, SampleKey};

use crate::probes::ProbeError;

pub struct Sampler {
    sampled: BpfHashMap<MapData, u32, u32>,
    samples: PerCpuHashMap<MapData, SampleKey, u64>,
    /// What `sampled` holds.
    processes: HashSet<u32>,
}

impl Sampler {
    /// Loads the sampling program and starts it on every online CPU at `hz`
    /// samples per second. Refused (CAP_PERFMON, perf_event_paranoid, a
    /// kernel without the CPU clock event), nothing is left running.
    pub fn start(ebpf: &mut Ebpf, hz: u64) -> Result<Self, ProbeError> {
        let sampled = crate::probes::take_map(ebpf, SAMPLED_MAP)?;
        let samples = crate::probes::take_map(ebpf, SAMPLES_MAP)?;
        let program: &mut PerfEvent = ebpf
            .program_mut(SAMPLE_PROGRAM)
            .ok_or(ProbeError::Missing {
                what: "program",
                name: SAMPLE_PROGRAM,
            })?
            .try_into()
            .map_err(ProbeError::Sampling)?;
        program.load().map_err(ProbeError::Sampling)?;
        let cpus = aya::util::online_cpus()
            .map_err(|(_, e)| ProbeError::Sampling(aya::programs::ProgramError::IOError(e)))?;
        for cpu in cpus {
            // The links stay with the program (and the object): they go
            // when cacheloop does.
            program
                .attach(
                    PerfEventConfig::Software(SoftwareEvent::CpuClock),
                    PerfEventScope::AllProcessesOneCpu { cpu },
                    SamplePolicy::Frequency(hz),
                    false,
                )
                .map_err(ProbeError::Sampling)?;
        }
        Ok(Self {
            sampled,
            samples,
            processes: HashSet::new(),
        })
    }

    /// Samples exactly these processes from now on.
    pub fn set_processes(&mut self, pids: &HashSet<u32>) {
        for &gone in self.processes.difference(pids) {
            // Already gone from the map (its entry was never made): fine.
            let _ = self.sampled.remove(&gone);
        }
        let mut now: HashSet<u32> = self.processes.intersection(pids).copied().collect();
        for &pid in pids.difference(&self.processes) {
            // Not kept when refused (the map full): tried again next time.
            match self.sampled.insert(&pid, &1, 0) {
                Ok(()) => {
                    now.insert(pid);
                }
                Err(e) => log::debug!("cannot sample pid {pid}: {e}"),
            }
        }
        self.processes = now;
    }

    /// The samples since the last call, by stack, and empties the map. A
    /// sample landing between the read of a stack and its removal is lost:
    /// samples pick functions, they count nothing.
    pub fn drain(&mut self, out: &mut Vec<(SampleKey, u64)>) {
        out.clear();
        let keys: Vec<SampleKey> = self.samples.keys().filter_map(Result::ok).collect();
        for key in keys {
            if let Ok(values) = self.samples.get(&key, 0) {
                out.push((key, values.iter().sum()));
            }
            let _ = self.samples.remove(&key);
        }
    }
}
