//! One batch exporter at work: its definition and cursor as stored, the batch intent
//! that makes every upload exactly-once, object names and contents, and the task that
//! closes a batch at every interval boundary.
//!
//! A batch goes through three steps, each safe to crash in:
//! 1. *Intent.* At boundary T the task reads the key stream's durable head, picks the
//!    keys created before T from the cursor on, and records a [`BatchIntent`] (range,
//!    retention cutoff, object names) durably before anything is uploaded.
//! 2. *Upload.* The objects are rendered from the key stream and written. A retry (after
//!    a sink error or a crash) renders the same range again: same names, same bytes.
//! 3. *Commit.* The cursor moves past the range and the intent is removed, in one atomic
//!    write. Until then the intent is retried first, before any new batch.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::BackoffBuilder;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;
use zeroize::Zeroizing;

use super::ExportError;
use super::sink::Sink;
use crate::duration::{now_millis, object_time, rfc3339};
pub use crate::keyfile::Format;
use crate::keyfile::ObjectWriter;
use crate::keys::{KeyStream, Keys};
use crate::store::{Store, Table};

/// An exporter's definition as stored.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ExporterDef {
    pub name: String,
    pub stream: String,
    /// The key stream read; a stream deleted and created again under the same name is
    /// another key stream, which this exporter must not mix in.
    pub key_stream_id: Uuid,
    pub interval_secs: u64,
    pub sink_name: String,
    pub path_prefix: String,
    #[serde(default)]
    pub format: Format,
    pub created_at: u64,
}

/// What an exporter has done, as stored.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExporterState {
    /// Sequence number of the first key not yet exported.
    pub cursor: u64,
    pub exported_keys: u64,
    pub last_batch_at: Option<u64>,
    pub last_object: Option<String>,
    /// Boundary (ms) of the last committed batch: a new batch must close later, so that
    /// no two batches share an object name.
    pub last_boundary: u64,
}

/// A batch recorded before its upload; retried until committed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BatchIntent {
    /// The boundary that closed the batch (ms); it names the objects.
    pub boundary: u64,
    /// The batch is the key stream entries `from_seq..=to_seq` (keys already past
    /// retention when it closed are left out by starting after them).
    pub from_seq: u64,
    pub to_seq: u64,
    pub max_keys_per_object: u64,
    pub keys: u64,
    pub objects: Vec<String>,
}

pub fn def_key(name: &str) -> String {
    format!("def/{name}")
}
pub fn state_key(name: &str) -> String {
    format!("state/{name}")
}
pub fn intent_key(name: &str) -> String {
    format!("intent/{name}")
}

/// The names of a batch's objects: one, or `-1`, `-2`, ... when it is split.
pub fn object_names(def: &ExporterDef, boundary: u64, keys: u64, per_object: u64) -> Vec<String> {
    let base = format!(
        "{}/{}-keys-{}---0",
        def.path_prefix,
        object_time(boundary),
        def.key_stream_id
    );
    let ext = def.format.extension();
    let count = keys.div_ceil(per_object.max(1));
    if count <= 1 {
        vec![format!("{base}.{ext}")]
    } else {
        (1..=count).map(|n| format!("{base}-{n}.{ext}")).collect()
    }
}

/// Room reserved per key in an object being rendered: a JSON Lines line of an
/// AES-256-SIV keyset is about 350 bytes, a CSV row a little more.
const BYTES_PER_KEY: usize = 400;

/// What the renderer hands to the upload.
enum Rendered {
    Object(Vec<u8>),
    /// Every object of the batch was rendered; without it the renderer failed.
    Done,
}

