//! Recordings, as `cacheloop replay FILE` reads them.
//!
//! An input that starts with the recording magic is a whole file; any
//! other input is the item stream inside one (length-prefixed postcard
//! items), which is compressed and given the magic and version here, so
//! that mutations reach the items instead of breaking the DEFLATE stream.
//! The file (the reader takes a path, so it is written to a scratch file
//! first) is opened, read item by item, and replayed with the rules it
//! carries through the very analyzer, enricher and sinks (JSON and text,
//! into nothing) that `replay` uses. A damaged or hostile file may be
//! refused or replayed in part; it must never panic, and never make the
//! reader allocate far beyond the file's own size (libFuzzer's malloc
//! limit catches that).
//!
//! Seeds: `fuzz/corpus/recording` (the item streams of the committed
//! recordings, and damaged files), and the real recordings the unit tests
//! replay (`tests/recordings`), which `cargo xtask fuzz` adds.

#![no_main]

use std::{
    borrow::Cow,
    io::{self, Write as _},
    path::PathBuf,
    sync::OnceLock,
};

use flate2::{Compression, write::DeflateEncoder};
use libfuzzer_sys::fuzz_target;
use profiler::{
    pipeline::write_now,
    recording::{MAGIC, Reader, VERSION},
    replay::{Replayer, recorded_rules},
    report::{Sink, json::JsonSink, text::TextSink},
};

/// A few hundred snapshots is far more than any seed holds; bounds the
/// time one input can take.
const MAX_ITEMS: usize = 1000;

fuzz_target!(|data: &[u8]| {
    let path = scratch();
    let file = if data.starts_with(MAGIC) {
        Cow::Borrowed(data)
    } else {
        Cow::Owned(recording_of(data))
    };
    std::fs::write(path, &*file).expect("cannot write the scratch recording");
    let Ok(mut reader) = Reader::open(path) else {
        return;
    };
    let header = reader.header.clone();
    let rules = recorded_rules(&header);
    let mut replayer = Replayer::new(&rules, header.show_keys, &header);
    let mut json = JsonSink::new(io::sink());
    let mut text = TextSink::new(io::sink());
    for _ in 0..MAX_ITEMS {
        let Some(item) = reader.next_item() else {
            break;
        };
        let (records, _loop_found) = replayer.step(item);
        write_now(&mut json, &records).expect("io::sink never fails");
        write_now(&mut text, &records).expect("io::sink never fails");
    }
    let summary = replayer.summary();
    json.finish(&summary).expect("io::sink never fails");
    text.finish(&summary).expect("io::sink never fails");
    let _ = reader.ending();
});

/// This process's scratch file (libFuzzer may run several processes).
fn scratch() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        std::env::temp_dir().join(format!("cacheloop-fuzz-{}.rec", std::process::id()))
    })
}

/// A recording file holding `items`, as the writer frames them.
fn recording_of(items: &[u8]) -> Vec<u8> {
    let mut file = MAGIC.to_vec();
    file.extend_from_slice(&VERSION.to_le_bytes());
    let mut out = DeflateEncoder::new(file, Compression::fast());
    out.write_all(items).expect("writes to a Vec");
    out.finish().expect("writes to a Vec")
}
