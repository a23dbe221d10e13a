//! The sled database: trees, typed records and durable commits.
//!
//! The keys live in these trees, written with plain inserts in a fixed order (sled
//! recovers a prefix of its log, so every crash leaves a harmless state, see
//! [`Store::insert_key`]); separate trees keep sled's copy-on-write leaves small:
//!
//! | tree | key | value |
//! |---|---|---|
//! | `streams` | `s` + stream name | [`StreamRecord`] (JSON) |
//! | `streams` | `d` + key stream id | a deleted stream whose data the janitor removes |
//! | `log` | key stream id, sequence number (big endian) | [`LogEntry`]: the key stream |
//! | `keys` | keyLink | [`KeyRecord`] |
//! | `current/` + [`Period`] | keyed hash of the `keyField` | [`CurrentKey`] |
//!
//! A key stream is ordered by creation time, and so by expiry (a stream's rotation is
//! fixed): it is the expiry index too. The purge walks each key stream from a cursor
//! and stops at the first key that has not expired; it never scans all keys.
//!
//! Current-key pointers are kept in one tree per rotation [`Period`] of a key stream:
//! once every key of a period has rotated its pointers are of no use, and the janitor
//! drops the whole tree ([`Store::drop_rotated_periods`]). sled frees a dropped tree
//! page by page, about 1.6 million pointers a second here, where removing them one by
//! one cost a copy-on-write of a leaf each (46,000 a second) and held up the writes
//! of key creation meanwhile.
//!
//! Other trees hold JSON records for the layers above (`meta`, `tokens`, `sinks`,
//! `exporters`) and know nothing of their meaning.
//!
//! Durability is a [`GroupCommit`]: a writer takes a [`Ticket`] after its write and waits
//! until a flush that started after the ticket was issued has finished. One flusher
//! thread serves every waiter that arrived during the previous flush with a single fsync.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::sync::watch;
use uuid::Uuid;

const PREFIX_STREAM: u8 = b's';
const PREFIX_DELETED: u8 = b'd';

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    #[error("storage cannot make writes durable: {0}")]
    Flush(String),
    #[error("corrupt {what} record in the database: {detail}")]
    Corrupt { what: &'static str, detail: String },
    #[error(
        "the disk holding the data directory is full: {free_mb} MiB free, writes need \
         storage.min_free_mb = {reserve_mb} MiB"
    )]
    Full { free_mb: u64, reserve_mb: u64 },
}

impl StoreError {
    /// True when the failure is the disk's (full, read-only, I/O error): the request may
    /// succeed later, so the API answers 503.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::Flush(_) | StoreError::Full { .. } | StoreError::Sled(sled::Error::Io(_))
        )
    }

    /// True when sled itself hit an I/O error: sled stops for good after one, so the
    /// daemon must restart to recover from its log.
    pub fn is_fatal(&self) -> bool {
        matches!(self, StoreError::Sled(sled::Error::Io(_)))
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

fn corrupt(what: &'static str, detail: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        what,
        detail: detail.into(),
    }
}

/// The JSON-record trees of the upper layers.
#[derive(Clone, Copy, Debug)]
pub enum Table {
    Meta,
    Tokens,
    Sinks,
    Exporters,
}

/// A stream as stored. The API renders it; the keys layer keeps it in memory.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StreamRecord {
    pub name: String,
    pub key_rotation_secs: u64,
    pub key_stream_id: Uuid,
    pub created_at: u64,
}

/// The key a `keyField` currently maps to in one stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CurrentKey {
    pub key_link: Uuid,
    pub seq: u64,
    pub created_at: u64,
    pub rotates_at: u64,
}

/// A rotation period of a key stream: the current-key pointers of the keys created in
/// `[start, start + length)` (ms) live in a tree of their own. `length` is the
/// stream's rotation, so every key of the period has rotated by `start + 2 * length`,
/// and lookups only ever need the newest two periods.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Period {
    pub key_stream_id: Uuid,
    pub start: u64,
    pub length: u64,
}

impl Period {
    const TREE_PREFIX: &'static [u8] = b"current/";

    /// The period of a key created at `created_at` (ms) that rotates at `rotates_at`.
    fn of(key_stream_id: Uuid, created_at: u64, rotates_at: u64) -> Period {
        let length = rotates_at.saturating_sub(created_at).max(1);
        Period {
            key_stream_id,
            start: created_at - created_at % length,
            length,
        }
    }

    /// When every key of the period has rotated (ms): its pointers can go.
    pub fn rotated_by(&self) -> u64 {
        self.start.saturating_add(self.length.saturating_mul(2))
    }

    fn tree_name(&self) -> Vec<u8> {
        let mut name = Self::TREE_PREFIX.to_vec();
        name.extend_from_slice(self.key_stream_id.as_bytes());
        name.extend_from_slice(&self.start.to_be_bytes());
        name.extend_from_slice(&self.length.to_be_bytes());
        name
    }

    fn from_tree_name(name: &[u8]) -> Option<Period> {
        let rest = name.strip_prefix(Self::TREE_PREFIX)?;
        (rest.len() == 32).then(|| Period {
            key_stream_id: uuid_at(rest, 0),
            start: u64_at(rest, 16),
            length: u64_at(rest, 24),
        })
    }