/// Renders the objects of a batch on a thread of their own, one object ahead of the
/// upload and at a lower CPU priority: exporting a million keys costs seconds of CPU
/// (reading the key stream, unwrapping and writing each keyset), which must not be
/// taken from the async workers that answer key requests.
fn render_objects(
    keys: Arc<Keys>,
    stream: Arc<KeyStream>,
    intent: BatchIntent,
    format: Format,
) -> mpsc::Receiver<Result<Rendered, ExportError>> {
    let (tx, rx) = mpsc::channel(1);
    let work = move || {
        super::lower_priority();
        let per_object = intent.max_keys_per_object.max(1);
        let mut next = intent.from_seq;
        // Holds one cleartext keyset at a time; zeroized when the thread ends.
        let mut keyset = Zeroizing::new(Vec::new());
        let mut render_one = |next: &mut u64| -> Result<Option<Vec<u8>>, ExportError> {
            // Sized for the keys it will hold (a JSON Lines key is about 350 bytes), so
            // that a large object is not copied while it grows.
            let keys_here = per_object.min((intent.to_seq + 1).saturating_sub(*next));
            let mut object = ObjectWriter::new(format, keys_here as usize * BYTES_PER_KEY);
            let mut n = 0;
            while n < per_object && *next <= intent.to_seq {
                let want = (per_object - n).min(4096) as usize;
                let chunk = keys.read_stream(&stream, *next, intent.to_seq, want)?;
                let Some(last) = chunk.last() else {
                    *next = intent.to_seq + 1;
                    break;
                };
                *next = last.seq + 1;
                for e in &chunk {
                    keyset.clear();
                    keys.write_stream_keyset_json(e, &mut keyset)?;
                    object.push(e.key_link, &keyset);
                }
                n += chunk.len() as u64;
            }
            Ok((n > 0).then(|| object.finish()))
        };
        loop {
            let message = match render_one(&mut next) {
                Ok(Some(bytes)) => Ok(Rendered::Object(bytes)),
                Ok(None) => Ok(Rendered::Done),
                Err(e) => Err(e),
            };
            let last = !matches!(message, Ok(Rendered::Object(_)));
            // A closed channel means the upload gave up (a sink error): stop too.
            if tx.blocking_send(message).is_err() || last {
                return;
            }
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("export-render".into())
        .spawn(work)
    {
        let (tx, rx) = mpsc::channel(1);
        let _ = tx.try_send(Err(ExportError::Internal(format!(
            "cannot start the export renderer: {e}"
        ))));
        return rx;
    }
    rx
}

/// What `GET /v1/batch-exporters/{name}` shows besides the definition.
#[derive(Clone, Debug, Default)]
pub struct Status {
    pub state: ExporterState,
    /// Counted when the status is read.
    pub pending_keys: u64,
    pub last_error: Option<String>,
    pub next_batch_at: Option<u64>,
    /// Objects written and failed batch attempts since the daemon started (metrics).
    pub objects_written: u64,
    pub failed_attempts: u64,
}

impl Status {
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "lastBatchAt": self.state.last_batch_at.map(rfc3339),
            "lastObject": self.state.last_object,
            "exportedKeys": self.state.exported_keys,
            "pendingKeys": self.pending_keys,
            "lastError": self.last_error,
            "nextBatchAt": self.next_batch_at.map(rfc3339),
        })
    }
}

/// The result of a flush: the objects written (none for an empty batch).
pub type FlushReply = Result<Vec<String>, String>;

/// The task of one exporter.
pub struct Runner {
    pub def: ExporterDef,
    pub sink: Sink,
    pub keys: Arc<Keys>,
    pub store: Arc<Store>,
    pub stream: Arc<KeyStream>,
    pub status: Arc<Mutex<Status>>,
    pub max_keys_per_object: u64,
    /// Whether to write the test object when the task starts (daemon start-up); an
    /// exporter just created has written it already.
    pub write_test_object: bool,
}

/// How long to wait before retrying a failed batch: exponential from 1 s, jittered
/// (backon adds up to the delay again), capped at half the interval (at most 30 s) so
/// that a sink that comes back is written to within one interval.
fn backoff(interval: Duration) -> backon::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay((interval / 2).clamp(Duration::from_secs(1), Duration::from_secs(30)))
        .with_jitter()
        .without_max_times()
        .build()
}

impl Runner {
    fn interval_ms(&self) -> u64 {
        self.def.interval_secs * 1000
    }

    fn load<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, ExportError> {
        Ok(self.store.get(Table::Exporters, key)?)
    }

    fn state(&self) -> Result<ExporterState, ExportError> {
        Ok(self.load(&state_key(&self.def.name))?.unwrap_or_default())
    }

    /// Refreshes the status from the stored state.
    fn refresh_status(&self) {
        if let Ok(state) = self.state() {
            self.status.lock().unwrap_or_else(|e| e.into_inner()).state = state;
        }
    }

    fn set_error(&self, error: Option<String>) {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last_error = error;
    }

    /// Closes the batch of keys created before `boundary` (after finishing any recorded
    /// batch first) and uploads it. Returns the objects written.
    pub async fn export_until(&self, boundary: u64) -> Result<Vec<String>, ExportError> {
        let mut written = Vec::new();
        if let Some(intent) = self.load::<BatchIntent>(&intent_key(&self.def.name))? {
            written.extend(self.upload(&intent).await?);
            self.commit(&intent)?;
        }
        if let Some(intent) = self.close_batch(boundary).await? {
            written.extend(self.upload(&intent).await?);
            self.commit(&intent)?;
        }
        Ok(written)
    }

