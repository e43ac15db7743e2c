//! The recording format (`watch --record FILE`, read by `replay`).
//!
//! A recording is the catalog plus every raw snapshot, and what the
//! enricher learned that a replay cannot learn again (named frames), and the
//! controller's lifecycle records (attached, governor, warnings): enough to
//! run the same analyzer offline and print the same records.
//!
//! Layout: 8 magic bytes `CLOOPREC`, a little-endian `u16` format version,
//! then one raw DEFLATE stream (flate2, pure Rust) holding items, each a
//! little-endian `u32` length and a postcard-encoded [`Item`]. Why these:
//! - postcard is a compact serde format (varints): a snapshot of 100
//!   functions is a few hundred bytes before compression;
//! - DEFLATE with a *sync flush* at each durable point keeps its window
//!   across flushes (small periodic flushes still compress well), and a
//!   reader can decode everything up to the last flush of a file whose
//!   writer was killed; no C library to build for the static binary.
//! - Snapshots are delta-encoded: each table keeps only the entries that
//!   changed since the previous snapshot, and the keys that disappeared.
//!
//! The writer flushes and `fdatasync`s at most every
//! [`DURABLE_EVERY`]: a crash loses at most that much. postcard is not
//! self-describing, so any change to an item's shape bumps [`VERSION`];
//! a reader refuses versions it does not know, with a message.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{self, BufReader, BufWriter, Read, Write},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use flate2::{Compression, read::DeflateDecoder, write::DeflateEncoder};
use serde::{Deserialize, Serialize};

use crate::{
    catalog::{Catalog, Picked},
    enrich::SymbolFact,
    report::Record,
    snapshot::{
        CallSite, Count, KeyCount, KeyEdgeCount, KeyText, NewStack, ProcessFacts, Snapshot,
        StackCount,
    },
};

pub const MAGIC: &[u8; 8] = b"CLOOPREC";
/// The format this build writes and reads.
pub const VERSION: u16 = 4;
/// The oldest format this build reads: 4 only added an item.
pub const OLDEST: u16 = 3;
/// A crash loses at most this much of a recording.
pub const DURABLE_EVERY: Duration = Duration::from_secs(2);
/// No item is larger than this; a larger length means a damaged file.
const MAX_ITEM: u32 = 256 << 20;

/// Errors reading a recording: all about the file the user named (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    #[error("cannot open the recording {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a cacheloop recording (make one with 'cacheloop watch ... --record FILE')", path.display())]
    NotARecording { path: PathBuf },
    #[error("{} is a cacheloop recording cut short before its first snapshot: nothing to replay", path.display())]
    CutShort { path: PathBuf },
    #[error(
        "{} is a recording of format {found}, newer than this cacheloop reads ({VERSION}); replay it with a newer cacheloop",
        path.display()
    )]
    FutureVersion { path: PathBuf, found: u16 },
    #[error(
        "{} is a recording of format {found}, older than this cacheloop reads ({VERSION}); replay it with the cacheloop that made it",
        path.display()
    )]
    OldVersion { path: PathBuf, found: u16 },
    #[error("cannot create the recording {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The detector rules a recording was made with.
pub type RecordedRules = crate::detect::Rules;

/// What a recording starts with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// The cacheloop version that wrote it.
    pub cacheloop: String,
    pub kernel: String,
    pub mode: String,
    /// Unix time the run began.
    pub started: f64,
    pub interval_seconds: f64,
    /// How often the counters were read (a fraction of the interval).
    pub read_seconds: f64,
    pub max_overhead_percent: f64,
    pub rules: RecordedRules,
    /// The run's key-hash seed, so replayed key labels match the live ones.
    pub seed: (u64, u64),
    /// The run showed keys as they are (`--show-keys`).
    pub show_keys: bool,
    /// The command line of the run.
    pub command: Vec<String>,
}

/// Entries of one counter table that changed, and keys that went away.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Table<K, V> {
    pub changed: Vec<(K, V)>,
    pub removed: Vec<K>,
}

/// A snapshot as stored: its tables delta-encoded.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StoredSnapshot {
    pub catalog: u32,
    pub ts: f64,
    pub seconds: f64,
    pub elapsed: f64,
    pub probed: f64,
    pub counts: Table<(u32, u32), u64>,
    pub call_sites: Table<(u32, u32, u64), (Option<u32>, u64)>,
    pub keys: Table<(u32, u32, u64), u64>,
    pub key_edges: Table<(u32, u32, u64, u64), u64>,
    pub stacks: Table<(u32, u32, u32), u64>,
    pub new_stacks: Vec<NewStack>,
    pub key_texts: Vec<KeyText>,
    pub dropped: u64,
    pub counts_capacity: u32,
    pub counts_entries: u32,
    pub processes: Vec<ProcessFacts>,
    pub report: bool,
}

