//! The planner: decides what to attach where. Reads each file's symbols once
//! (by device and inode), picks the functions the patterns name, and files
//! them in the catalog: one id per (file, function name), shared by the
//! function's compiler clones and by every process running that file.
//!
//! Reads ELF files; attaches nothing (the controller does).

use std::{
    collections::{HashMap, hash_map::Entry},
    path::PathBuf,
    sync::Arc,
};

use crate::{
    catalog::{Catalog, FileId, Function, KeySpec, Picked, Range},
    cli::KeyArg,
    cli::KeyKind,
    config::WatchConfig,
    presets,
    probes::AttachRequest,
    symbols::{Pattern, Symbol, SymbolError, SymbolTable, check_matches},
    target::{OpenFile, Process, Stamp},
};

/// A file to read and attach to, and the process scope of its link.
pub struct FileTarget {
    pub open: PathBuf,
    pub shown: PathBuf,
    pub root: PathBuf,
    pub pid: Option<u32>,
}

impl FileTarget {
    /// The files of a process: its executable and libraries, attached for
    /// that process only.
    pub fn of_process(process: &Process) -> Vec<Self> {
        process
            .mapped_files()
            .into_iter()
            .map(|f| Self {
                open: f.open,
                shown: f.name,
                root: process.root.clone(),
                pid: Some(process.pid),
            })
            .collect()
    }
}

#[derive(Default)]
pub struct Planner {
    patterns: Vec<Pattern>,
    request_patterns: Vec<Pattern>,
    key_arg: Option<KeyArg>,
    preset_keys: Vec<(&'static str, presets::KeySpec)>,
    /// Each file read, held open while anything is attached to it (the
    /// requests share the `Arc`), with its symbols.
    tables: HashMap<FileId, (Arc<OpenFile>, SymbolTable)>,
    /// Each file's size and times when last read.
    stamps: HashMap<FileId, Stamp>,
    ids: Ids,
    /// Each file's paths (as its functions list them): one list per file.
    file_paths: HashMap<FileId, Arc<[PathBuf]>>,
    /// The catalog, changed in place until it is published
    /// ([`Planner::catalog`]) and copied on the first change after: one
    /// copy per version, none while nothing holds the last one (10,000
    /// functions are about 2 MiB).
    published: Arc<Catalog>,
    changed: bool,
    /// No `--func`: the functions are picked (`discover.rs`), per
    /// executable: by name when it is first planned, by heat later.
    discover: bool,
    picked: HashMap<FileId, HashMap<String, Picked>>,
    /// Picks made since the controller last took them, to report.
    new_picks: Vec<crate::discover::Pick>,
    /// The `py:`, `rb:`, `php:` patterns.
    runtime_patterns: Vec<crate::usdt::RuntimePattern>,
    /// Each read file's USDT probes.
    usdt_probes: HashMap<FileId, Vec<crate::usdt::Probe>>,
}

/// The functions of `catalog` to change: its own, or a copy of them when
/// a published version still holds them.
fn functions_mut(catalog: &mut Arc<Catalog>) -> &mut Vec<Function> {
    &mut Arc::make_mut(catalog).functions
}

impl Planner {
    pub fn new(config: &WatchConfig) -> Self {
        Self {
            patterns: config.patterns.clone(),
            request_patterns: config.request_patterns.clone(),
            key_arg: config.key_arg,
            preset_keys: config.preset_keys.clone(),
            discover: config.discover,
            runtime_patterns: config.runtime_patterns.clone(),
            ..Self::default()
        }
    }

    /// The function id of an interpreted function (`py:cache.invalidate`),
    /// made on first sight. Interpreted functions have no file offsets:
    /// their calls are told apart by name at the runtime's USDT probe.
    pub fn interpreted(&mut self, name: &str) -> u32 {
        let file_id = FileId::default();
        if let Some(id) = self.ids.get(&self.published.functions, file_id, name) {
            return id;
        }
        let id = self.published.functions.len() as u32;
        functions_mut(&mut self.published).push(Function {
            name: name.into(),
            paths: Arc::new([]),
            file_id,
            offsets: Default::default(),
            ranges: Default::default(),
            key: None,
            request: false,
            picked: None,
        });
        self.ids.insert(&self.published.functions, id);
        self.changed = true;
        id
    }

    /// The pattern an interpreted function of `runtime` called `display`
    /// matches, if any: its name then reads `prefix:display`.
    pub fn wanted_interpreted(&self, runtime: crate::usdt::Runtime, display: &str) -> bool {
        self.runtime_patterns
            .iter()
            .any(|p| p.runtime == runtime && p.glob.matches(display))
    }