    /// Step 1: records the intent of the batch closed at `boundary`, durably. The batch
    /// is every durable key from the cursor on created before `boundary`, less those
    /// already past retention; both ends are found by binary search (a key stream is
    /// in creation order), so closing a batch reads a few entries, not all of them.
    async fn close_batch(&self, boundary: u64) -> Result<Option<BatchIntent>, ExportError> {
        let mut state = self.state()?;
        if boundary <= state.last_boundary {
            return Ok(None);
        }
        let Some(head) = self.keys.durable_head(&self.stream).await? else {
            return Ok(None);
        };
        let oldest = self.keys.oldest_seq(&self.stream)?.unwrap_or(0);
        let from = state.cursor.max(oldest);
        let end = self
            .keys
            .first_created_at_or_after(&self.stream, from, head, boundary)?;
        if end <= from {
            return Ok(None);
        }
        let to = end - 1;
        let cutoff = self.keys.retention_cutoff(now_millis());
        let first = self
            .keys
            .first_created_at_or_after(&self.stream, from, to, cutoff)?;
        if first > to {
            // Only keys past retention: they are never exported; skip them.
            state.cursor = to + 1;
            self.store
                .put(Table::Exporters, &state_key(&self.def.name), &state)?;
            return Ok(None);
        }
        let count = to - first + 1;
        let intent = BatchIntent {
            boundary,
            from_seq: first,
            to_seq: to,
            max_keys_per_object: self.max_keys_per_object,
            keys: count,
            objects: object_names(&self.def, boundary, count, self.max_keys_per_object),
        };
        self.store
            .put(Table::Exporters, &intent_key(&self.def.name), &intent)?;
        self.store.sync().await?;
        Ok(Some(intent))
    }

    /// Step 2: renders and writes the objects of `intent`, in order.
    async fn upload(&self, intent: &BatchIntent) -> Result<Vec<String>, ExportError> {
        let started = std::time::Instant::now();
        let mut rendered = render_objects(
            self.keys.clone(),
            self.stream.clone(),
            intent.clone(),
            self.def.format,
        );
        let mut names = intent.objects.iter();
        let mut written = Vec::new();
        let mut bytes_total = 0usize;
        loop {
            let bytes = match rendered.recv().await {
                Some(Ok(Rendered::Object(bytes))) => bytes,
                Some(Ok(Rendered::Done)) => break,
                Some(Err(e)) => return Err(e),
                None => {
                    return Err(ExportError::Internal(format!(
                        "exporter '{}': the export renderer stopped before the end of the batch",
                        self.def.name
                    )));
                }
            };
            let Some(name) = names.next() else {
                return Err(ExportError::Internal(format!(
                    "exporter '{}': the batch closed at {} holds more keys than recorded",
                    self.def.name,
                    object_time(intent.boundary)
                )));
            };
            bytes_total += bytes.len();
            self.sink.put(name, bytes).await?;
            written.push(name.clone());
        }
        log::info!(
            "exporter '{}': uploaded {} keys in {} object(s), {} bytes, {:?}, last {}",
            self.def.name,
            intent.keys,
            written.len(),
            bytes_total,
            started.elapsed(),
            written.last().map_or("-", String::as_str)
        );
        fault_point("crash-after-upload");
        Ok(written)
    }

    /// Step 3: moves the cursor past the batch and forgets the intent, atomically.
    fn commit(&self, intent: &BatchIntent) -> Result<(), ExportError> {
        let mut state = self.state()?;
        state.cursor = intent.to_seq + 1;
        state.exported_keys += intent.keys;
        state.last_batch_at = Some(now_millis());
        state.last_object = intent.objects.last().cloned();
        state.last_boundary = intent.boundary;
        self.store.apply(
            Table::Exporters,
            vec![
                (
                    state_key(&self.def.name),
                    Some(serde_json::to_vec(&state).expect("state serializes")),
                ),
                (intent_key(&self.def.name), None),
            ],
        )?;
        self.status.lock().unwrap_or_else(|e| e.into_inner()).state = state;
        Ok(())
    }

    /// The boundary a flush or the final batch closes: the next whole second (so that
    /// the name's time covers every key created so far), after the last boundary.
    async fn flush_boundary(&self) -> Result<u64, ExportError> {
        let last = self.state()?.last_boundary;
        let now = now_millis();
        let boundary = ((now / 1000) + 1) * 1000;
        let boundary = boundary.max(last + 1000);
        tokio::time::sleep(Duration::from_millis(boundary.saturating_sub(now))).await;
        Ok(boundary)
    }

    fn next_boundary(&self, now: u64) -> u64 {
        (now / self.interval_ms() + 1) * self.interval_ms()
    }