/// One item of a recording.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Item {
    Header(Header),
    Catalog(Catalog),
    Snapshot(StoredSnapshot),
    Symbols(Vec<SymbolFact>),
    /// A record of the controller's (attached, governor, warning,
    /// detached), as its JSON line.
    Lifecycle(String),
    /// The recorder fell behind and dropped this many snapshots here.
    Gap(u64),
    /// The run ended and the recording is whole.
    End,
    /// A catalog with functions cacheloop picked (no `--func`): which, and
    /// how (format 4; a catalog without picks is still `Catalog`).
    PickedCatalog(Catalog, Vec<(u32, Picked)>),
}

impl Item {
    pub fn lifecycle(record: &Record) -> Self {
        Self::Lifecycle(serde_json::to_string(record).unwrap_or_default())
    }

    /// A catalog as stored: its picks beside it, if it has any.
    pub fn catalog(catalog: &Catalog) -> Self {
        let picked: Vec<(u32, Picked)> = catalog
            .functions
            .iter()
            .enumerate()
            .filter_map(|(id, f)| Some((id as u32, f.picked?)))
            .collect();
        if picked.is_empty() {
            Self::Catalog(catalog.clone())
        } else {
            Self::PickedCatalog(catalog.clone(), picked)
        }
    }
}

/// Keeps the last stored state of one table.
#[derive(Debug)]
struct Delta<K, V> {
    last: BTreeMap<K, V>,
}

impl<K, V> Default for Delta<K, V> {
    fn default() -> Self {
        Self {
            last: BTreeMap::new(),
        }
    }
}

impl<K: Ord + Copy, V: PartialEq + Copy> Delta<K, V> {
    fn encode(&mut self, now: impl Iterator<Item = (K, V)>) -> Table<K, V> {
        let now: BTreeMap<K, V> = now.collect();
        let changed = now
            .iter()
            .filter(|(k, v)| self.last.get(k) != Some(v))
            .map(|(&k, &v)| (k, v))
            .collect();
        let removed = self
            .last
            .keys()
            .filter(|k| !now.contains_key(k))
            .copied()
            .collect();
        self.last = now;
        Table { changed, removed }
    }

    fn decode(&mut self, table: &Table<K, V>) -> impl Iterator<Item = (&K, &V)> {
        for k in &table.removed {
            self.last.remove(k);
        }
        for &(k, v) in &table.changed {
            self.last.insert(k, v);
        }
        self.last.iter()
    }
}

/// Turns snapshots into stored ones and back; writer and reader each keep
/// one, fed the same sequence.
#[derive(Debug, Default)]
pub struct Codec {
    counts: Delta<(u32, u32), u64>,
    call_sites: Delta<(u32, u32, u64), (Option<u32>, u64)>,
    keys: Delta<(u32, u32, u64), u64>,
    key_edges: Delta<(u32, u32, u64, u64), u64>,
    stacks: Delta<(u32, u32, u32), u64>,
}

impl Codec {
    pub fn encode(&mut self, s: &Snapshot) -> StoredSnapshot {
        StoredSnapshot {
            catalog: s.catalog,
            ts: s.ts,
            seconds: s.seconds,
            elapsed: s.elapsed,
            probed: s.probed,
            counts: self
                .counts
                .encode(s.counts.iter().map(|c| ((c.func, c.pid), c.calls))),
            call_sites: self.call_sites.encode(
                s.call_sites
                    .iter()
                    .map(|c| ((c.func, c.pid, c.return_address), (c.caller, c.calls))),
            ),
            keys: self
                .keys
                .encode(s.keys.iter().map(|k| ((k.func, k.pid, k.hash), k.calls))),
            key_edges: self.key_edges.encode(
                s.key_edges
                    .iter()
                    .map(|e| ((e.func, e.pid, e.from, e.to), e.calls)),
            ),
            stacks: self.stacks.encode(
                s.stacks
                    .iter()
                    .map(|k| ((k.func, k.pid, k.stack_id), k.samples)),
            ),
            new_stacks: s.new_stacks.clone(),
            key_texts: s.key_texts.clone(),
            dropped: s.dropped,
            counts_capacity: s.counts_capacity,
            counts_entries: s.counts_entries,
            processes: s.processes.clone(),
            report: s.report,
        }
    }

