//! cacheloop: catch cache invalidation loops in live processes.
//!
//! Pure modules (no system calls, unit-tested without root): [`symbols`],
//! [`detect`], [`report`], [`config`], [`cli`], [`presets`], [`cycles`], [`governor`]. Kernel-facing modules:
//! [`probes`] (loads and attaches, owns the links) and [`sampler`] (reads the
//! counters each interval). [`target`] reads `/proc`. [`watch`] and
//! [`listing`] are the glue of the two commands.
//!
//! Data flows one way: target -> symbols -> probes -> sampler -> detect ->
//! report.

pub mod cli;
pub mod config;
pub mod cycles;
pub mod detect;
pub mod governor;
pub mod listing;
pub mod presets;
pub mod probes;
pub mod report;
pub mod sampler;
pub mod symbolize;
pub mod symbols;
pub mod target;
pub mod watch;