    /// The range of periods of one key stream, in a map ordered by period.
    fn all_of(ksid: Uuid) -> std::ops::RangeInclusive<Period> {
        let p = |v| Period {
            key_stream_id: ksid,
            start: v,
            length: v,
        };
        p(0)..=p(u64::MAX)
    }
}

/// One key, by keyLink: where its keyset is and how long it lives. The keyset itself
/// lives once, in the key stream entry. An expired key keeps its record (decrypt then
/// answers 410, not 404) until retention trims it with its key stream entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyRecord {
    pub key_stream_id: Uuid,
    pub seq: u64,
    pub created_at: u64,
    pub rotates_at: u64,
    pub expires_at: u64,
}

/// One entry of a key stream: the key as exporters read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    pub seq: u64,
    pub key_link: Uuid,
    pub created_at: u64,
    pub expires_at: u64,
    /// Keyed hash of the `keyField`: names the key's current-key pointer, so that the
    /// pointers could be rebuilt from the key stream alone.
    pub field_hash: [u8; 32],
    /// The stored value; its tail is the keyset proto wrapped by the master key with the
    /// keyLink as associated data. Kept as sled's shared buffer: decoding copies nothing.
    value: sled::IVec,
}

impl LogEntry {
    /// The wrapped keyset.
    pub fn wrapped_keyset(&self) -> &[u8] {
        &self.value[Self::HEAD..]
    }
}

/// Everything written when a key is created.
pub struct NewKey<'a> {
    pub record: KeyRecord,
    pub key_link: Uuid,
    pub field_hash: [u8; 32],
    pub wrapped_keyset: &'a [u8],
    /// Whether the key becomes its `keyField`'s current key; restored keys do not.
    pub current: bool,
}

// ---------------------------------------------------------------------------------------
// Binary layouts
// ---------------------------------------------------------------------------------------

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn uuid_at(b: &[u8], at: usize) -> Uuid {
    Uuid::from_bytes(b[at..at + 16].try_into().expect("16 bytes"))
}

fn key_of(prefix: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + parts.iter().map(|p| p.len()).sum::<usize>());
    k.push(prefix);
    for p in parts {
        k.extend_from_slice(p);
    }
    k
}

/// Runs, on the calling thread, the frees sled deferred when it dropped a tree, for at
/// most `budget` (twice what the drop took: the frees cost about that much).
///
/// sled frees each page of a dropped tree (and the page's node in memory) in closures
/// deferred to the epoch collector: a pointer table of a million keys leaves some
/// 80,000 pages, a second or more of work. Left alone the closures run on whichever
/// threads pin the epoch next, request threads among them; the janitor drains them
/// instead, until collections have found nothing for 100 ms (the epoch advances only as
/// the other threads re-pin). The collector is the process's: under load it always has
/// other threads' garbage, hence the budget, which keeps the janitor's round short. A
/// collection that found work is told by the CPU time it took, not the wall time, which
/// a janitor at low priority loses to preemption. (As published, sled also scanned its
/// whole free list in each closure: vendor/sled/PATCHES.md.)
fn run_deferred_frees(budget: std::time::Duration) {
    use std::time::{Duration, Instant};
    let started = Instant::now();
    let mut found_some = Instant::now();
    while found_some.elapsed() < Duration::from_millis(100) && started.elapsed() < budget {
        let before = thread_cpu_time();
        crossbeam_epoch::pin().flush();
        if thread_cpu_time().saturating_sub(before) >= Duration::from_micros(20) {
            found_some = Instant::now();
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// CPU time the calling thread has used.
fn thread_cpu_time() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill; the clock exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn log_key(ksid: Uuid, seq: u64) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..16].copy_from_slice(ksid.as_bytes());
    k[16..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn stream_key(name: &str) -> Vec<u8> {
    key_of(PREFIX_STREAM, &[name.as_bytes()])
}

impl CurrentKey {
    const LEN: usize = 40;
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::LEN);
        v.extend_from_slice(self.key_link.as_bytes());
        v.extend_from_slice(&self.seq.to_be_bytes());
        v.extend_from_slice(&self.created_at.to_be_bytes());
        v.extend_from_slice(&self.rotates_at.to_be_bytes());
        v
    }
    fn decode(b: &[u8]) -> Result<Self> {
        if b.len() != Self::LEN {
            return Err(corrupt("current-key", format!("{} bytes", b.len())));
        }
        Ok(CurrentKey {
            key_link: uuid_at(b, 0),
            seq: u64_at(b, 16),
            created_at: u64_at(b, 24),
            rotates_at: u64_at(b, 32),
        })
    }
}

impl KeyRecord {
    const LEN: usize = 16 + 8 * 4;
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::LEN);
        v.extend_from_slice(self.key_stream_id.as_bytes());
        v.extend_from_slice(&self.seq.to_be_bytes());
        v.extend_from_slice(&self.created_at.to_be_bytes());
        v.extend_from_slice(&self.rotates_at.to_be_bytes());
        v.extend_from_slice(&self.expires_at.to_be_bytes());
        v
    }
    fn decode(b: &[u8]) -> Result<Self> {
        if b.len() != Self::LEN {
            return Err(corrupt("key", format!("{} bytes", b.len())));
        }
        Ok(KeyRecord {
            key_stream_id: uuid_at(b, 0),
            seq: u64_at(b, 16),
            created_at: u64_at(b, 24),
            rotates_at: u64_at(b, 32),
            expires_at: u64_at(b, 40),
        })
    }
}