    /// The USDT attach requests of a process's files (`py:`, `rb:`, `php:`
    /// patterns): for each runtime named, the first file (the executable,
    /// then the libraries) with its call probe. With `strict`, a runtime
    /// not found is an error naming what it needs.
    fn usdt_requests(
        &mut self,
        files: &[FileTarget],
        strict: bool,
    ) -> anyhow::Result<Vec<AttachRequest>> {
        use crate::usdt::{Runtime, call_sites};
        let mut runtimes: Vec<(Runtime, String)> = Vec::new();
        for p in &self.runtime_patterns {
            if !runtimes.iter().any(|(r, _)| *r == p.runtime) {
                runtimes.push((p.runtime, p.text.clone()));
            }
        }
        let Some(pid) = files.first().and_then(|f| f.pid) else {
            return Ok(Vec::new());
        };
        let mut requests = Vec::new();
        for (runtime, pattern) in runtimes {
            let mut found = None;
            for file in files {
                let id = match self.load(file) {
                    Ok(id) => id,
                    Err(e) => {
                        log::debug!("no USDT probes read from {}: {e}", file.shown.display());
                        continue;
                    }
                };
                let probes = match self.usdt_probes.entry(id) {
                    Entry::Occupied(e) => e.into_mut(),
                    Entry::Vacant(e) => {
                        let data = std::fs::read(self.tables[&id].0.fd_path()).unwrap_or_default();
                        e.insert(crate::usdt::probes(&data))
                    }
                };
                let sites: Vec<crate::probes::UsdtSite> = call_sites(probes, runtime)
                    .into_iter()
                    .filter_map(|p| {
                        Some(crate::probes::UsdtSite {
                            offset: p.offset,
                            semaphore: p.semaphore.unwrap_or(0),
                            spec: p.spec(runtime)?,
                        })
                    })
                    .collect();
                log::debug!(
                    "{}: {} USDT probe(s), {} {} call site(s)",
                    file.shown.display(),
                    probes.len(),
                    sites.len(),
                    runtime.label()
                );
                if !sites.is_empty() {
                    found = Some((file, id, sites));
                    break;
                }
            }
            let Some((file, id, sites)) = found else {
                if strict {
                    return Err(SymbolError::NoRuntime {
                        pattern,
                        pid,
                        runtime: runtime.label(),
                        needs: runtime.needs(),
                    }
                    .into());
                }
                continue;
            };
            if runtime == Runtime::Python
                && let Some((major, minor)) = crate::usdt::silent_python(&file.shown)
            {
                anyhow::bail!(
                    "--func '{pattern}': pid {pid} runs CPython {major}.{minor}, whose python:function__entry probe never fires (CPython issue 98894: since 3.11 the interpreter reaches it only while a trace function is set), so its calls cannot be counted; run the cache under CPython 3.10 or a build with the fix, or watch the interpreter's C functions with --func"
                );
            }
            if runtime == Runtime::Php {
                let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
                if !crate::usdt::php_probes_on(&environ) {
                    anyhow::bail!(
                        "--func '{pattern}': PHP fires its USDT probes only when started with USE_ZEND_DTRACE=1 in its environment, and pid {pid} was not; restart it with USE_ZEND_DTRACE=1"
                    );
                }
            }
            requests.push(AttachRequest {
                file: self.tables[&id].0.clone(),
                shown: file.shown.clone(),
                pid: Some(pid),
                points: Vec::new(),
                usdt: sites,
            });
        }
        Ok(requests)
    }

    /// A planner for a runtime's functions only (`symbols --runtime`).
    pub fn runtimes_only(runtime_patterns: Vec<crate::usdt::RuntimePattern>) -> Self {
        Self {
            runtime_patterns,
            ..Self::default()
        }
    }

    /// Functions are picked, not named (no `--func`).
    pub fn discovers(&self) -> bool {
        self.discover
    }

    /// The picks made since the last call (to report).
    pub fn take_picks(&mut self) -> Vec<crate::discover::Pick> {
        std::mem::take(&mut self.new_picks)
    }

    /// A read file's symbols, if it is held.
    pub fn symbols(&self, file: FileId) -> Option<&[Symbol]> {
        self.tables.get(&file).map(|(_, t)| t.symbols.as_slice())
    }