    pub fn decode(&mut self, s: StoredSnapshot) -> Snapshot {
        Snapshot {
            catalog: s.catalog,
            ts: s.ts,
            seconds: s.seconds,
            elapsed: s.elapsed,
            probed: s.probed,
            // Never recorded: readings are not let go while recording.
            fresh: None,
            counts: self
                .counts
                .decode(&s.counts)
                .map(|(&(func, pid), &calls)| Count { func, pid, calls })
                .collect(),
            call_sites: self
                .call_sites
                .decode(&s.call_sites)
                .map(
                    |(&(func, pid, return_address), &(caller, calls))| CallSite {
                        func,
                        pid,
                        return_address,
                        caller,
                        calls,
                    },
                )
                .collect(),
            keys: self
                .keys
                .decode(&s.keys)
                .map(|(&(func, pid, hash), &calls)| KeyCount {
                    func,
                    pid,
                    hash,
                    calls,
                })
                .collect(),
            key_edges: self
                .key_edges
                .decode(&s.key_edges)
                .map(|(&(func, pid, from, to), &calls)| KeyEdgeCount {
                    func,
                    pid,
                    from,
                    to,
                    calls,
                })
                .collect(),
            stacks: self
                .stacks
                .decode(&s.stacks)
                .map(|(&(func, pid, stack_id), &samples)| StackCount {
                    func,
                    pid,
                    stack_id,
                    samples,
                })
                .collect(),
            new_stacks: s.new_stacks,
            key_texts: s.key_texts,
            dropped: s.dropped,
            counts_capacity: s.counts_capacity,
            counts_entries: s.counts_entries,
            processes: s.processes,
            report: s.report,
        }
    }
}

/// Writes a recording.
///
/// It is written under a temporary name beside `path`, readable by its
/// owner only (it holds keys in clear), and takes `path`'s name at
/// [`Writer::commit`]: a run refused at start (no privileges, a wrong pid)
/// never overwrites an earlier recording.
pub struct Writer {
    out: DeflateEncoder<BufWriter<File>>,
    codec: Codec,
    durable_at: Instant,
    scratch: Vec<u8>,
    path: PathBuf,
    temp: Pending,
}

/// The temporary name of a recording not committed yet.
struct Pending(Option<PathBuf>);

impl Drop for Pending {
    /// A recording that never started (the run was refused) leaves nothing.
    fn drop(&mut self) {
        if let Some(temp) = self.0.take() {
            let _ = std::fs::remove_file(temp);
        }
    }
}

impl Writer {
    /// Creates the file under its temporary name and writes the magic and
    /// version.
    pub fn create(path: &Path) -> Result<Self, RecordingError> {
        let name = path
            .file_name()
            .map_or_else(|| "recording".into(), |n| n.to_string_lossy().into_owned());
        let temp = path.with_file_name(format!(".{name}.{}.partial", std::process::id()));
        let create = || -> io::Result<Self> {
            use std::os::unix::fs::OpenOptionsExt as _;
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temp)?;
            let mut file = BufWriter::new(file);
            file.write_all(MAGIC)?;
            file.write_all(&VERSION.to_le_bytes())?;
            Ok(Self {
                out: DeflateEncoder::new(file, Compression::default()),
                codec: Codec::default(),
                durable_at: Instant::now(),
                scratch: Vec::new(),
                path: path.to_owned(),
                temp: Pending(Some(temp.clone())),
            })
        };
        create().map_err(|source| RecordingError::Create {
            path: path.to_owned(),
            source,
        })
    }

    /// Gives the file its name (replacing any file of that name) and makes
    /// the name durable. Call once the run has started.
    pub fn commit(&mut self) -> io::Result<()> {
        let Some(temp) = self.temp.0.take() else {
            return Ok(());
        };
        std::fs::rename(&temp, &self.path)?;
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        File::open(dir)?.sync_all()
    }

    pub fn snapshot(&mut self, snapshot: &Snapshot) -> io::Result<()> {
        let stored = self.codec.encode(snapshot);
        self.item(&Item::Snapshot(stored))
    }

    /// Appends one item; makes the file durable when it is time.
    pub fn item(&mut self, item: &Item) -> io::Result<()> {
        self.scratch.clear();
        let bytes = postcard::to_extend(item, std::mem::take(&mut self.scratch))
            .map_err(io::Error::other)?;
        self.out.write_all(&(bytes.len() as u32).to_le_bytes())?;
        self.out.write_all(&bytes)?;
        self.scratch = bytes;
        if self.durable_at.elapsed() >= DURABLE_EVERY {
            self.durable()?;
        }
        Ok(())
    }

    /// Sync-flushes the compressor and `fdatasync`s the file: everything
    /// written so far survives a crash.
    pub fn durable(&mut self) -> io::Result<()> {
        self.out.flush()?;
        self.out.get_ref().get_ref().sync_data()?;
        self.durable_at = Instant::now();
        Ok(())
    }

    /// Writes the closing item and finishes the stream.
    pub fn finish(mut self) -> io::Result<()> {
        self.commit()?;
        self.item(&Item::End)?;
        let file = self.out.finish()?;
        let file = file.into_inner().map_err(|e| e.into_error())?;
        file.sync_data()
    }
}

