//! The keys domain: streams, get-or-create of the current key for a `keyField`,
//! rotation, encryption and decryption, the key stream that exporters read, and the
//! janitor that purges expired keys and trims key streams.
//!
//! Two promises live here:
//! - *Durable before answered.* A request that creates a key waits for the group commit
//!   before it returns the keyLink; a concurrent request that finds the same not yet
//!   durable key waits for the same commit (the `pending` map records its ticket).
//! - *One key per `keyField` and rotation period.* Creation re-checks the current-key
//!   pointer under a stripe lock chosen by the keyed hash, so 200 simultaneous requests
//!   for a new `keyField` write one key. Key material is generated outside the lock.
//!   A pointer lives in its rotation period's table until every key of that period has
//!   rotated, so it outlives its key's rotation by at most one rotation period.
//!
//! A stream's key stream is appended under that stream's `next_seq` lock, so entries
//! appear in sequence order and a reader that sees entry N has seen every entry before.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use uuid::Uuid;
use zeroize::Zeroizing;

use crate::crypto::{self, CryptoError, KeysetBytes, MasterKey};
use crate::duration::{Seconds, now_millis};
use crate::store::{CurrentKey, KeyRecord, NewKey, Store, StoreError, StreamRecord, Table, Ticket};

/// Stripes of the creation lock; a power of two.
const STRIPES: usize = 1024;

const META_HMAC_SECRET: &[u8] = b"hmac_secret";
const META_MASTER_KEY_ID: &[u8] = b"master_key_id";

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("stream '{0}' not found")]
    StreamNotFound(String),
    #[error("stream '{0}' already exists")]
    StreamExists(String),
    #[error("keyLink {0} not found")]
    KeyNotFound(Uuid),
    #[error("the key of keyLink {0} has expired and was purged; it can no longer be used")]
    KeyGone(Uuid),
    #[error("{0}")]
    Invalid(String),
    #[error("values.{0}: not a ciphertext of this key (was it encrypted under another keyLink?)")]
    BadCiphertext(String),
    #[error("values.{0}: decrypts to bytes that are not UTF-8 text")]
    NotText(String),
    #[error(
        "the master key does not match this data directory: {0}. Start with the master key \
         the data directory was created with; nothing was changed"
    )]
    WrongMasterKey(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("key material: {0}")]
    Crypto(#[from] CryptoError),
}

pub type Result<T> = std::result::Result<T, KeysError>;

/// Settings from `[keys]` of the config.
#[derive(Clone, Debug)]
pub struct KeysSettings {
    pub default_rotation: Seconds,
    pub grace: Seconds,
    pub stream_retention: Seconds,
}

/// A stream and its key stream's append position.
pub struct KeyStream {
    pub record: StreamRecord,
    /// Next sequence number, held while a key is appended so entries land in order.
    next_seq: Mutex<u64>,
    /// Set under `next_seq` when the stream is deleted: late writers must not append.
    deleted: AtomicBool,
}

/// What `restore_key` did with one exported key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestoreOutcome {
    Restored,
    /// The keyLink is here with the same key material: nothing to do.
    AlreadyPresent,
    /// The keyLink is here with other key material: refused.
    Conflict,
    /// The keyLink was here and has been purged.
    Purged,
    /// Its lifetime is over: it would be purged at once.
    Expired,
}

/// Restored keys of a stream live in a key stream of their own, which no exporter
/// reads, so that they are never exported again.
pub fn restored_key_stream_id(key_stream_id: Uuid) -> Uuid {
    Uuid::new_v5(&key_stream_id, b"keyexportd/restored")
}

/// A key as handed out: what `POST /v1/streams/{name}/keys` answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IssuedKey {
    pub key_link: Uuid,
    pub created_at: u64,
    pub rotates_at: u64,
    /// Where the keyset lives in the key stream.
    key_stream_id: Uuid,
    seq: u64,
}

/// Metadata of a live key: what `GET /v1/keys/{keyLink}` answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyInfo {
    pub key_link: Uuid,
    pub stream: String,
    pub created_at: u64,
    pub rotates_at: u64,
    pub expires_at: u64,
}

/// A key stream entry as an exporter reads it; the keyset stays wrapped until written.
#[derive(Clone, Debug)]
pub struct StreamKey {
    pub seq: u64,
    pub key_link: Uuid,
    pub created_at: u64,
    entry: crate::store::LogEntry,
}

/// Counters the metrics endpoint reads.
#[derive(Default, Debug)]
pub struct KeyCounters {
    pub created: AtomicU64,
    pub purged: AtomicU64,
    pub trimmed: AtomicU64,
}

/// What a creation in progress is waiting for, by (key stream, keyed hash).
type Pending = HashMap<(Uuid, [u8; 32]), Ticket>;