    /// Functions of `file` picked for their heat: planned from now on
    /// wherever it runs. Returns those not picked before (by name, in a
    /// replan of the same tick), the only ones to attach.
    pub fn pick_hot(&mut self, file: FileId, names: &[String]) -> Vec<String> {
        let picked = self.picked.entry(file).or_default();
        names
            .iter()
            .filter(|name| {
                let new = !picked.contains_key(*name);
                if new {
                    picked.insert((*name).clone(), Picked::Hot);
                }
                new
            })
            .cloned()
            .collect()
    }

    /// Picks by name in an executable planned for the first time.
    fn pick_named(&mut self, exe: FileId) {
        if !self.discover || self.picked.contains_key(&exe) {
            return;
        }
        let table = &self.tables[&exe].1;
        let (named, left_out) = crate::discover::named(&table.symbols);
        let picked = self.picked.entry(exe).or_default();
        for (symbol, word) in named {
            picked.insert(symbol.name.to_string(), Picked::Name);
            self.new_picks.push(crate::discover::Pick {
                file: exe,
                name: symbol.name.to_string(),
                why: crate::discover::Why::Name(word),
            });
        }
        if left_out > 0 {
            log::warn!(
                "{left_out} more function(s) of {} read like invalidation but were left out (at most {} are picked by name); name them with --func",
                table.path.display(),
                crate::discover::MAX_NAMED
            );
        }
    }

    /// The catalog as planned so far: a new version if anything was added
    /// since the last call.
    pub fn catalog(&mut self) -> Arc<Catalog> {
        if self.changed {
            self.changed = false;
            Arc::make_mut(&mut self.published).version += 1;
        }
        self.published.clone()
    }

    /// The attach requests for `files`: an executable, then the libraries
    /// it maps. Each pattern is looked up in the executable first, and only
    /// if it matches nothing there in the libraries (read only then), so
    /// `cache_*` means the program's own functions, while `--func lib_fn`
    /// still finds its library. With `strict`, each pattern must match
    /// somewhere (`hint` completes the suggestion); otherwise what matches
    /// nothing is skipped.
    pub fn requests(
        &mut self,
        files: &[FileTarget],
        strict: bool,
        hint: &str,
    ) -> anyhow::Result<Vec<AttachRequest>> {
        let Some((exe, libraries)) = files.split_first() else {
            return Ok(Vec::new());
        };
        let exe_id = self.load(exe)?;
        self.pick_named(exe_id);
        let table = &self.tables[&exe_id].1;
        let (in_exe, elsewhere): (Vec<Pattern>, Vec<Pattern>) = self
            .patterns
            .iter()
            .cloned()
            .partition(|p| table.symbols.iter().any(|s| p.selects(s)));
        // Indices into the table's symbols, not copies (10,000 of them
        // were 1.3 MiB at the loader's peak).
        let mut in_exe = table.matching_at(&in_exe);
        if let Some(picked) = self.picked.get(&exe_id) {
            in_exe.extend(
                (0..table.symbols.len()).filter(|&i| picked.contains_key(&*table.symbols[i].name)),
            );
            let offset = |&i: &usize| table.symbols[i].file_offset;
            in_exe.sort_by_key(offset);
            in_exe.dedup_by_key(|i| offset(i));
        }
        let mut chosen = vec![(exe, exe_id, in_exe)];
        if !elsewhere.is_empty() {
            let found: Vec<(FileId, &FileTarget)> = libraries
                .iter()
                .filter_map(|library| Some((self.load(library).ok()?, library)))
                .collect();
            let searched: Vec<&SymbolTable> = std::iter::once(exe_id)
                .chain(found.iter().map(|(id, _)| *id))
                .map(|id| &self.tables[&id].1)
                .collect();
            if strict {
                check_matches(&searched, &elsewhere, hint)?;
            }
            for ((id, library), table) in found.iter().zip(&searched[1..]) {
                chosen.push((library, *id, table.matching_at(&elsewhere)));
            }
        }
        let mut requests = Vec::new();
        for (file, file_id, symbols) in chosen {
            if symbols.is_empty() {
                continue;
            }
            // Mappings name a file by the path the process opened, links
            // resolved; a --binary path may be a link (redis-server is).
            let mapped = match file.pid {
                Some(_) => file.shown.clone(),
                None => crate::cycles::canonical(&file.shown),
            };
            // Room for them all at once, not the doubling's spare half
            // (10,000 functions: 1.3 MiB, not 2 MiB). Only while no
            // published version shares the catalog: else it is copied as
            // functions are added, if any are.
            if let Some(catalog) = Arc::get_mut(&mut self.published) {
                catalog.functions.reserve_exact(symbols.len());
            }
            // Out of the planner while its functions are added to the
            // catalog (which needs the planner), then back.
            let Some((open, table)) = self.tables.remove(&file_id) else {
                continue;
            };
            let mut points = Vec::with_capacity(symbols.len());
            for symbol in symbols.into_iter().filter_map(|i| table.symbols.get(i)) {
                let id = self.add(file_id, &mapped, symbol);
                points.push((symbol.file_offset, id));
            }
            self.tables.insert(file_id, (open.clone(), table));
            requests.push(AttachRequest {
                file: open,
                shown: file.shown.clone(),
                pid: file.pid,
                points,
                usdt: Vec::new(),
            });
        }
        requests.extend(self.usdt_requests(files, strict)?);
        Ok(requests)
    }

