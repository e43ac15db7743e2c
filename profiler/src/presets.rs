//! Ready-made `--func` sets for caches as Debian packages them.
//!
//! Debian's builds inline some exported functions into their callers (an
//! inlined function never fires at its symbol), so every function here was
//! checked against the real binaries: each one fires under the cache's own
//! invalidation paths, and the kernel tests check that again on every run.
//!
//! Redis 7.0 (`redis-server`, Debian 12): `delCommand`, `dbDelete`,
//! `dbSyncDelete`, `expireIfNeeded` and `deleteExpiredKeyAndPropagate` are
//! exported but do not fire on DEL/expiry; eviction deletes through
//! `dictDelete` rather than `dictUnlink`.
//!
//! Varnish 7.1 (`varnishd`): `VRT_purge` does not fire; `return (purge)`
//! reaches `HSH_Purge` directly. Objects live in the child process
//! (`cache-main`), bans are also committed from the manager's CLI.

/// One preset: the functions it watches and why each is there.
pub struct Preset {
    pub name: &'static str,
    /// Command names watched when no target is given.
    pub default_names: &'static [&'static str],
    /// (function, the invalidation paths it counts).
    pub functions: &'static [(&'static str, &'static str)],
    /// Where each function's key is, by function name.
    pub keys: &'static [(&'static str, KeySpec)],
}

/// Where a function's key argument is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeySpec {
    /// Argument N is a C string (Redis's `sds`).
    Str(u32),
    /// Argument N points to a Redis `robj` whose `ptr`, at offset 8 (after
    /// the 4-byte type/encoding/lru bit-field and the 4-byte refcount),
    /// is the key's `sds`.
    RedisObject(u32),
}

pub const PRESETS: &[Preset] = &[
    Preset {
        name: "redis",
        default_names: &["redis-server"],
        functions: &[
            (
                "trackingInvalidateKey",
                "every key Redis invalidates: DEL, UNLINK, expiry, eviction (and writes, which invalidate cached copies)",
            ),
            (
                "dictUnlink",
                "keys removed from the keyspace by DEL, UNLINK and expiry",
            ),
            ("freeObjAsync", "values freed in the background by UNLINK"),
            (
                "propagateDeletion",
                "keys Redis deletes on its own when they expire",
            ),
            (
                "removeExpire",
                "keys evicted under maxmemory (their TTL entry goes first); also every SET",
            ),
        ],
        // dictUnlink(dict *d, const void *key); freeObjAsync(robj *key, ...);
        // propagateDeletion(redisDb *db, robj *key, int lazy). Redis 7.0
        // source. trackingInvalidateKey(client *c, robj *keyobj, int bcast)
        // fires on every write and removeExpire(redisDb *db, robj *key) on
        // every SET (setKey drops the old TTL), so their keys are a queue
        // broker's or a counter's hot keys all day: not captured (they are
        // counted, and judged on their rates). The deleting functions carry
        // the keys.
        keys: &[
            ("dictUnlink", KeySpec::Str(1)),
            ("freeObjAsync", KeySpec::RedisObject(0)),
            ("propagateDeletion", KeySpec::RedisObject(1)),
        ],
    },
    Preset {
        name: "varnish",
        default_names: &["varnishd", "cache-main"],
        functions: &[
            ("HSH_Purge", "each PURGE (return (purge) in VCL)"),
            (
                "BAN_Commit",
                "each ban added: ban() in VCL, BAN requests, varnishadm ban",
            ),
            (
                "EXP_Remove",
                "each object taken off the expiry list: expiry, purge, ban",
            ),
            ("HSH_Kill", "each object killed: expiry, purge, ban"),
        ],
        keys: &[],
    },
];

/// The preset called `name`.
pub fn find(name: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name)
}

/// The `presets` command: one preset's functions, one per line (function,
/// then why), or every preset with its default process names.
pub fn describe(name: Option<&str>) -> Result<String, crate::config::ConfigError> {
    let mut out = String::new();
    match name {
        Some(name) => {
            let preset = find(name).ok_or_else(|| crate::config::ConfigError::UnknownPreset {
                name: name.to_owned(),
                known: names(),
            })?;
            for (function, why) in preset.functions {
                out.push_str(&format!("{function:<24} {why}\n"));
            }
        }
        None => {
            for preset in PRESETS {
                out.push_str(&format!(
                    "{} (without a target: watches processes named {})\n",
                    preset.name,
                    preset.default_names.join(", ")
                ));
                for (function, why) in preset.functions {
                    out.push_str(&format!("  {function:<24} {why}\n"));
                }
            }
        }
    }
    Ok(out)
}

/// The names of every preset, for messages.
pub fn names() -> String {
    PRESETS
        .iter()
        .map(|p| p.name)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_found_by_name() {
        assert_eq!(find("redis").unwrap().default_names, ["redis-server"]);
        assert!(find("memcached").is_none());
        assert_eq!(names(), "redis, varnish");
    }

    #[test]
    fn describe_lists_functions_first_on_each_line() {
        let text = describe(Some("varnish")).unwrap();
        let first: Vec<&str> = text
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert_eq!(first, ["HSH_Purge", "BAN_Commit", "EXP_Remove", "HSH_Kill"]);
        assert!(
            describe(None)
                .unwrap()
                .contains("redis (without a target: watches processes named redis-server)")
        );
        assert!(describe(Some("nope")).is_err());
    }

    #[test]
    fn every_preset_function_says_why() {
        for preset in PRESETS {
            assert!(!preset.functions.is_empty());
            for (function, why) in preset.functions {
                assert!(!function.is_empty() && !why.is_empty(), "{}", preset.name);
            }
        }
    }
}