pub struct Keys {
    store: Arc<Store>,
    master: Arc<MasterKey>,
    /// HMAC key for `keyField` values, unique per install, stored wrapped.
    field_secret: Zeroizing<Vec<u8>>,
    settings: KeysSettings,
    streams: RwLock<HashMap<String, Arc<KeyStream>>>,
    /// Creations not yet durable, striped by keyed hash; also the creation lock.
    stripes: Vec<Mutex<Pending>>,
    /// Per key stream, the first entry the purge has not passed yet (also in `meta`).
    purge_cursors: Mutex<HashMap<Uuid, u64>>,
    pub counters: KeyCounters,
}

/// The result of looking up or creating a key without waiting for durability.
struct Resolved {
    key: CurrentKey,
    /// Set when the key is not yet known to be on disk.
    wait: Option<(usize, [u8; 32], Ticket)>,
}

impl Keys {
    /// Opens the keys domain over `store`. On a new store it creates the install's
    /// `keyField` secret; on an existing one it proves that `master` unwraps it, and
    /// refuses to run otherwise.
    pub fn open(store: Arc<Store>, master: Arc<MasterKey>, settings: KeysSettings) -> Result<Keys> {
        let field_secret = match store.get_raw(Table::Meta, META_HMAC_SECRET)? {
            Some(wrapped) => master
                .unwrap(&wrapped, crypto::AD_HMAC_SECRET)
                .map_err(|_| {
                    let created_with = store
                        .get_raw(Table::Meta, META_MASTER_KEY_ID)
                        .ok()
                        .flatten()
                        .and_then(|b| <[u8; 4]>::try_from(b.as_slice()).ok())
                        .map(u32::from_be_bytes);
                    KeysError::WrongMasterKey(match created_with {
                        Some(id) => format!(
                            "it was created with master key id {id}, the loaded key has id {}",
                            master.key_id()
                        ),
                        None => format!("the loaded key (id {}) cannot unwrap it", master.key_id()),
                    })
                })?,
            None => {
                let secret = crypto::random_bytes(32);
                let wrapped = master.wrap(&secret, crypto::AD_HMAC_SECRET)?;
                store.put_raw(
                    Table::Meta,
                    META_MASTER_KEY_ID,
                    &master.key_id().to_be_bytes(),
                )?;
                store.put_raw(Table::Meta, META_HMAC_SECRET, &wrapped)?;
                secret
            }
        };
        let mut streams = HashMap::new();
        for record in store.streams()? {
            let next = store.last_seq(record.key_stream_id)?.map_or(0, |s| s + 1);
            streams.insert(
                record.name.clone(),
                Arc::new(KeyStream {
                    record,
                    next_seq: Mutex::new(next),
                    deleted: AtomicBool::new(false),
                }),
            );
        }
        Ok(Keys {
            store,
            master,
            field_secret,
            settings,
            streams: RwLock::new(streams),
            stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
            purge_cursors: Mutex::new(HashMap::new()),
            counters: KeyCounters::default(),
        })
    }

    pub fn settings(&self) -> &KeysSettings {
        &self.settings
    }

    // --- streams -------------------------------------------------------------------