    /// Files a symbol under its function's id (made on first sight).
    fn add(&mut self, file_id: FileId, mapped: &std::path::Path, symbol: &Symbol) -> u32 {
        let found = self
            .ids
            .get(&self.published.functions, file_id, &symbol.name);
        let id = match found {
            Some(id) => id,
            None => {
                let next = self.published.functions.len() as u32;
                let request = self
                    .request_patterns
                    .iter()
                    .any(|p| p.matches(&symbol.name));
                let picked = self
                    .picked
                    .get(&file_id)
                    .and_then(|names| names.get(&*symbol.name))
                    .copied()
                    .filter(|_| !request);
                let key = if request || picked == Some(Picked::Hot) {
                    None
                } else {
                    self.key_spec(&symbol.name)
                };
                functions_mut(&mut self.published).push(Function {
                    name: symbol.name.clone(),
                    paths: Arc::new([]),
                    file_id,
                    offsets: Default::default(),
                    ranges: Default::default(),
                    key,
                    request,
                    picked,
                });
                self.ids.insert(&self.published.functions, next);
                self.changed = true;
                next
            }
        };
        // The file's paths, with this one.
        let paths = self
            .file_paths
            .entry(file_id)
            .or_insert_with(|| Arc::new([]));
        if !paths.iter().any(|p| p == mapped) {
            let mut more = paths.to_vec();
            more.push(mapped.to_owned());
            *paths = more.into();
        }
        let known = &self.published.functions[id as usize];
        let new_paths = !Arc::ptr_eq(&known.paths, paths);
        let new_offset = !known.offsets.contains(&symbol.file_offset);
        if !(new_paths || new_offset) {
            return id;
        }
        let function = &mut functions_mut(&mut self.published)[id as usize];
        if new_paths {
            function.paths = paths.clone();
        }
        if new_offset {
            function.offsets.push(symbol.file_offset);
            if symbol.size > 0 {
                function.ranges.push(Range {
                    start: symbol.file_offset,
                    end: symbol.file_offset + symbol.size,
                });
            }
        }
        self.changed = true;
        id
    }

    /// How to read a function's key: the preset's spec for its functions,
    /// `--key-arg` for the rest.
    fn key_spec(&self, name: &str) -> Option<KeySpec> {
        if let Some((_, spec)) = self.preset_keys.iter().find(|(f, _)| *f == name) {
            return Some(match *spec {
                presets::KeySpec::Str(arg) => KeySpec::Str { arg },
                presets::KeySpec::RedisObject(arg) => KeySpec::StrAt { arg, offset: 8 },
            });
        }
        self.key_arg.map(|k| match k.kind {
            KeyKind::Str => KeySpec::Str { arg: k.index },
            KeyKind::StrAt(offset) => KeySpec::StrAt {
                arg: k.index,
                offset,
            },
            KeyKind::U64 => KeySpec::U64 { arg: k.index },
        })
    }

    /// Opens a file and reads its symbols, once per file identity: the
    /// symbols are read through the descriptor the probes will be attached
    /// through, so both are the same bytes whatever happens to the path.
    /// Returns its identity.
    fn load(&mut self, file: &FileTarget) -> Result<FileId, SymbolError> {
        let open =
            OpenFile::open(&file.open).map_err(|e| SymbolError::unreadable(&file.shown, e))?;
        let id = open.id;
        // The same identity with other contents: rewritten in place, or an
        // inode number freed and given to a new file. Not the same
        // functions.
        if self
            .stamps
            .insert(id, open.stamp())
            .is_some_and(|s| s != open.stamp())
            && self
                .tables
                .get(&id)
                .is_none_or(|(held, _)| held.stamp() != open.stamp())
        {
            self.forget_file(id);
        }
        if let Entry::Vacant(slot) = self.tables.entry(id) {
            let table = SymbolTable::read(&open.fd_path(), &file.shown, &file.root)?;
            slot.insert((Arc::new(open), table));
        }
        Ok(id)
    }

