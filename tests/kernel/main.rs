//! Kernel tests: the real `cacheloop` binary against real processes on the
//! running kernel. Needs root. Modules by topic; test names say
//! `<action>_<condition>_<result>`.
//!
//! No wall-clock assertions: this runs on shared, noisy machines. Latency is
//! asserted in intervals (what the detector controls) and only printed in
//! seconds.

mod bad_input;
mod caches;
mod counting;
mod deploys;
mod detection;
mod discovery;
mod exporter;
mod gate;
mod hooks;
mod kernels;
mod lifecycle;
mod overhead;
mod privileges;
mod recording;
mod runtimes;
mod targeting;