/// How a recording ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Its closing item: the run ended and the recorder closed it.
    Whole,
    /// It stops mid-item or without its closing item: the recorder was
    /// killed (or the file cut).
    Truncated,
}

/// Reads a recording, item by item; snapshots come out whole.
pub struct Reader {
    input: DeflateDecoder<BufReader<File>>,
    codec: Codec,
    catalogs: BTreeMap<u32, Arc<Catalog>>,
    pub header: Header,
    ending: Option<Ending>,
}

/// An item as the replay uses it.
#[derive(Clone, Debug, PartialEq)]
pub enum Replayed {
    Catalog(Arc<Catalog>),
    Snapshot(Arc<Catalog>, Snapshot),
    Symbols(Vec<SymbolFact>),
    Lifecycle(Record),
    Gap(u64),
}

impl Reader {
    pub fn open(path: &Path) -> Result<Self, RecordingError> {
        let open_err = |source| RecordingError::Open {
            path: path.to_owned(),
            source,
        };
        let not = || RecordingError::NotARecording {
            path: path.to_owned(),
        };
        let mut file = BufReader::new(File::open(path).map_err(open_err)?);
        let mut head = [0u8; 10];
        file.read_exact(&mut head).map_err(|_| not())?;
        if &head[..8] != MAGIC {
            return Err(not());
        }
        let version = u16::from_le_bytes([head[8], head[9]]);
        if version > VERSION {
            return Err(RecordingError::FutureVersion {
                path: path.to_owned(),
                found: version,
            });
        }
        if version < OLDEST {
            return Err(RecordingError::OldVersion {
                path: path.to_owned(),
                found: version,
            });
        }
        let mut input = DeflateDecoder::new(file);
        let header = match read_item(&mut input) {
            Some(Item::Header(h)) => h,
            Some(_) => return Err(not()),
            None => {
                return Err(RecordingError::CutShort {
                    path: path.to_owned(),
                });
            }
        };
        Ok(Self {
            input,
            codec: Codec::default(),
            catalogs: BTreeMap::new(),
            header,
            ending: None,
        })
    }

    /// `None` once the items are over; then [`Reader::ending`] says how.
    pub fn next_item(&mut self) -> Option<Replayed> {
        loop {
            let item = self.raw_item()?;
            return Some(match item {
                Item::Header(_) => continue,
                Item::Catalog(c) => {
                    let c = Arc::new(c);
                    self.catalogs.insert(c.version, c.clone());
                    Replayed::Catalog(c)
                }
                Item::PickedCatalog(mut c, picked) => {
                    for (id, how) in picked {
                        if let Some(f) = c.functions.get_mut(id as usize) {
                            f.picked = Some(how);
                        }
                    }
                    let c = Arc::new(c);
                    self.catalogs.insert(c.version, c.clone());
                    Replayed::Catalog(c)
                }
                Item::Snapshot(s) => {
                    let snap = self.codec.decode(s);
                    let catalog = self
                        .catalogs
                        .range(..=snap.catalog)
                        .next_back()
                        .map(|(_, c)| c.clone())
                        .unwrap_or_default();
                    Replayed::Snapshot(catalog, snap)
                }
                Item::Symbols(s) => Replayed::Symbols(s),
                Item::Lifecycle(json) => match serde_json::from_str(&json) {
                    Ok(record) => Replayed::Lifecycle(record),
                    Err(_) => continue,
                },
                Item::Gap(n) => Replayed::Gap(n),
                Item::End => {
                    self.ending = Some(Ending::Whole);
                    return None;
                }
            });
        }
    }