    /// Runs until `cancel` (the exporter was deleted) or `stop` (the daemon stops: one
    /// last batch first).
    pub async fn run(
        self,
        mut flushes: mpsc::Receiver<oneshot::Sender<FlushReply>>,
        mut cancel: watch::Receiver<bool>,
        mut stop: watch::Receiver<bool>,
    ) {
        if self.write_test_object {
            match self.sink.write_test_object(&self.def.path_prefix).await {
                Ok(name) => log::info!("exporter '{}': wrote test object {name}", self.def.name),
                Err(e) => {
                    log::error!("exporter '{}': {e}", self.def.name);
                    self.set_error(Some(e.to_string()));
                }
            }
        }
        let mut retry: Option<(backon::ExponentialBackoff, u64)> = None;
        // A batch recorded before a crash is finished at once.
        let mut wake_at = if self
            .load::<BatchIntent>(&intent_key(&self.def.name))
            .ok()
            .flatten()
            .is_some()
        {
            now_millis()
        } else {
            self.next_boundary(now_millis())
        };
        loop {
            self.refresh_status();
            self.status
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .next_batch_at = Some(wake_at);
            let sleep = Duration::from_millis(wake_at.saturating_sub(now_millis()));
            let result = tokio::select! {
                _ = tokio::time::sleep(sleep) => {
                    // The latest boundary that has passed (a retry may come late).
                    let boundary = now_millis() / self.interval_ms() * self.interval_ms();
                    self.export_until(boundary).await
                }
                Some(reply) = flushes.recv() => {
                    let result = match self.flush_boundary().await {
                        Ok(b) => self.export_until(b).await,
                        Err(e) => Err(e),
                    };
                    let _ = reply.send(result.as_ref().map(Clone::clone).map_err(ToString::to_string));
                    result
                }
                _ = until_set(&mut cancel) => return,
                _ = until_set(&mut stop) => {
                    let result = match self.flush_boundary().await {
                        Ok(b) => self.export_until(b).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = result {
                        log::error!(
                            "exporter '{}': last batch before shutdown failed ({e}); it stays \
                             recorded and is retried at the next start",
                            self.def.name
                        );
                    }
                    return;
                }
            };
            match result {
                Ok(objects) => {
                    self.status
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .objects_written += objects.len() as u64;
                    self.set_error(None);
                    retry = None;
                    wake_at = self.next_boundary(now_millis());
                }
                Err(e) => {
                    let (policy, attempt) = retry.get_or_insert_with(|| {
                        (backoff(Duration::from_secs(self.def.interval_secs)), 0)
                    });
                    *attempt += 1;
                    let delay = policy.next().unwrap_or(Duration::from_secs(60));
                    wake_at = now_millis() + delay.as_millis() as u64;
                    log::warn!(
                        "exporter '{}': batch failed (attempt {attempt}), retrying at {}: {e}",
                        self.def.name,
                        rfc3339(wake_at)
                    );
                    self.set_error(Some(format!("{}: {e}", rfc3339(now_millis()))));
                    self.status
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .failed_attempts += 1;
                }
            }
        }
    }
}

/// Resolves once the flag is set; never, if its sender is gone without setting it.
async fn until_set(flag: &mut watch::Receiver<bool>) {
    if flag.wait_for(|set| *set).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Test-only fault injection (debug builds): `KEYEXPORTD_FAULT=<point>` aborts the
/// process at that point, as a `kill -9` would.
fn fault_point(point: &str) {
    if cfg!(debug_assertions) && std::env::var("KEYEXPORTD_FAULT").is_ok_and(|f| f == point) {
        eprintln!("KEYEXPORTD_FAULT: aborting at {point}");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(format: Format) -> ExporterDef {
        ExporterDef {
            name: "e".into(),
            stream: "s".into(),
            key_stream_id: Uuid::parse_str("3b398d5c-2d7c-4673-9f73-3693e137ddbb").unwrap(),
            interval_secs: 30,
            sink_name: "local".into(),
            path_prefix: "stream-machine-keys".into(),
            format,
            created_at: 0,
        }
    }

    #[test]
    fn names_follow_the_contract() {
        let t = 1_620_137_610_000; // 2021-05-04T14:13:30Z
        assert_eq!(
            object_names(&def(Format::Jsonl), t, 5, 100),
            vec![
                "stream-machine-keys/2021-05-04T14:13:30-keys-3b398d5c-2d7c-4673-9f73-3693e137ddbb---0.jsonl"
            ]
        );
        let split = object_names(&def(Format::Csv), t, 250, 100);
        assert_eq!(split.len(), 3);
        assert!(split[0].ends_with("---0-1.csv"), "{}", split[0]);
        assert!(split[2].ends_with("---0-3.csv"));
        assert_eq!(object_names(&def(Format::Jsonl), t, 100, 100).len(), 1);
    }
}
