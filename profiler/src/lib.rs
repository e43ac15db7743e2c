//! cacheloop: catch cache invalidation loops in live processes.
//!
//! Data flows one way, and the modules say where each step runs:
//!
//! - kernel-facing: [`control`] (targets, attach/detach, probe windows; the
//!   only owner of links, through [`probes`], which hands a copy of each to
//!   the [`custody`] helper process, and, without `--func`, runs the
//!   on-CPU [`sampler`]) and [`collect`] (one raw
//!   [`snapshot`] per tick from the kernel's maps, read in batches, and
//!   `/proc`);
//! - pure, unit-tested without root: [`analyze`] ((catalog, snapshot,
//!   settings) -> events, with [`detect`], [`cycles`] and [`governor`]),
//!   [`catalog`], [`symbols`], [`discover`] (which functions to count when
//!   none is named), [`report`] (records and sinks), [`recording`]
//!   (the `--record` format), [`config`] and [`cli`], [`presets`];
//! - off the control path: [`enrich`] (names, key texts, [`symbolize`]d
//!   stacks) and the sinks, on threads run by [`pipeline`];
//! - glue: [`watch`], [`replay`], [`listing`]; [`plan`] and [`target`] read
//!   ELF files and `/proc` for the controller.
//!
//! controller -> collector -> snapshot -> analyzer -> enricher -> sinks;
//! `replay` feeds recorded snapshots to the same analyzer.

pub mod analyze;
mod batch;
pub mod catalog;
pub mod cli;
pub mod collect;
pub mod config;
pub mod control;
pub mod custody;
pub mod cycles;
pub mod detect;
pub mod discover;
pub mod enrich;
pub mod exporter;
pub mod gate;
pub mod governor;
pub mod heap;
pub mod hooks;
pub mod listing;
pub mod perf_uprobe;
pub mod pipeline;
pub mod plan;
pub mod presets;
pub mod privileges;
pub mod probes;
pub mod recording;
pub mod replay;
pub mod report;
pub mod sampler;
mod slot_counters;
pub mod snapshot;
pub mod symbolize;
pub mod symbols;
pub mod target;
pub mod usdt;
pub mod watch;