impl LogEntry {
    const HEAD: usize = 16 + 8 + 8 + 32;
    fn encode(k: &NewKey<'_>) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::HEAD + k.wrapped_keyset.len());
        v.extend_from_slice(k.key_link.as_bytes());
        v.extend_from_slice(&k.record.created_at.to_be_bytes());
        v.extend_from_slice(&k.record.expires_at.to_be_bytes());
        v.extend_from_slice(&k.field_hash);
        v.extend_from_slice(k.wrapped_keyset);
        v
    }
    fn decode(key: &[u8], b: sled::IVec) -> Result<Self> {
        if key.len() != 24 || b.len() < Self::HEAD {
            return Err(corrupt("key stream", format!("{} bytes", b.len())));
        }
        Ok(LogEntry {
            seq: u64_at(key, 16),
            key_link: uuid_at(&b, 0),
            created_at: u64_at(&b, 16),
            expires_at: u64_at(&b, 24),
            field_hash: b[32..64].try_into().expect("32 bytes"),
            value: b,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Group commit
// ---------------------------------------------------------------------------------------

/// Proof that a write happened before a point in the flush sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(u64);

#[derive(Clone, Debug, Default)]
struct FlushState {
    /// Every ticket up to this one is on disk.
    flushed: u64,
    /// The flush that covered tickets up to this one failed.
    failed: u64,
    error: Option<String>,
}

/// The flusher lingers only when fewer writes than this wait.
const LINGER_BELOW: u64 = 16;

struct GroupCommit {
    issued: AtomicU64,
    /// How long the flusher waits for more writes before a small flush.
    linger: std::time::Duration,
    /// Set when the store closes; guards the condition variable that wakes the flusher.
    closing: Mutex<bool>,
    wake: Condvar,
    state: watch::Sender<FlushState>,
}

impl GroupCommit {
    fn ticket(&self) -> Ticket {
        let t = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
        let _guard = self.closing.lock().unwrap_or_else(|e| e.into_inner());
        self.wake.notify_one();
        Ticket(t)
    }

    /// The flusher thread: one fsync for every ticket issued while the previous ran.
    fn run(&self, db: &sled::Db) {
        let mut done = 0;
        loop {
            {
                let mut closing = self.closing.lock().unwrap_or_else(|e| e.into_inner());
                while self.issued.load(Ordering::SeqCst) == done && !*closing {
                    closing = self.wake.wait(closing).unwrap_or_else(|e| e.into_inner());
                }
                if *closing && self.issued.load(Ordering::SeqCst) == done {
                    return;
                }
            }
            // Linger: a flush costs about the same for one write as for a hundred, so
            // when few writes wait, give the others a moment to join.
            if !self.linger.is_zero() && self.issued.load(Ordering::SeqCst) - done < LINGER_BELOW {
                std::thread::sleep(self.linger);
            }
            let upto = self.issued.load(Ordering::SeqCst);
            let result = db.flush();
            done = upto;
            self.state.send_modify(|s| match result {
                Ok(_) => s.flushed = upto,
                Err(e) => {
                    s.failed = upto;
                    s.error = Some(e.to_string());
                }
            });
        }
    }

    async fn durable(&self, t: Ticket) -> Result<()> {
        let mut rx = self.state.subscribe();
        let state = rx
            .wait_for(|s| s.flushed >= t.0 || s.failed >= t.0)
            .await
            .map_err(|_| StoreError::Flush("the store is closed".into()))?
            .clone();
        if state.flushed >= t.0 {
            Ok(())
        } else {
            Err(StoreError::Flush(
                state.error.unwrap_or_else(|| "flush failed".into()),
            ))
        }
    }
}

// ---------------------------------------------------------------------------------------
// Free-space guard
// ---------------------------------------------------------------------------------------

/// Refuses writes while the data directory's file system has less than `reserve` bytes
/// free. sled stops for good after an I/O error such as ENOSPC, so the daemon keeps it
/// from ever running into one: requests get 503 while the disk is full, and writes
/// resume by themselves once space returns.
struct SpaceGuard {
    dir: std::path::PathBuf,
    reserve: u64,
    /// When the free space was last read (ms); it is read at most every 100 ms.
    checked_at: AtomicU64,
    /// Free bytes at the last reading.
    free: AtomicU64,
}

impl SpaceGuard {
    fn free_bytes(dir: &Path) -> Option<u64> {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: a valid C string and a properly sized out-parameter.
        if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
            return None;
        }
        Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
    }

    fn check(&self) -> Result<()> {
        if self.reserve == 0 {
            return Ok(());
        }
        let now = crate::duration::now_millis();
        if now.saturating_sub(self.checked_at.load(Ordering::Relaxed)) >= 100 {
            self.checked_at.store(now, Ordering::Relaxed);
            if let Some(free) = Self::free_bytes(&self.dir) {
                self.free.store(free, Ordering::Relaxed);
            }
        }
        let free = self.free.load(Ordering::Relaxed);
        if free < self.reserve {
            return Err(StoreError::Full {
                free_mb: free >> 20,
                reserve_mb: self.reserve >> 20,
            });
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Store
// ---------------------------------------------------------------------------------------

pub struct Store {
    db: sled::Db,
    streams: sled::Tree,
    log: sled::Tree,
    keys: sled::Tree,
    /// The current-key pointer tree of each rotation period. A tree is used only under
    /// the read lock, so once the janitor has taken one out under the write lock
    /// nobody holds it and sled may drop it.
    periods: RwLock<BTreeMap<Period, sled::Tree>>,
    meta: sled::Tree,
    tokens: sled::Tree,
    sinks: sled::Tree,
    exporters: sled::Tree,
    commit: Arc<GroupCommit>,
    flusher: Mutex<Option<JoinHandle<()>>>,
    space: SpaceGuard,
}

impl Store {
    /// Opens (or creates) the database in `dir`. Fails when another process holds it.
    /// Writes are refused while less than `min_free_bytes` are free on its disk.
    pub fn open(dir: &Path, cache_capacity_bytes: u64, min_free_bytes: u64) -> Result<Store> {
        Store::open_with(
            dir,
            cache_capacity_bytes,
            min_free_bytes,
            std::time::Duration::ZERO,
        )
    }

    /// [`Store::open`] with a group-commit linger (see `storage.group_commit_linger_us`).
    pub fn open_with(
        dir: &Path,
        cache_capacity_bytes: u64,
        min_free_bytes: u64,
        linger: std::time::Duration,
    ) -> Result<Store> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_capacity_bytes)
            .flush_every_ms(Some(1000))
            .open()?;
        let streams = db.open_tree("streams")?;
        let log = db.open_tree("log")?;
        let keys = db.open_tree("keys")?;
        let mut periods = BTreeMap::new();
        for name in db.tree_names() {
            if let Some(p) = Period::from_tree_name(&name) {
                periods.insert(p, db.open_tree(name)?);
            }
        }
        let meta = db.open_tree("meta")?;
        let tokens = db.open_tree("tokens")?;
        let sinks = db.open_tree("sinks")?;
        let exporters = db.open_tree("exporters")?;
        let (state, _) = watch::channel(FlushState::default());
        let commit = Arc::new(GroupCommit {
            issued: AtomicU64::new(0),
            linger,
            closing: Mutex::new(false),
            wake: Condvar::new(),
            state,
        });
        let flusher = {
            let commit = commit.clone();
            let db = db.clone();
            std::thread::Builder::new()
                .name("store-flusher".into())
                .spawn(move || commit.run(&db))
                .map_err(|e| StoreError::Flush(format!("cannot start the flusher: {e}")))?
        };
        let store = Store {
            db,
            streams,
            log,
            keys,
            periods: RwLock::new(periods),
            meta,
            tokens,
            sinks,
            exporters,
            commit,
            flusher: Mutex::new(Some(flusher)),
            space: SpaceGuard {
                dir: dir.to_path_buf(),
                reserve: min_free_bytes,
                checked_at: AtomicU64::new(0),
                free: AtomicU64::new(u64::MAX),
            },
        };
        store.move_single_pointer_tree()?;
        Ok(store)
    }

    /// Data directories written before pointers were kept per period hold them all in
    /// one `current` tree (key: key stream id and keyed hash): moves them into their
    /// periods, then drops it. A crash part way leaves the old tree, and the next start
    /// moves its pointers again (the same inserts).
    fn move_single_pointer_tree(&self) -> Result<()> {
        const OLD: &[u8] = b"current";
        if !self.db.tree_names().iter().any(|n| n == OLD) {
            return Ok(());
        }
        let old = self.db.open_tree(OLD)?;
        for kv in old.iter() {
            let (k, v) = kv?;
            let cur = CurrentKey::decode(&v)?;
            if k.len() != 48 {
                return Err(corrupt("current-key", format!("key of {} bytes", k.len())));
            }
            let p = Period::of(uuid_at(&k, 0), cur.created_at, cur.rotates_at);
            self.with_period(p, |t| t.insert(&k[16..], v.clone()))?;
        }
        drop(old);
        self.db.flush()?;
        self.db.drop_tree(OLD)?;
        Ok(())
    }

    /// A ticket covering every write made before this call.
    pub fn ticket(&self) -> Ticket {
        self.commit.ticket()
    }

    /// Waits until the writes covered by `t` are on disk.
    pub async fn durable(&self, t: Ticket) -> Result<()> {
        self.commit.durable(t).await
    }

    /// Makes every write made so far durable.
    pub async fn sync(&self) -> Result<()> {
        let t = self.ticket();
        self.durable(t).await
    }

    /// Flushes synchronously and stops the flusher thread; used at shutdown.
    pub fn close(&self) -> Result<()> {
        *self
            .commit
            .closing
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = true;
        self.commit.wake.notify_one();
        if let Some(handle) = self
            .flusher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = handle.join();
        }
        self.db.flush()?;
        Ok(())
    }

    pub fn size_on_disk(&self) -> Result<u64> {
        Ok(self.db.size_on_disk()?)
    }

    /// Cheap write probe for readiness: the store accepts writes.
    pub fn writable(&self) -> Result<()> {
        self.space.check()?;
        self.meta
            .insert(b"probe", &crate::duration::now_millis().to_be_bytes())?;
        Ok(())
    }

    // --- streams -------------------------------------------------------------------

    pub fn streams(&self) -> Result<Vec<StreamRecord>> {
        self.streams
            .scan_prefix([PREFIX_STREAM])
            .map(|kv| {
                let (_, v) = kv?;
                serde_json::from_slice(&v).map_err(|e| corrupt("stream", e.to_string()))
            })
            .collect()
    }

    /// Inserts a new stream; `Ok(false)` when the name exists.
    pub fn insert_stream(&self, s: &StreamRecord) -> Result<bool> {
        self.space.check()?;
        let value = serde_json::to_vec(s).expect("stream record serializes");
        Ok(self
            .streams
            .compare_and_swap(stream_key(&s.name), None as Option<&[u8]>, Some(value))?
            .is_ok())
    }

    /// Removes the stream and marks its key streams (`also`: e.g. the restored one) for
    /// the janitor to delete, in one atomic batch.
    pub fn delete_stream(&self, s: &StreamRecord, also: &[Uuid]) -> Result<()> {
        self.space.check()?;
        let mut batch = sled::Batch::default();
        batch.remove(stream_key(&s.name));
        for ksid in std::iter::once(&s.key_stream_id).chain(also) {
            batch.insert(key_of(PREFIX_DELETED, &[ksid.as_bytes()]), &[] as &[u8]);
        }
        self.streams.apply_batch(batch)?;
        Ok(())
    }

    /// Key streams of deleted streams whose data is still to be removed.
    pub fn deleted_streams(&self) -> Result<Vec<Uuid>> {
        self.streams
            .scan_prefix([PREFIX_DELETED])
            .map(|kv| {
                let (k, _) = kv?;
                if k.len() != 17 {
                    return Err(corrupt("deleted stream", format!("{} bytes", k.len())));
                }
                Ok(uuid_at(&k, 1))
            })
            .collect()
    }

    /// Removes up to `limit` records of a deleted key stream (its current-key pointer
    /// trees first, each counting as one); returns how many. When nothing is left it
    /// removes the deletion marker and returns 0.
    pub fn remove_deleted_stream_data(&self, ksid: Uuid, limit: usize) -> Result<usize> {
        let mut n = self.drop_periods(|p| p.key_stream_id == ksid)?;
        for kv in self
            .log
            .scan_prefix(ksid.as_bytes())
            .take(limit.saturating_sub(n))
        {
            let (k, v) = kv?;
            let e = LogEntry::decode(&k, v)?;
            self.keys.remove(e.key_link.as_bytes())?;
            self.log.remove(k)?;
            n += 1;
        }
        if n == 0 {
            self.streams
                .remove(key_of(PREFIX_DELETED, &[ksid.as_bytes()]))?;
        }
        Ok(n)
    }

    // --- keys ----------------------------------------------------------------------

    /// The newest current-key pointer of a keyed hash among the periods of a key stream
    /// that may still hold an unrotated key at `now` (ms); the caller checks its
    /// rotation time.
    pub fn current(
        &self,
        ksid: Uuid,
        field_hash: &[u8; 32],
        now: u64,
    ) -> Result<Option<CurrentKey>> {
        let periods = self.periods.read().unwrap_or_else(|e| e.into_inner());
        for (p, tree) in periods.range(Period::all_of(ksid)).rev() {
            if p.rotated_by() <= now {
                continue;
            }
            if let Some(v) = tree.get(field_hash)? {
                return Ok(Some(CurrentKey::decode(&v)?));
            }
        }
        Ok(None)
    }

    /// Runs `f` on the pointer tree of `p` (opened when new) under the read lock.
    fn with_period<T>(
        &self,
        p: Period,
        f: impl FnOnce(&sled::Tree) -> sled::Result<T>,
    ) -> Result<T> {
        loop {
            {
                let periods = self.periods.read().unwrap_or_else(|e| e.into_inner());
                if let Some(tree) = periods.get(&p) {
                    return Ok(f(tree)?);
                }
            }
            let mut periods = self.periods.write().unwrap_or_else(|e| e.into_inner());
            if let std::collections::btree_map::Entry::Vacant(slot) = periods.entry(p) {
                slot.insert(self.db.open_tree(p.tree_name())?);
            }
        }
    }

    /// The periods whose pointer trees are held, for metrics.
    pub fn periods(&self) -> Vec<Period> {
        let periods = self.periods.read().unwrap_or_else(|e| e.into_inner());
        periods.keys().copied().collect()
    }

    /// Drops the pointer trees of the periods `doomed` picks; returns how many.
    fn drop_periods(&self, doomed: impl Fn(&Period) -> bool) -> Result<usize> {
        // Most rounds drop nothing: look first without holding up the readers.
        if !self
            .periods
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .any(&doomed)
        {
            return Ok(0);
        }
        let taken: Vec<(Period, sled::Tree)> = {
            let mut periods = self.periods.write().unwrap_or_else(|e| e.into_inner());
            let picked: Vec<Period> = periods.keys().filter(|p| doomed(p)).copied().collect();
            picked
                .into_iter()
                .filter_map(|p| periods.remove(&p).map(|t| (p, t)))
                .collect()
        };
        let n = taken.len();
        for (p, tree) in taken {
            drop(tree);
            let started = std::time::Instant::now();
            self.db.drop_tree(p.tree_name())?;
            run_deferred_frees(2 * started.elapsed());
        }
        Ok(n)
    }

    /// Drops the pointer trees of every period whose keys have all rotated by `now`
    /// (ms); returns how many. A tree that fails to drop is dropped at the next start.
    pub fn drop_rotated_periods(&self, now: u64) -> Result<usize> {
        self.drop_periods(|p| p.rotated_by() <= now)
    }

    /// Writes a new key: its key stream entry, its key record and its current-key
    /// pointer, in that order. The caller serialises calls per key stream so that
    /// entries appear in sequence order.
    ///
    /// Plain inserts cost half of one `apply_batch` in sled, and the order keeps every
    /// crash state harmless, because sled recovers a prefix of its log: a key is only
    /// handed out once all three are durable; a key stream entry without the rest is a
    /// key that was never handed out (it is exported like any other and expires, and
    /// retention trims it).
    pub fn insert_key(&self, k: &NewKey<'_>) -> Result<()> {
        self.space.check()?;
        let r = &k.record;
        self.log
            .insert(log_key(r.key_stream_id, r.seq), LogEntry::encode(k))?;
        self.keys.insert(k.key_link.as_bytes(), r.encode())?;
        if k.current {
            let pointer = CurrentKey {
                key_link: k.key_link,
                seq: r.seq,
                created_at: r.created_at,
                rotates_at: r.rotates_at,
            }
            .encode();
            let period = Period::of(r.key_stream_id, r.created_at, r.rotates_at);
            self.with_period(period, |t| t.insert(k.field_hash, pointer))?;
        }
        Ok(())
    }

    pub fn key(&self, link: Uuid) -> Result<Option<KeyRecord>> {
        self.keys
            .get(link.as_bytes())?
            .map(|v| KeyRecord::decode(&v))
            .transpose()
    }

    pub fn log_entry(&self, ksid: Uuid, seq: u64) -> Result<Option<LogEntry>> {
        let k = log_key(ksid, seq);
        self.log
            .get(k)?
            .map(|v| LogEntry::decode(&k, v))
            .transpose()
    }

    /// The highest sequence number in a key stream, if any.
    pub fn last_seq(&self, ksid: Uuid) -> Result<Option<u64>> {
        match self.log.scan_prefix(ksid.as_bytes()).next_back() {
            Some(kv) => Ok(Some(u64_at(&kv?.0, 16))),
            None => Ok(None),
        }
    }

    /// The lowest sequence number still in a key stream, if any.
    pub fn first_seq(&self, ksid: Uuid) -> Result<Option<u64>> {
        match self.log.scan_prefix(ksid.as_bytes()).next() {
            Some(kv) => Ok(Some(u64_at(&kv?.0, 16))),
            None => Ok(None),
        }
    }

    /// Key stream entries with `from <= seq <= to`, at most `limit`, in order.
    pub fn log_range(&self, ksid: Uuid, from: u64, to: u64, limit: usize) -> Result<Vec<LogEntry>> {
        if from > to {
            return Ok(Vec::new());
        }
        self.log
            .range(log_key(ksid, from)..=log_key(ksid, to))
            .take(limit)
            .map(|kv| {
                let (k, v) = kv?;
                LogEntry::decode(&k, v)
            })
            .collect()
    }

    /// Trims the head of a key stream: removes entries created before `cutoff` whose
    /// key has expired by `now`, with their key records (first, so that a crash leaves
    /// an entry the next round removes). Stops at the first entry that must stay.
    /// Returns how many were removed.
    pub fn trim_log(&self, ksid: Uuid, cutoff: u64, now: u64, limit: usize) -> Result<usize> {
        let mut keys = sled::Batch::default();
        let mut log = sled::Batch::default();
        let mut n = 0;
        for kv in self.log.scan_prefix(ksid.as_bytes()).take(limit) {
            let (k, v) = kv?;
            let e = LogEntry::decode(&k, v)?;
            if e.created_at >= cutoff || e.expires_at > now {
                break;
            }
            keys.remove(e.key_link.as_bytes());
            log.remove(k);
            n += 1;
        }
        if n > 0 {
            self.keys.apply_batch(keys)?;
            self.log.apply_batch(log)?;
        }
        Ok(n)
    }

    // --- JSON records of the upper layers ---------------------------------------------

    fn table(&self, t: Table) -> &sled::Tree {
        match t {
            Table::Meta => &self.meta,
            Table::Tokens => &self.tokens,
            Table::Sinks => &self.sinks,
            Table::Exporters => &self.exporters,
        }
    }

    pub fn get_raw(&self, t: Table, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.table(t).get(key)?.map(|v| v.to_vec()))
    }

    pub fn put_raw(&self, t: Table, key: &[u8], value: &[u8]) -> Result<()> {
        self.space.check()?;
        self.table(t).insert(key, value)?;
        Ok(())
    }

    pub fn get<T: DeserializeOwned>(&self, t: Table, key: &str) -> Result<Option<T>> {
        self.table(t)
            .get(key)?
            .map(|v| serde_json::from_slice(&v).map_err(|e| corrupt("record", e.to_string())))
            .transpose()
    }

    pub fn put<T: Serialize>(&self, t: Table, key: &str, value: &T) -> Result<()> {
        self.space.check()?;
        let bytes = serde_json::to_vec(value).expect("records serialize");
        self.table(t).insert(key, bytes)?;
        Ok(())
    }

    /// Inserts unless `key` exists; `Ok(false)` when it does.
    pub fn insert_new<T: Serialize>(&self, t: Table, key: &str, value: &T) -> Result<bool> {
        self.space.check()?;
        let bytes = serde_json::to_vec(value).expect("records serialize");
        Ok(self
            .table(t)
            .compare_and_swap(key, None as Option<&[u8]>, Some(bytes))?
            .is_ok())
    }

    /// Removes `key`; `Ok(false)` when it did not exist.
    pub fn remove(&self, t: Table, key: &str) -> Result<bool> {
        Ok(self.table(t).remove(key)?.is_some())
    }

    /// Every record of a table whose key starts with `prefix`, in key order.
    pub fn list<T: DeserializeOwned>(&self, t: Table, prefix: &str) -> Result<Vec<(String, T)>> {
        self.table(t)
            .scan_prefix(prefix)
            .map(|kv| {
                let (k, v) = kv?;
                let value =
                    serde_json::from_slice(&v).map_err(|e| corrupt("record", e.to_string()))?;
                Ok((String::from_utf8_lossy(&k).into_owned(), value))
            })
            .collect()
    }

    /// Applies puts (`Some`) and removes (`None`) to one table atomically.
    pub fn apply(&self, t: Table, ops: Vec<(String, Option<Vec<u8>>)>) -> Result<()> {
        self.space.check()?;
        let mut batch = sled::Batch::default();
        for (k, v) in ops {
            match v {
                Some(v) => batch.insert(k.as_bytes(), v),
                None => batch.remove(k.as_bytes()),
            }
        }
        self.table(t).apply_batch(batch)?;
        Ok(())
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        *self
            .commit
            .closing
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = true;
        self.commit.wake.notify_one();
        if let Some(handle) = self
            .flusher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db"), 8 << 20, 0).unwrap();
        (dir, store)
    }

    fn new_key(store: &Store, ksid: Uuid, seq: u64, hash: u8, created: u64, expires: u64) -> Uuid {
        let link = Uuid::new_v4();
        store
            .insert_key(&NewKey {
                record: KeyRecord {
                    key_stream_id: ksid,
                    seq,
                    created_at: created,
                    rotates_at: created + 10,
                    expires_at: expires,
                },
                key_link: link,
                field_hash: [hash; 32],
                wrapped_keyset: b"wrapped",
                current: true,
            })
            .unwrap();
        link
    }

    /// The keyLink the current-key pointer of the keyed hash `[byte; 32]` holds at `now`.
    fn pointer(store: &Store, ksid: Uuid, byte: u8, now: u64) -> Option<Uuid> {
        store
            .current(ksid, &[byte; 32], now)
            .unwrap()
            .map(|c| c.key_link)
    }

    #[tokio::test]
    async fn key_records_round_trip_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let ksid = Uuid::new_v4();
        let link;
        {
            let store = Store::open(&dir.path().join("db"), 8 << 20, 0).unwrap();
            link = new_key(&store, ksid, 0, 1, 100, 200);
            store.sync().await.unwrap();
            store.close().unwrap();
        }
        let store = Store::open(&dir.path().join("db"), 8 << 20, 0).unwrap();
        let cur = store.current(ksid, &[1; 32], 100).unwrap().unwrap();
        assert_eq!(cur.key_link, link);
        assert_eq!(cur.rotates_at, 110);
        let rec = store.key(link).unwrap().unwrap();
        assert_eq!(rec.expires_at, 200);
        let e = store.log_entry(ksid, 0).unwrap().unwrap();
        assert_eq!(e.key_link, link);
        assert_eq!(e.field_hash, [1; 32]);
        assert_eq!(e.wrapped_keyset(), b"wrapped");
        assert_eq!(store.last_seq(ksid).unwrap(), Some(0));
        assert_eq!(store.last_seq(Uuid::new_v4()).unwrap(), None);
    }

    #[tokio::test]
    async fn pointers_live_in_periods_dropped_once_rotated_and_trim() {
        let dir = tempfile::tempdir().unwrap();
        let ksid = Uuid::new_v4();
        let other = Uuid::new_v4();
        let store = Store::open(&dir.path().join("db"), 8 << 20, 0).unwrap();
        // Rotation 10: a in the period [100, 110), b in [120, 130).
        let a = new_key(&store, ksid, 0, 1, 100, 150);
        let b = new_key(&store, ksid, 1, 2, 125, 300);
        let c = new_key(&store, other, 0, 1, 105, 300);
        assert_eq!(pointer(&store, ksid, 1, 105), Some(a));
        assert_eq!(pointer(&store, other, 1, 105), Some(c));
        assert!(pointer(&store, ksid, 3, 105).is_none());
        assert_eq!(store.periods().len(), 3);
        // Every key of [100, 110) has rotated by 120, not before.
        assert_eq!(store.drop_rotated_periods(119).unwrap(), 0);
        assert_eq!(store.drop_rotated_periods(120).unwrap(), 2);
        assert!(pointer(&store, ksid, 1, 100).is_none());
        assert!(pointer(&store, other, 1, 100).is_none());
        assert_eq!(pointer(&store, ksid, 2, 125), Some(b));
        // A period past its rotations is not looked at, even before the janitor runs.
        assert!(pointer(&store, ksid, 2, 140).is_none());
        // b has not expired at 200: trimming stops there even though it is old.
        assert_eq!(store.trim_log(ksid, 1000, 200, 100).unwrap(), 1);
        assert!(store.key(a).unwrap().is_none());
        assert_eq!(store.first_seq(ksid).unwrap(), Some(1));
        assert_eq!(store.log_range(ksid, 0, 10, 10).unwrap().len(), 1);
        // The drop is durable; the remaining period is found again.
        store.sync().await.unwrap();
        store.close().unwrap();
        drop(store);
        let store = Store::open(&dir.path().join("db"), 8 << 20, 0).unwrap();
        assert_eq!(store.periods().len(), 1);
        assert_eq!(pointer(&store, ksid, 2, 125), Some(b));
        assert!(pointer(&store, ksid, 1, 100).is_none());
    }

    #[tokio::test]
    async fn the_newest_pointer_wins() {
        let (_d, store) = open();
        let ksid = Uuid::new_v4();
        new_key(&store, ksid, 0, 1, 100, 150);
        let new = new_key(&store, ksid, 1, 1, 140, 400);
        assert_eq!(pointer(&store, ksid, 1, 141), Some(new));
        assert_eq!(store.drop_rotated_periods(141).unwrap(), 1);
        assert_eq!(pointer(&store, ksid, 1, 141), Some(new));
    }

    #[tokio::test]
    async fn pointers_of_the_single_tree_layout_move_into_periods() {
        let dir = tempfile::tempdir().unwrap();
        let ksid = Uuid::new_v4();
        let link = Uuid::new_v4();
        {
            let db = sled::open(dir.path().join("db")).unwrap();
            let old = db.open_tree("current").unwrap();
            let mut k = ksid.as_bytes().to_vec();
            k.extend_from_slice(&[7; 32]);
            let pointer = CurrentKey {
                key_link: link,
                seq: 3,
                created_at: 1_000,
                rotates_at: 1_500,
            };
            old.insert(k, pointer.encode()).unwrap();
            db.flush().unwrap();
        }
        let store = Store::open(&dir.path().join("db"), 8 << 20, 0).unwrap();
        let cur = store.current(ksid, &[7; 32], 1_200).unwrap().unwrap();
        assert_eq!((cur.key_link, cur.seq, cur.rotates_at), (link, 3, 1_500));
        assert!(
            !store
                .db
                .tree_names()
                .iter()
                .any(|n| n == b"current".as_slice())
        );
        assert_eq!(
            store.periods(),
            vec![Period {
                key_stream_id: ksid,
                start: 1_000,
                length: 500
            }]
        );
    }

    #[tokio::test]
    async fn deleted_stream_data_is_removed_in_batches() {
        let (_d, store) = open();
        let s = StreamRecord {
            name: "s".into(),
            key_rotation_secs: 10,
            key_stream_id: Uuid::new_v4(),
            created_at: 1,
        };
        assert!(store.insert_stream(&s).unwrap());
        assert!(!store.insert_stream(&s).unwrap());
        let mut links = Vec::new();
        for i in 0..5 {
            links.push(new_key(&store, s.key_stream_id, i, i as u8, 100, 200));
        }
        store.delete_stream(&s, &[]).unwrap();
        assert!(store.streams().unwrap().is_empty());
        assert_eq!(store.deleted_streams().unwrap(), vec![s.key_stream_id]);
        let mut total = 0;
        loop {
            let n = store
                .remove_deleted_stream_data(s.key_stream_id, 3)
                .unwrap();
            if n == 0 {
                break;
            }
            total += n;
        }
        // Five key stream entries and their key records, one pointer tree.
        assert_eq!(total, 6);
        assert!(store.periods().is_empty());
        assert!(store.deleted_streams().unwrap().is_empty());
        for l in links {
            assert!(store.key(l).unwrap().is_none());
        }
    }

    #[tokio::test]
    async fn group_commit_serves_many_waiters() {
        let (_d, store) = open();
        let store = Arc::new(store);
        let mut tasks = Vec::new();
        for i in 0..100u32 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                store.put_raw(Table::Meta, &i.to_be_bytes(), b"x").unwrap();
                let t = store.ticket();
                store.durable(t).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
    }
}