    /// Closes the files nothing is attached to any more (their processes
    /// exited, a deploy replaced them) and drops their symbols: a service
    /// redeployed daily would otherwise pile up descriptors and tables.
    /// Catalog entries stay: ids keep their meaning. Returns how many
    /// files were closed.
    /// Function ids stay: the same file read again (a restarted worker)
    /// keeps its functions' ids.
    pub fn release_unused(&mut self) -> usize {
        let before = self.tables.len();
        self.tables
            .retain(|_, (file, _)| Arc::strong_count(file) > 1);
        // USDT offsets go with the file: a later file may get its identity.
        let tables = &self.tables;
        self.usdt_probes.retain(|id, _| tables.contains_key(id));
        self.file_paths.retain(|id, _| tables.contains_key(id));
        before - self.tables.len()
    }

    /// The attach requests for functions of an executable picked since it
    /// was planned (`names`), in each of `files` (that executable, as one
    /// process or every process maps it). Only those functions: the
    /// others are attached already.
    pub fn requests_for_picks(
        &mut self,
        files: &[FileTarget],
        names: &[String],
    ) -> anyhow::Result<Vec<AttachRequest>> {
        let mut requests = Vec::new();
        let mut last_error = None;
        for file in files {
            // One process gone since is no reason to leave out the others.
            let id = match self.load(file) {
                Ok(id) => id,
                Err(e) => {
                    last_error = Some(e);
                    continue;
                }
            };
            let mut symbols: Vec<Symbol> = self.tables[&id]
                .1
                .symbols
                .iter()
                .filter(|s| names.iter().any(|n| **n == *s.name))
                .cloned()
                .collect();
            // One probe per address: C++'s constructor and destructor
            // variants share a name and an address.
            symbols.sort_by_key(|s| s.file_offset);
            symbols.dedup_by_key(|s| s.file_offset);
            if symbols.is_empty() {
                continue;
            }
            let mapped = match file.pid {
                Some(_) => file.shown.clone(),
                None => crate::cycles::canonical(&file.shown),
            };
            let points = symbols
                .iter()
                .map(|symbol| (symbol.file_offset, self.add(id, &mapped, symbol)))
                .collect();
            requests.push(AttachRequest {
                file: self.tables[&id].0.clone(),
                shown: file.shown.clone(),
                pid: file.pid,
                points,
                usdt: Vec::new(),
            });
        }
        match last_error {
            Some(e) if requests.is_empty() => Err(e.into()),
            _ => Ok(requests),
        }
    }

    /// Drops a file's symbols and retires its function ids: planned again,
    /// its functions get new ids. A file rewritten in place must not have
    /// its new offsets filed under the old content's functions. (Newer ids
    /// win where old and new code share a file identity: see
    /// [`crate::catalog::Catalog::function_at`].)
    pub fn forget_file(&mut self, id: FileId) {
        self.tables.remove(&id);
        self.usdt_probes.remove(&id);
        self.ids
            .retain(&self.published.functions, |file| file != id);
    }
}

/// Function ids by file and name, without a second copy of each name:
/// the table holds ids, hashed and compared through the catalog's
/// functions (10,000 names copied as keys were 1.1 MiB).
#[derive(Default)]
struct Ids {
    table: hashbrown::HashTable<u32>,
    state: foldhash::fast::RandomState,
}

impl Ids {
    fn hash(&self, file: FileId, name: &str) -> u64 {
        use std::hash::BuildHasher as _;
        self.state.hash_one((file, name))
    }

    fn get(&self, functions: &[Function], file: FileId, name: &str) -> Option<u32> {
        let same = |&id: &u32| {
            let f = &functions[id as usize];
            f.file_id == file && *f.name == *name
        };
        self.table.find(self.hash(file, name), same).copied()
    }

    /// Files `functions[id]` under its file and name (not there yet).
    fn insert(&mut self, functions: &[Function], id: u32) {
        let f = &functions[id as usize];
        let hash = self.hash(f.file_id, &f.name);
        let state = &self.state;
        self.table.insert_unique(hash, id, |&id| {
            use std::hash::BuildHasher as _;
            let f = &functions[id as usize];
            state.hash_one((f.file_id, &*f.name))
        });
    }

    /// Keeps the ids of functions whose file `keep` says.
    fn retain(&mut self, functions: &[Function], keep: impl Fn(FileId) -> bool) {
        self.table
            .retain(|&mut id| keep(functions[id as usize].file_id));
    }
}