    pub fn stream(&self, name: &str) -> Result<Arc<KeyStream>> {
        self.streams
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| KeysError::StreamNotFound(name.to_string()))
    }

    pub fn streams(&self) -> Vec<StreamRecord> {
        let mut list: Vec<StreamRecord> = self
            .streams
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|s| s.record.clone())
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    pub async fn create_stream(
        &self,
        name: &str,
        rotation: Option<Seconds>,
    ) -> Result<StreamRecord> {
        crate::names::validate("stream", name).map_err(KeysError::Invalid)?;
        let rotation = rotation.unwrap_or(self.settings.default_rotation);
        if rotation.0 == 0 {
            return Err(KeysError::Invalid("keyRotation must be at least 1s".into()));
        }
        if rotation > self.settings.stream_retention {
            return Err(KeysError::Invalid(format!(
                "keyRotation {rotation} is longer than keys.stream_retention ({}): keys would \
                 leave the key stream while still in use and could not be exported",
                self.settings.stream_retention
            )));
        }
        let record = StreamRecord {
            name: name.to_string(),
            key_rotation_secs: rotation.0,
            key_stream_id: Uuid::new_v4(),
            created_at: now_millis(),
        };
        {
            let mut streams = self.streams.write().unwrap_or_else(|e| e.into_inner());
            if streams.contains_key(name) || !self.store.insert_stream(&record)? {
                return Err(KeysError::StreamExists(name.to_string()));
            }
            streams.insert(
                name.to_string(),
                Arc::new(KeyStream {
                    record: record.clone(),
                    next_seq: Mutex::new(0),
                    deleted: AtomicBool::new(false),
                }),
            );
        }
        self.store.sync().await?;
        Ok(record)
    }

    /// Deletes a stream; its keys and key stream are removed by the janitor.
    pub async fn delete_stream(&self, name: &str) -> Result<()> {
        {
            let mut streams = self.streams.write().unwrap_or_else(|e| e.into_inner());
            let stream = streams
                .get(name)
                .cloned()
                .ok_or_else(|| KeysError::StreamNotFound(name.to_string()))?;
            let _append = stream.next_seq.lock().unwrap_or_else(|e| e.into_inner());
            self.store.delete_stream(
                &stream.record,
                &[restored_key_stream_id(stream.record.key_stream_id)],
            )?;
            stream.deleted.store(true, Ordering::SeqCst);
            streams.remove(name);
        }
        self.store.sync().await?;
        Ok(())
    }

    fn stream_name_of(&self, ksid: Uuid) -> Option<String> {
        self.streams
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .find(|s| {
                s.record.key_stream_id == ksid
                    || restored_key_stream_id(s.record.key_stream_id) == ksid
            })
            .map(|s| s.record.name.clone())
    }

    /// Puts back an exported key (disaster recovery): usable for decryption until
    /// `expires_at`, never a current key, never exported again. Refuses to replace a
    /// keyLink that holds other key material. Idempotent.
    pub fn restore_key(
        &self,
        stream: &str,
        key_link: Uuid,
        tink_key: &serde_json::Value,
        created_at: u64,
    ) -> Result<RestoreOutcome> {
        let stream = self.stream(stream)?;
        let keyset = crypto::keyset_from_json(tink_key)?;
        if let Some(existing) = self.store.key(key_link)? {
            if existing.expires_at <= now_millis() {
                return Ok(RestoreOutcome::Purged);
            }
            let here = self.load_keyset(existing.key_stream_id, existing.seq, key_link)?;
            return Ok(if here[..] == keyset[..] {
                RestoreOutcome::AlreadyPresent
            } else {
                RestoreOutcome::Conflict
            });
        }
        let rotates_at =
            created_at.saturating_add(Seconds(stream.record.key_rotation_secs).as_millis());
        let expires_at = rotates_at.saturating_add(self.settings.grace.as_millis());
        if expires_at <= now_millis() {
            return Ok(RestoreOutcome::Expired);
        }
        let ksid = restored_key_stream_id(stream.record.key_stream_id);
        let seq = self.store.last_seq(ksid)?.map_or(0, |s| s + 1);
        let wrapped = self.master.wrap(&keyset, key_link.as_bytes())?;
        self.store.insert_key(&NewKey {
            record: KeyRecord {
                key_stream_id: ksid,
                seq,
                created_at,
                rotates_at,
                expires_at,
            },
            key_link,
            field_hash: [0; 32],
            wrapped_keyset: &wrapped,
            current: false,
        })?;
        Ok(RestoreOutcome::Restored)
    }

    /// Makes every write so far durable (for offline tools such as `restore`).
    pub async fn sync(&self) -> Result<()> {
        Ok(self.store.sync().await?)
    }

    // --- get-or-create ---------------------------------------------------------------

    fn field_hash(&self, ksid: Uuid, key_field: &str) -> [u8; 32] {
        crypto::keyed_hash(&self.field_secret, &[ksid.as_bytes(), key_field.as_bytes()])
    }

    fn stripe_of(hash: &[u8; 32]) -> usize {
        (u16::from_be_bytes([hash[0], hash[1]]) as usize) & (STRIPES - 1)
    }

    /// Finds the current key of `key_field`, or creates it, without waiting for disk.
    fn resolve(&self, stream: &KeyStream, key_field: &str) -> Result<Resolved> {
        if key_field.is_empty() {
            return Err(KeysError::Invalid("keyField must not be empty".into()));
        }
        let ksid = stream.record.key_stream_id;
        let hash = self.field_hash(ksid, key_field);
        let stripe = Self::stripe_of(&hash);
        let mut fresh: Option<(Uuid, Vec<u8>)> = None;
        loop {
            {
                let mut pending = self.stripes[stripe]
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let now = now_millis();
                if let Some(cur) = self.store.current(ksid, &hash, now)?
                    && cur.rotates_at > now
                {
                    let wait = pending.get(&(ksid, hash)).map(|t| (stripe, hash, *t));
                    return Ok(Resolved { key: cur, wait });
                }
                if let Some((key_link, wrapped)) = fresh.take() {
                    let key = self.append(stream, key_link, &wrapped, hash)?;
                    let ticket = self.store.ticket();
                    pending.insert((ksid, hash), ticket);
                    return Ok(Resolved {
                        key,
                        wait: Some((stripe, hash, ticket)),
                    });
                }
            }
            // Generate and wrap outside the lock, then look again.
            let key_link = Uuid::new_v4();
            let keyset = crypto::new_data_key()?;
            let wrapped = self.master.wrap(&keyset, key_link.as_bytes())?;
            fresh = Some((key_link, wrapped));
        }
    }

    /// Appends a key to the key stream (and writes its records) under the stream lock.
    /// The creation time is read under the lock too, so creation times follow sequence
    /// numbers and an exporter that closes a batch at time T after reading the stream's
    /// head has seen every key created before T.
    fn append(
        &self,
        stream: &KeyStream,
        key_link: Uuid,
        wrapped: &[u8],
        field_hash: [u8; 32],
    ) -> Result<CurrentKey> {
        let mut next = stream.next_seq.lock().unwrap_or_else(|e| e.into_inner());
        if stream.deleted.load(Ordering::SeqCst) {
            return Err(KeysError::StreamNotFound(stream.record.name.clone()));
        }
        let now = now_millis();
        let rotates_at = now.saturating_add(Seconds(stream.record.key_rotation_secs).as_millis());
        let record = KeyRecord {
            key_stream_id: stream.record.key_stream_id,
            seq: *next,
            created_at: now,
            rotates_at,
            expires_at: rotates_at.saturating_add(self.settings.grace.as_millis()),
        };
        self.store.insert_key(&NewKey {
            record,
            key_link,
            field_hash,
            wrapped_keyset: wrapped,
            current: true,
        })?;
        *next += 1;
        self.counters.created.fetch_add(1, Ordering::Relaxed);
        Ok(CurrentKey {
            key_link,
            seq: record.seq,
            created_at: now,
            rotates_at,
        })
    }

    /// Waits until the keys in `waits` are on disk, then forgets their pending entries.
    /// A failed flush is retried once with a new one before the request fails.
    async fn settle(&self, ksid: Uuid, waits: &[(usize, [u8; 32], Ticket)]) -> Result<()> {
        let Some(latest) = waits.iter().map(|w| w.2).max() else {
            return Ok(());
        };
        if self.store.durable(latest).await.is_err() {
            let retry = self.store.ticket();
            self.store.durable(retry).await?;
        }
        for (stripe, hash, ticket) in waits {
            let mut pending = self.stripes[*stripe]
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if pending.get(&(ksid, *hash)) == Some(ticket) {
                pending.remove(&(ksid, *hash));
            }
        }
        Ok(())
    }

    fn issued(stream: &KeyStream, k: CurrentKey) -> IssuedKey {
        IssuedKey {
            key_link: k.key_link,
            created_at: k.created_at,
            rotates_at: k.rotates_at,
            key_stream_id: stream.record.key_stream_id,
            seq: k.seq,
        }
    }

    /// The current key of `key_field` in `stream`, created on first use or after
    /// rotation. Returns once the key is on disk.
    pub async fn get_or_create(&self, stream: &str, key_field: &str) -> Result<IssuedKey> {
        let mut keys = self.get_or_create_many(stream, &[key_field]).await?;
        Ok(keys.pop().expect("one key per field"))
    }

    /// [`Keys::get_or_create`] for many `keyField`s with one wait for the disk.
    pub async fn get_or_create_many(
        &self,
        stream: &str,
        key_fields: &[&str],
    ) -> Result<Vec<IssuedKey>> {
        let stream = self.stream(stream)?;
        let mut out = Vec::with_capacity(key_fields.len());
        let mut waits = Vec::new();
        for field in key_fields {
            let r = self.resolve(&stream, field)?;
            waits.extend(r.wait);
            out.push(Self::issued(&stream, r.key));
        }
        self.settle(stream.record.key_stream_id, &waits).await?;
        Ok(out)
    }

    // --- using keys -----------------------------------------------------------------

    fn load_keyset(
        &self,
        ksid: Uuid,
        seq: u64,
        link: Uuid,
    ) -> std::result::Result<KeysetBytes, CryptoError> {
        let entry = self
            .store
            .log_entry(ksid, seq)
            .map_err(|e| CryptoError::Keyset(e.to_string()))?
            .ok_or_else(|| CryptoError::Keyset("key stream entry missing".into()))?;
        if entry.key_link != link {
            return Err(CryptoError::Keyset(
                "key stream entry of another key".into(),
            ));
        }
        self.master.unwrap(entry.wrapped_keyset(), link.as_bytes())
    }

    /// Encrypts each value deterministically under `key` (empty associated data).
    pub fn encrypt(&self, key: &IssuedKey, plaintexts: &[&[u8]]) -> Result<Vec<Vec<u8>>> {
        let out = crypto::with_daead(
            *key.key_link.as_bytes(),
            || self.load_keyset(key.key_stream_id, key.seq, key.key_link),
            |p| {
                plaintexts
                    .iter()
                    .map(|pt| crypto::encrypt(p, pt))
                    .collect::<std::result::Result<Vec<_>, _>>()
            },
        )??;
        Ok(out)
    }

    /// The live record of `link`: 404 when unknown, 410 once it has expired (the key is
    /// purged from use at `expiresAt`, whether or not the janitor has run yet).
    fn live(&self, link: Uuid) -> Result<KeyRecord> {
        match self.store.key(link)? {
            None => Err(KeysError::KeyNotFound(link)),
            Some(r) if r.expires_at <= now_millis() => Err(KeysError::KeyGone(link)),
            Some(r) => Ok(r),
        }
    }

    /// Decrypts named ciphertexts with the key of `link`, as UTF-8 text.
    pub fn decrypt(&self, link: Uuid, values: &[(&str, &[u8])]) -> Result<Vec<String>> {
        let r = self.live(link)?;
        let results = crypto::with_daead(
            *link.as_bytes(),
            || self.load_keyset(r.key_stream_id, r.seq, link),
            |p| {
                values
                    .iter()
                    .map(|(name, ct)| crypto::decrypt(p, ct).map_err(|_| name.to_string()))
                    .collect::<Vec<_>>()
            },
        )?;
        results
            .into_iter()
            .zip(values)
            .map(|(r, (name, _))| {
                let bytes = r.map_err(KeysError::BadCiphertext)?;
                String::from_utf8(bytes).map_err(|_| KeysError::NotText(name.to_string()))
            })
            .collect()
    }

    /// Metadata of a live key; purged keys are not found.
    pub fn key_info(&self, link: Uuid) -> Result<KeyInfo> {
        let r = match self.live(link) {
            Err(KeysError::KeyGone(l)) => return Err(KeysError::KeyNotFound(l)),
            other => other?,
        };
        let stream = self
            .stream_name_of(r.key_stream_id)
            .ok_or(KeysError::KeyNotFound(link))?;
        Ok(KeyInfo {
            key_link: link,
            stream,
            created_at: r.created_at,
            rotates_at: r.rotates_at,
            expires_at: r.expires_at,
        })
    }

    /// The cleartext keyset of a live key, as Tink JSON.
    pub fn export_keyset(&self, link: Uuid) -> Result<serde_json::Value> {
        let r = self.live(link)?;
        let keyset = self.load_keyset(r.key_stream_id, r.seq, link)?;
        Ok(crypto::keyset_json(&keyset)?)
    }

    // --- key stream, for exporters -----------------------------------------------------

    /// The sequence number of the newest entry of a key stream that is on disk, if any.
    /// Every key created before this call returned is at or below it.
    pub async fn durable_head(&self, stream: &KeyStream) -> Result<Option<u64>> {
        let next = *stream.next_seq.lock().unwrap_or_else(|e| e.into_inner());
        self.store.sync().await?;
        Ok(next.checked_sub(1))
    }

    /// The sequence number the next key of the stream will get.
    pub fn next_seq(&self, stream: &KeyStream) -> u64 {
        *stream.next_seq.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The oldest sequence number still in the key stream, if any.
    pub fn oldest_seq(&self, stream: &KeyStream) -> Result<Option<u64>> {
        Ok(self.store.first_seq(stream.record.key_stream_id)?)
    }

    /// Keys created before this time (ms) are past retention: never exported.
    pub fn retention_cutoff(&self, now: u64) -> u64 {
        now.saturating_sub(self.settings.stream_retention.as_millis())
    }

    /// Key stream entries `from..=to` in order, at most `limit`, still wrapped.
    pub fn read_stream(
        &self,
        stream: &KeyStream,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<StreamKey>> {
        Ok(self
            .store
            .log_range(stream.record.key_stream_id, from, to, limit)?
            .into_iter()
            .map(|e| StreamKey {
                seq: e.seq,
                key_link: e.key_link,
                created_at: e.created_at,
                entry: e,
            })
            .collect())
    }

    /// The first sequence number in `from..=to` whose key was created at or after `t`
    /// (ms), or `to + 1` when there is none. A key stream is in creation order (the
    /// creation time is read under the append lock), so a binary search of point reads
    /// finds it; entries already trimmed count as old.
    pub fn first_created_at_or_after(
        &self,
        stream: &KeyStream,
        from: u64,
        to: u64,
        t: u64,
    ) -> Result<u64> {
        let ksid = stream.record.key_stream_id;
        let (mut lo, mut hi) = (from, to.saturating_add(1));
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.store.log_entry(ksid, mid)? {
                Some(e) if e.created_at >= t => hi = mid,
                _ => lo = mid + 1,
            }
        }
        Ok(lo)
    }

    /// Appends the cleartext Tink JSON keyset of a key stream entry to `out`, as exports
    /// carry it (the exporters' hot path: written straight from the proto).
    pub fn write_stream_keyset_json(&self, key: &StreamKey, out: &mut Vec<u8>) -> Result<()> {
        let keyset = self
            .master
            .unwrap(key.entry.wrapped_keyset(), key.key_link.as_bytes())?;
        Ok(crypto::write_keyset_json(&keyset, out)?)
    }

    /// The cleartext Tink JSON keyset of a key stream entry, as exports carry it.
    pub fn stream_keyset_json(&self, key: &StreamKey) -> Result<serde_json::Value> {
        let keyset = self
            .master
            .unwrap(key.entry.wrapped_keyset(), key.key_link.as_bytes())?;
        Ok(crypto::keyset_json(&keyset)?)
    }

    // --- figures for metrics ---------------------------------------------------------

    /// Keys not purged yet: per key stream, the entries from the purge cursor on.
    pub fn live_keys(&self) -> Result<u64> {
        let mut live = 0;
        for ksid in self.maintained_key_streams() {
            let next = self.store.last_seq(ksid)?.map_or(0, |s| s + 1);
            live += next.saturating_sub(self.purge_cursor(ksid)?);
        }
        Ok(live)
    }

    fn purge_cursor_key(ksid: Uuid) -> Vec<u8> {
        [b"purge/".as_slice(), ksid.as_bytes()].concat()
    }

    /// Where the purge of a key stream resumes: remembered, else stored, else its start.
    fn purge_cursor(&self, ksid: Uuid) -> Result<u64> {
        if let Some(c) = self
            .purge_cursors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ksid)
        {
            return Ok(*c);
        }
        let stored = match self
            .store
            .get_raw(Table::Meta, &Self::purge_cursor_key(ksid))?
        {
            Some(b) if b.len() == 8 => u64::from_be_bytes(b.try_into().expect("8 bytes")),
            _ => 0,
        };
        let cursor = stored.max(self.store.first_seq(ksid)?.unwrap_or(0));
        self.purge_cursors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ksid, cursor);
        Ok(cursor)
    }

    /// Entries in a stream's key stream.
    pub fn stream_length(&self, stream: &KeyStream) -> u64 {
        let oldest = self.oldest_seq(stream).ok().flatten().unwrap_or(0);
        self.next_seq(stream).saturating_sub(oldest)
    }

    /// Streams with their key stream handles, for metrics.
    pub fn key_streams(&self) -> Vec<Arc<KeyStream>> {
        self.streams
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Size of the database on disk, in bytes.
    pub fn store_size(&self) -> Result<u64> {
        Ok(self.store.size_on_disk()?)
    }

    /// The store's fatal failure, if it had one (sled stops for good after an I/O error).
    pub fn store_failure(&self) -> Option<String> {
        match self.store.writable() {
            Err(e) if e.is_fatal() => Some(e.to_string()),
            _ => None,
        }
    }

    /// Readiness: the store takes a write and the master key unwraps the install secret.
    pub fn ready(&self) -> Result<()> {
        self.store.writable()?;
        let wrapped = self
            .store
            .get_raw(Table::Meta, META_HMAC_SECRET)?
            .ok_or_else(|| KeysError::Invalid("the install secret is missing".into()))?;
        self.master
            .unwrap(&wrapped, crypto::AD_HMAC_SECRET)
            .map_err(|_| KeysError::WrongMasterKey("the loaded key cannot unwrap it".into()))?;
        Ok(())
    }

    // --- janitor --------------------------------------------------------------------

    /// The key streams the janitor looks after: each stream's and its restored keys'.
    fn maintained_key_streams(&self) -> Vec<Uuid> {
        self.streams
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .flat_map(|s| {
                let ksid = s.record.key_stream_id;
                [ksid, restored_key_stream_id(ksid)]
            })
            .collect()
    }

    /// Purges the expired keys of one key stream: finds, by bisection from its purge
    /// cursor, the first key that has not expired, so that a million keys expiring at
    /// once cost some twenty reads, not a million. A key stream is in expiry order (a
    /// key expires at its creation plus the stream's rotation and grace); restored keys
    /// come in the order they were restored, and for them the cursor, which only
    /// counts, is near enough. The cursor is kept in `meta`. An expired key is refused
    /// by its record's expiry already; the purge counts it and moves past it, its
    /// current-key pointer leaves with its rotation period
    /// ([`Store::drop_rotated_periods`]) and its key stream entry at retention.
    fn purge_key_stream(&self, ksid: Uuid, now: u64) -> Result<u64> {
        let start = self.purge_cursor(ksid)?;
        let Some(last) = self.store.last_seq(ksid)? else {
            return Ok(0);
        };
        // Every entry before `lo` has expired; none from `hi` on is looked at.
        let (mut lo, mut hi) = (start, last + 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.store.log_range(ksid, mid, hi - 1, 1)?.first() {
                Some(e) if e.expires_at <= now => lo = e.seq + 1,
                _ => hi = mid,
            }
        }
        let cursor = lo;
        if cursor != start {
            self.store.put_raw(
                Table::Meta,
                &Self::purge_cursor_key(ksid),
                &cursor.to_be_bytes(),
            )?;
            self.purge_cursors
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(ksid, cursor);
        }
        Ok(cursor - start)
    }

    /// Rotation periods whose current-key pointer trees are held, per stream name.
    pub fn current_key_tables(&self) -> HashMap<String, usize> {
        let streams = self.streams.read().unwrap_or_else(|e| e.into_inner());
        let mut out: HashMap<String, usize> =
            streams.keys().map(|name| (name.clone(), 0)).collect();
        for p in self.store.periods() {
            if let Some(s) = streams
                .values()
                .find(|s| s.record.key_stream_id == p.key_stream_id)
            {
                *out.entry(s.record.name.clone()).or_default() += 1;
            }
        }
        out
    }

    /// One round of maintenance: drop the current-key pointers of rotated periods, purge
    /// expired keys, trim key streams past retention, and remove the data of deleted
    /// streams. Blocking; run it off the async workers.
    pub fn maintain(&self) -> Result<()> {
        const BATCH: usize = 10_000;
        let now = now_millis();
        let cutoff = now.saturating_sub(self.settings.stream_retention.as_millis());
        let started = std::time::Instant::now();
        let dropped = self.store.drop_rotated_periods(now)?;
        if dropped > 0 {
            log::info!(
                "janitor: dropped the current-key pointers of {dropped} rotated period(s) in {:?}",
                started.elapsed()
            );
        }
        for ksid in self.maintained_key_streams() {
            let started = std::time::Instant::now();
            let purged = self.purge_key_stream(ksid, now)?;
            // Keys expire all day long: a line per round would be noise at info.
            if purged > 0 {
                log::debug!(
                    "janitor: purged {purged} expired key(s) of key stream {ksid} in {:?}",
                    started.elapsed()
                );
            }
            self.counters.purged.fetch_add(purged, Ordering::Relaxed);
            loop {
                let n = self.store.trim_log(ksid, cutoff, now, BATCH)?;
                self.counters.trimmed.fetch_add(n as u64, Ordering::Relaxed);
                if n < BATCH {
                    break;
                }
            }
        }
        for ksid in self.store.deleted_streams()? {
            while self.store.remove_deleted_stream_data(ksid, BATCH)? > 0 {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> KeysSettings {
        KeysSettings {
            default_rotation: Seconds(3600),
            grace: Seconds(1),
            stream_retention: Seconds(7 * 24 * 3600),
        }
    }

    fn open(dir: &std::path::Path, master: Arc<MasterKey>) -> Result<Keys> {
        let store = Arc::new(Store::open(&dir.join("db"), 8 << 20, 0).unwrap());
        Keys::open(store, master, settings())
    }

    #[tokio::test]
    async fn get_or_create_is_stable_and_distinct() {
        let dir = tempfile::tempdir().unwrap();
        let keys = open(dir.path(), Arc::new(MasterKey::generate().unwrap())).unwrap();
        keys.create_stream("s", None).await.unwrap();
        let a = keys.get_or_create("s", "session-1").await.unwrap();
        let b = keys.get_or_create("s", "session-1").await.unwrap();
        let c = keys.get_or_create("s", "session-2").await.unwrap();
        assert_eq!(a.key_link, b.key_link);
        assert_ne!(a.key_link, c.key_link);
        assert!(matches!(
            keys.get_or_create("nope", "x").await,
            Err(KeysError::StreamNotFound(_))
        ));
        assert!(matches!(
            keys.get_or_create("s", "").await,
            Err(KeysError::Invalid(_))
        ));
        let ct = keys.encrypt(&a, &[b"a@b.example"]).unwrap();
        let pt = keys.decrypt(a.key_link, &[("email", &ct[0])]).unwrap();
        assert_eq!(pt, vec!["a@b.example".to_string()]);
        assert!(matches!(
            keys.decrypt(c.key_link, &[("email", &ct[0])]),
            Err(KeysError::BadCiphertext(f)) if f == "email"
        ));
        let json = keys.export_keyset(a.key_link).unwrap();
        assert_eq!(json["key"][0]["outputPrefixType"], "TINK");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_requests_create_one_key() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Arc::new(open(dir.path(), Arc::new(MasterKey::generate().unwrap())).unwrap());
        keys.create_stream("s", None).await.unwrap();
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let keys = keys.clone();
                tokio::spawn(async move { keys.get_or_create("s", "same").await.unwrap().key_link })
            })
            .collect();
        let mut links = std::collections::HashSet::new();
        for t in tasks {
            links.insert(t.await.unwrap());
        }
        assert_eq!(links.len(), 1);
        assert_eq!(keys.counters.created.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn wrong_master_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let keys = open(dir.path(), Arc::new(MasterKey::generate().unwrap())).unwrap();
            keys.create_stream("s", None).await.unwrap();
        }
        let err = open(dir.path(), Arc::new(MasterKey::generate().unwrap()))
            .err()
            .unwrap();
        assert!(matches!(err, KeysError::WrongMasterKey(_)), "{err}");
        assert!(err.to_string().contains("master key id"), "{err}");
    }

    #[tokio::test]
    async fn rotation_purge_and_key_stream() {
        let dir = tempfile::tempdir().unwrap();
        let keys = open(dir.path(), Arc::new(MasterKey::generate().unwrap())).unwrap();
        keys.create_stream("s", Some(Seconds(1))).await.unwrap();
        let a = keys.get_or_create("s", "f").await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        let b = keys.get_or_create("s", "f").await.unwrap();
        assert_ne!(a.key_link, b.key_link, "rotated");
        let stream = keys.stream("s").unwrap();
        assert_eq!(keys.durable_head(&stream).await.unwrap(), Some(1));
        let entries = keys.read_stream(&stream, 0, 1, 10).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].key_link, a.key_link);
        assert!(entries[0].created_at <= entries[1].created_at);
        let json = keys.stream_keyset_json(&entries[1]).unwrap();
        assert_eq!(json, keys.export_keyset(b.key_link).unwrap());
        // a expires 1s after rotating.
        tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
        assert!(matches!(
            keys.decrypt(a.key_link, &[]),
            Err(KeysError::KeyGone(_))
        ));
        keys.maintain().unwrap();
        assert_eq!(keys.counters.purged.load(Ordering::Relaxed), 1);
        assert!(matches!(
            keys.key_info(a.key_link),
            Err(KeysError::KeyNotFound(_))
        ));
        assert!(matches!(
            keys.decrypt(a.key_link, &[]),
            Err(KeysError::KeyGone(_))
        ));
        assert!(keys.key_info(b.key_link).is_ok());
    }

    /// Thousands of keys expiring together (more than one chunk of the walk): every
    /// expired key is purged, the pointer tables of their rotation periods go, and the
    /// pointers a rotation replaced stay.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn purge_of_many_keys_drops_rotated_pointer_tables() {
        const N: usize = 5000;
        let dir = tempfile::tempdir().unwrap();
        let keys = Arc::new(open(dir.path(), Arc::new(MasterKey::generate().unwrap())).unwrap());
        keys.create_stream("s", Some(Seconds(1))).await.unwrap();
        let create = |fields: std::ops::Range<usize>| {
            let tasks: Vec<_> = fields
                .map(|i| {
                    let keys = keys.clone();
                    tokio::spawn(async move { keys.get_or_create("s", &format!("f-{i}")).await })
                })
                .collect();
            async move {
                let mut out = Vec::new();
                for t in tasks {
                    out.push(t.await.unwrap().unwrap());
                }
                out
            }
        };
        let first = create(0..N).await;
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        // Rotated: ten fields get a new key, in a later period.
        let rotated = create(0..10).await;
        // The first keys expire a second after they rotate.
        tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
        let start = keys.counters.purged.load(Ordering::Relaxed);
        let stream = keys.stream("s").unwrap();
        let ksid = stream.record.key_stream_id;
        assert!(first.iter().all(|k| k.rotates_at + 1000 <= now_millis()));
        assert!(keys.current_key_tables()["s"] >= 2);
        // The round's own clock reads at or after `now`: what it left had not rotated.
        let now = now_millis();
        keys.maintain().unwrap();
        assert_eq!(
            keys.counters.purged.load(Ordering::Relaxed) - start,
            N as u64
        );
        // Only the rotated keys' period is left.
        assert!(
            keys.store.periods().iter().all(|p| p.rotated_by() > now
                && p.start >= first.iter().map(|k| k.created_at).max().unwrap()),
            "{:?}",
            keys.store.periods()
        );
        for (i, k) in first.iter().enumerate() {
            let hash = keys.field_hash(ksid, &format!("f-{i}"));
            let pointer = keys.store.current(ksid, &hash, now).unwrap();
            if i < 10 {
                assert_eq!(pointer.unwrap().key_link, rotated[i].key_link, "kept: {i}");
                assert_ne!(rotated[i].key_link, k.key_link);
            } else {
                assert!(pointer.is_none(), "pointer of expired key {i} dropped");
            }
        }
        // The cursor moved past them: the next round has nothing to purge.
        keys.maintain().unwrap();
        assert_eq!(
            keys.counters.purged.load(Ordering::Relaxed) - start,
            N as u64
        );
        // A field whose pointer went gets a new key.
        let again = keys.get_or_create("s", "f-20").await.unwrap();
        assert_ne!(again.key_link, first[20].key_link);
    }

    #[tokio::test]
    async fn stream_rules() {
        let dir = tempfile::tempdir().unwrap();
        let keys = open(dir.path(), Arc::new(MasterKey::generate().unwrap())).unwrap();
        assert!(matches!(
            keys.create_stream("Bad", None).await,
            Err(KeysError::Invalid(_))
        ));
        assert!(matches!(
            keys.create_stream("s", Some(Seconds(0))).await,
            Err(KeysError::Invalid(_))
        ));
        assert!(matches!(
            keys.create_stream("s", Some(Seconds(30 * 86400))).await,
            Err(KeysError::Invalid(_))
        ));
        keys.create_stream("s", None).await.unwrap();
        assert!(matches!(
            keys.create_stream("s", None).await,
            Err(KeysError::StreamExists(_))
        ));
        let k = keys.get_or_create("s", "f").await.unwrap();
        keys.delete_stream("s").await.unwrap();
        assert!(matches!(
            keys.delete_stream("s").await,
            Err(KeysError::StreamNotFound(_))
        ));
        keys.maintain().unwrap();
        assert!(matches!(
            keys.key_info(k.key_link),
            Err(KeysError::KeyNotFound(_))
        ));
        // A new stream of the same name starts afresh.
        keys.create_stream("s", None).await.unwrap();
        let k2 = keys.get_or_create("s", "f").await.unwrap();
        assert_ne!(k.key_link, k2.key_link);
    }
}