    /// How the items ended (after [`Reader::next_item`] returned `None`).
    pub fn ending(&self) -> Ending {
        self.ending.unwrap_or(Ending::Truncated)
    }

    fn raw_item(&mut self) -> Option<Item> {
        if self.ending.is_some() {
            return None;
        }
        let item = read_item(&mut self.input);
        if item.is_none() {
            self.ending = Some(Ending::Truncated);
        }
        item
    }
}

/// The next whole item, or `None` at the end of what can be read (a clean
/// end, a cut, or damage).
fn read_item(input: &mut impl Read) -> Option<Item> {
    let mut len = [0u8; 4];
    input.read_exact(&mut len).ok()?;
    let len = u32::from_le_bytes(len);
    if len > MAX_ITEM {
        return None;
    }
    // Grow with what the stream holds, not with what the prefix claims: a
    // damaged length must not cost an allocation of up to MAX_ITEM.
    let mut bytes = Vec::new();
    input.take(u64::from(len)).read_to_end(&mut bytes).ok()?;
    if bytes.len() != len as usize {
        return None;
    }
    postcard::from_bytes(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::FileId;

    fn header() -> Header {
        Header {
            cacheloop: "0.1.0".into(),
            kernel: "6.18".into(),
            mode: "uprobe_multi".into(),
            started: 1.0,
            interval_seconds: 1.0,
            read_seconds: 1.0,
            max_overhead_percent: 10.0,
            rules: RecordedRules::default(),
            seed: (1, 2),
            show_keys: false,
            command: vec!["cacheloop".into()],
        }
    }

    fn snapshot(tick: u64, functions: u32) -> Snapshot {
        Snapshot {
            catalog: 1,
            ts: 1000.0 + tick as f64,
            seconds: 1.0,
            elapsed: tick as f64,
            probed: 1.0,
            counts: (0..functions)
                .map(|func| Count {
                    func,
                    pid: 4242,
                    calls: tick * 200 + u64::from(func),
                })
                .collect(),
            call_sites: (0..functions)
                .map(|func| CallSite {
                    func,
                    pid: 4242,
                    return_address: 0x5555_0000_1000 + u64::from(func) * 64,
                    caller: None,
                    calls: tick * 200,
                })
                .collect(),
            processes: vec![ProcessFacts {
                pid: 4242,
                ns_pid: None,
                start_time: 5,
                exe: FileId { dev: 1, ino: 2 },
                cpu_nanos: Some(tick * 10_000_000),
                rss_bytes: 1 << 24,
                alive: true,
                comm: "cache".into(),
                hot_thread_nanos: None,
            }],
            counts_capacity: 1024,
            ..Snapshot::default()
        }
    }

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("cacheloop-rec-{}-{name}", std::process::id()))
    }

    fn write(path: &Path, snapshots: &[Snapshot], finish: bool) {
        let mut w = Writer::create(path).unwrap();
        w.commit().unwrap();
        w.item(&Item::Header(header())).unwrap();
        w.durable().unwrap();
        w.item(&Item::Catalog(Catalog {
            version: 1,
            functions: vec![],
        }))
        .unwrap();
        for s in snapshots {
            w.snapshot(s).unwrap();
        }
        if finish {
            w.finish().unwrap();
        } else {
            w.durable().unwrap();
        }
    }

    fn read_all(path: &Path) -> (Vec<Snapshot>, Ending) {
        let mut r = Reader::open(path).unwrap();
        assert_eq!(r.header, header());
        let mut got = Vec::new();
        while let Some(item) = r.next_item() {
            if let Replayed::Snapshot(_, s) = item {
                got.push(s);
            }
        }
        (got, r.ending())
    }

    /// What the codec gives back is sorted by key.
    fn sorted(mut s: Snapshot) -> Snapshot {
        s.counts.sort_by_key(|c| (c.func, c.pid));
        s.call_sites
            .sort_by_key(|c| (c.func, c.pid, c.return_address));
        s
    }

    #[test]
    fn picked_functions_come_back_with_their_catalog() {
        let path = temp("picked");
        let function = |name: &str, picked| crate::catalog::Function {
            name: name.into(),
            paths: vec!["/srv/cache".into()].into(),
            file_id: FileId { dev: 1, ino: 2 },
            offsets: vec![0x1000].into(),
            ranges: Default::default(),
            key: None,
            request: false,
            picked,
        };
        let catalog = Catalog {
            version: 1,
            functions: vec![
                function("cache_invalidate", Some(Picked::Name)),
                function("handle_request", None),
                function("rebuild", Some(Picked::Hot)),
            ],
        };
        let mut w = Writer::create(&path).unwrap();
        w.commit().unwrap();
        w.item(&Item::Header(header())).unwrap();
        w.item(&Item::catalog(&catalog)).unwrap();
        w.finish().unwrap();
        let mut r = Reader::open(&path).unwrap();
        let Some(Replayed::Catalog(back)) = r.next_item() else {
            panic!("no catalog")
        };
        assert_eq!(*back, catalog);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn snapshots_come_back_exactly() {
        let path = temp("exact");
        let snaps: Vec<Snapshot> = (1..=20).map(|t| snapshot(t, 5)).collect();
        write(&path, &snaps, true);
        let (got, ending) = read_all(&path);
        assert_eq!(ending, Ending::Whole);
        let want: Vec<Snapshot> = snaps.into_iter().map(sorted).collect();
        assert_eq!(got, want);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn removed_entries_stay_removed() {
        let mut codec = Codec::default();
        let mut reader = Codec::default();
        let a = snapshot(1, 3);
        let mut b = snapshot(2, 3);
        b.counts.remove(1);
        let _ = reader.decode(codec.encode(&a));
        let back = reader.decode(codec.encode(&b));
        assert_eq!(back.counts.len(), 2);
        assert!(!back.counts.iter().any(|c| c.func == 1));
    }

    #[test]
    fn a_cut_file_replays_up_to_its_last_whole_snapshot() {
        let path = temp("cut");
        let snaps: Vec<Snapshot> = (1..=30).map(|t| snapshot(t, 5)).collect();
        write(&path, &snaps, true);
        let bytes = std::fs::read(&path).unwrap();
        for cut in [bytes.len() - 3, bytes.len() / 2] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let (got, ending) = read_all(&path);
            assert_eq!(ending, Ending::Truncated, "cut at {cut}");
            assert!(got.len() <= 30);
            for (g, s) in got.iter().zip(&snaps) {
                assert_eq!(g, &sorted(s.clone()));
            }
        }
        // Cut inside its header: a recording, but nothing to replay.
        std::fs::write(&path, &bytes[..12]).unwrap();
        let err = Reader::open(&path).err().unwrap();
        assert!(matches!(err, RecordingError::CutShort { .. }), "{err}");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn an_unfinished_file_has_what_was_made_durable() {
        let path = temp("unfinished");
        let snaps: Vec<Snapshot> = (1..=10).map(|t| snapshot(t, 5)).collect();
        write(&path, &snaps, false);
        let (got, ending) = read_all(&path);
        assert_eq!(ending, Ending::Truncated);
        assert_eq!(got.len(), 10);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn other_files_and_future_versions_are_refused() {
        let path = temp("bad");
        std::fs::write(&path, b"hello, this is not it").unwrap();
        let err = Reader::open(&path).err().unwrap();
        assert!(matches!(err, RecordingError::NotARecording { .. }), "{err}");
        assert!(err.to_string().contains("not a cacheloop recording"));
        let mut future = MAGIC.to_vec();
        future.extend((VERSION + 1).to_le_bytes());
        std::fs::write(&path, &future).unwrap();
        let err = Reader::open(&path).err().unwrap();
        assert!(
            err.to_string().contains("newer than this cacheloop"),
            "{err}"
        );
        std::fs::write(&path, b"").unwrap();
        assert!(matches!(
            Reader::open(&path),
            Err(RecordingError::NotARecording { .. })
        ));
        let err = Reader::open(Path::new("/nonexistent/x.rec")).err().unwrap();
        assert!(err.to_string().contains("/nonexistent/x.rec"), "{err}");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn an_hour_of_100_functions_stays_small() {
        // Busy counters change every tick; call sites too.
        let path = temp("size");
        let mut w = Writer::create(&path).unwrap();
        w.item(&Item::Header(header())).unwrap();
        let ticks = 600u64;
        for t in 1..=ticks {
            w.snapshot(&snapshot(t, 100)).unwrap();
        }
        w.finish().unwrap();
        let size = std::fs::metadata(&path).unwrap().len();
        let per_hour = size * 3600 / ticks;
        // The bound: an hour of 100 functions at 1 s under 50 MB.
        assert!(per_hour < 50_000_000, "{per_hour} bytes per hour");
        eprintln!(
            "{} bytes per function per interval (100 functions, counts and call sites)",
            size as f64 / (ticks as f64 * 100.0)
        );
        let _ = std::fs::remove_file(&path);
    }
}
