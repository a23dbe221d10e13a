//! Exporting key streams: sinks, batch exporter definitions, and one task per exporter.
//!
//! [`Exporters`] owns the sink and exporter records (tree `sinks` and `exporters`), the
//! running tasks, and the rules that tie them to streams: an exporter needs its stream
//! and its sink, so neither can be deleted while one uses it (409). Creation, deletion
//! and the stream deletion that must check exporters are serialised by one admin lock.
//!
//! The exporter tasks run on a runtime of their own ([`ExportRuntime`]): one worker
//! thread, and blocking threads for local writes, all at a lower CPU priority. An
//! upload is CPU work too (an S3 upload hashes the whole object to sign it, a local one
//! copies it into the page cache, both free tens of megabytes afterwards); on the API's
//! workers it would hold up the key requests queued behind it.

pub mod batch;
pub mod sink;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::crypto::MasterKey;
use crate::duration::{Seconds, now_millis};
use crate::keys::{Keys, KeysError};
use crate::store::{Store, StoreError, Table};
use batch::{ExporterDef, ExporterState, FlushReply, Format, Runner, Status};
use sink::{Sink, SinkError, SinkRecord};

/// Name of the sink every new data directory starts with.
pub const DEFAULT_SINK: &str = "local";
const META_DEFAULT_SINK_CREATED: &[u8] = b"default_sink_created";

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(
        "key export is not allowed for this account: set account.key_export_allowed = true \
         in the config to create batch exporters"
    )]
    NotAllowed,
    #[error("{0}")]
    Invalid(String),
    #[error("{kind} '{name}' not found")]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} '{name}' already exists")]
    Exists { kind: &'static str, name: String },
    #[error("{0}")]
    InUse(String),
    /// The sink rejected the test object of a new exporter; the message says why.
    #[error("{0}")]
    SinkTest(String),
    /// A sink rejected a batch; the message says why.
    #[error("{0}")]
    Sink(String),
    #[error("{0}")]
    Internal(String),
    #[error(transparent)]
    Keys(#[from] KeysError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<SinkError> for ExportError {
    fn from(e: SinkError) -> Self {
        match e {
            SinkError::Invalid(m) => ExportError::Invalid(m),
            SinkError::Write(m) => ExportError::Sink(m),
        }
    }
}

type Result<T> = std::result::Result<T, ExportError>;

/// Settings from `[export]` and `[account]` of the config.
#[derive(Clone, Debug)]
pub struct ExportSettings {
    pub key_export_allowed: bool,
    pub min_interval: Seconds,
    pub max_keys_per_object: u64,
}

/// A request to create an exporter, as validated input.
#[derive(Clone, Debug, Default)]
pub struct NewExporter {
    pub name: Option<String>,
    pub stream: String,
    pub sink: Option<String>,
    pub interval: Option<Seconds>,
    pub path_prefix: String,
    pub format: Format,
    pub include_existing_keys: bool,
}

/// A request to create a sink.
pub enum NewSink {
    S3 {
        name: String,
        bucket: sink::BucketSpec,
        credentials: Option<sink::Credentials>,
    },
    Local {
        name: String,
        path: String,
    },
}

/// The runtime the exporter tasks run on, apart from the API's.
pub struct ExportRuntime {
    /// Taken at drop: a runtime may not be dropped in async context, so it is shut
    /// down in the background.
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
}

impl ExportRuntime {
    pub fn new() -> Result<ExportRuntime> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(4)
            .thread_name("export")
            .on_thread_start(lower_priority)
            .enable_all()
            .build()
            .map_err(|e| ExportError::Internal(format!("cannot start the export runtime: {e}")))?;
        let handle = runtime.handle().clone();
        Ok(ExportRuntime {
            runtime: Mutex::new(Some(runtime)),
            handle,
        })
    }

    fn spawn<F>(&self, task: F) -> JoinHandle<()>
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.handle.spawn(task)
    }
}

impl Drop for ExportRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self
            .runtime
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            rt.shutdown_background();
        }
    }
}

/// Lowers the calling thread's CPU priority (nice 10), best effort: the thread keeps
/// all the CPU it wants while the daemon is otherwise idle, and yields it to the
/// threads that answer requests when they need it.
pub(crate) fn lower_priority() {
    // SAFETY: on Linux, setpriority with who = 0 changes only the calling thread.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS as _, 0, 10);
    }
}

/// A running exporter.
struct Handle {
    def: ExporterDef,
    /// Read for `pendingKeys`; None when the exporter could not start.
    stream: Option<Arc<crate::keys::KeyStream>>,
    status: Arc<Mutex<Status>>,
    flush: mpsc::Sender<oneshot::Sender<FlushReply>>,
    cancel: watch::Sender<bool>,
    task: JoinHandle<()>,
}

pub struct Exporters {
    store: Arc<Store>,
    keys: Arc<Keys>,
    master: Arc<MasterKey>,
    settings: ExportSettings,
    /// Serialises creations and deletions of sinks, exporters and streams.
    admin: tokio::sync::Mutex<()>,
    running: Mutex<HashMap<String, Handle>>,
    /// Tells every task to close its last batch and stop.
    stop: watch::Sender<bool>,
    runtime: ExportRuntime,
}

/// `pathPrefix`: at most 900 characters, relative, no `.`/`..`/empty segment, no
/// trailing `/`.
pub fn validate_prefix(prefix: &str) -> Result<()> {
    let bad = |why: &str| Err(ExportError::Invalid(format!("pathPrefix '{prefix}' {why}")));
    if prefix.is_empty() {
        return bad("must not be empty");
    }
    if prefix.len() > 900 {
        return bad("is longer than 900 characters");
    }
    if prefix.starts_with('/') {
        return bad("must not start with '/'");
    }
    if prefix.ends_with('/') {
        return bad("must not end with '/'");
    }
    for segment in prefix.split('/') {
        match segment {
            "." | ".." => return bad("must not contain '.' or '..' segments"),
            "" => return bad("must not contain empty segments ('//')"),
            _ => {}
        }
    }
    if prefix.chars().any(|c| c.is_control() || c == '\\') {
        return bad("must not contain control characters or '\\'");
    }
    object_store::path::Path::parse(prefix)
        .map_err(|e| ExportError::Invalid(format!("pathPrefix '{prefix}': {e}")))?;
    Ok(())
}

impl Exporters {
    /// Loads sinks and exporters, creates the default local sink for a new data
    /// directory, and starts every exporter (each writes its test object).
    pub fn open(
        store: Arc<Store>,
        keys: Arc<Keys>,
        master: Arc<MasterKey>,
        settings: ExportSettings,
        data_dir: &std::path::Path,
    ) -> Result<Arc<Exporters>> {
        let (stop, _) = watch::channel(false);
        let exporters = Arc::new(Exporters {
            store,
            keys,
            master,
            settings,
            admin: tokio::sync::Mutex::new(()),
            running: Mutex::new(HashMap::new()),
            stop,
            runtime: ExportRuntime::new()?,
        });
        if exporters
            .store
            .get_raw(Table::Meta, META_DEFAULT_SINK_CREATED)?
            .is_none()
        {
            let dir = std::path::absolute(data_dir.join("export"))
                .map_err(|e| ExportError::Internal(format!("data directory: {e}")))?;
            let record = SinkRecord::new_local(DEFAULT_SINK, &dir.to_string_lossy(), now_millis())?;
            exporters
                .store
                .insert_new(Table::Sinks, DEFAULT_SINK, &record)?;
            exporters
                .store
                .put_raw(Table::Meta, META_DEFAULT_SINK_CREATED, b"1")?;
            log::info!(
                "created the default sink '{DEFAULT_SINK}' -> {}",
                dir.display()
            );
        }
        for (_, def) in exporters
            .store
            .list::<ExporterDef>(Table::Exporters, "def/")?
        {
            if let Err(e) = exporters.start(def.clone(), true) {
                log::error!("exporter '{}' cannot start: {e}", def.name);
                exporters.register_stopped(def, e.to_string());
            }
        }
        Ok(exporters)
    }

    pub fn settings(&self) -> &ExportSettings {
        &self.settings
    }

    fn sink_record(&self, name: &str) -> Result<SinkRecord> {
        self.store
            .get(Table::Sinks, name)?
            .ok_or_else(|| ExportError::NotFound {
                kind: "sink",
                name: name.to_string(),
            })
    }

    /// Starts the task of `def`.
    fn start(self: &Arc<Self>, def: ExporterDef, write_test_object: bool) -> Result<()> {
        let stream = self.keys.stream(&def.stream)?;
        if stream.record.key_stream_id != def.key_stream_id {
            return Err(ExportError::Internal(format!(
                "exporter '{}' reads a key stream that no longer exists",
                def.name
            )));
        }
        let sink = Sink::open(&self.sink_record(&def.sink_name)?, &self.master)?;
        let status = Arc::new(Mutex::new(Status::default()));
        let (flush_tx, flush_rx) = mpsc::channel(4);
        let (cancel_tx, cancel_rx) = watch::channel(false);
        let runner = Runner {
            def: def.clone(),
            sink,
            keys: self.keys.clone(),
            store: self.store.clone(),
            stream: stream.clone(),
            status: status.clone(),
            max_keys_per_object: self.settings.max_keys_per_object,
            write_test_object,
        };
        let task = self
            .runtime
            .spawn(runner.run(flush_rx, cancel_rx, self.stop.subscribe()));
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                def.name.clone(),
                Handle {
                    def,
                    stream: Some(stream),
                    status,
                    flush: flush_tx,
                    cancel: cancel_tx,
                    task,
                },
            );
        Ok(())
    }

    /// Keeps an exporter that cannot run visible, with the reason in its status.
    fn register_stopped(&self, def: ExporterDef, error: String) {
        let status = Status {
            last_error: Some(error),
            ..Default::default()
        };
        let (flush, _) = mpsc::channel(1);
        let (cancel, _) = watch::channel(false);
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                def.name.clone(),
                Handle {
                    def,
                    stream: None,
                    status: Arc::new(Mutex::new(status)),
                    flush,
                    cancel,
                    task: self.runtime.spawn(async {}),
                },
            );
    }

    // --- sinks -----------------------------------------------------------------------

    pub async fn create_sink(&self, new: NewSink) -> Result<SinkRecord> {
        let record = match new {
            NewSink::S3 {
                name,
                bucket,
                credentials,
            } => SinkRecord::new_s3(&name, bucket, credentials, &self.master, now_millis())?,
            NewSink::Local { name, path } => SinkRecord::new_local(&name, &path, now_millis())?,
        };
        let _admin = self.admin.lock().await;
        // Building the client validates what the record alone cannot.
        Sink::open(&record, &self.master)?;
        if !self.store.insert_new(Table::Sinks, &record.name, &record)? {
            return Err(ExportError::Exists {
                kind: "sink",
                name: record.name,
            });
        }
        self.store.sync().await?;
        Ok(record)
    }

    pub fn sinks(&self) -> Result<Vec<SinkRecord>> {
        Ok(self
            .store
            .list::<SinkRecord>(Table::Sinks, "")?
            .into_iter()
            .map(|(_, s)| s)
            .collect())
    }

    pub fn sink(&self, name: &str) -> Result<SinkRecord> {
        self.sink_record(name)
    }

    pub async fn delete_sink(&self, name: &str) -> Result<()> {
        let _admin = self.admin.lock().await;
        self.sink_record(name)?;
        let users: Vec<String> = self
            .definitions()
            .into_iter()
            .filter(|d| d.sink_name == name)
            .map(|d| d.name)
            .collect();
        if !users.is_empty() {
            return Err(ExportError::InUse(format!(
                "sink '{name}' is used by batch exporter(s) {}; delete them first",
                users.join(", ")
            )));
        }
        self.store.remove(Table::Sinks, name)?;
        self.store.sync().await?;
        Ok(())
    }

    // --- streams ---------------------------------------------------------------------

    /// Deletes a stream unless an exporter reads it.
    pub async fn delete_stream(&self, name: &str) -> Result<()> {
        let _admin = self.admin.lock().await;
        self.keys.stream(name)?;
        let users: Vec<String> = self
            .definitions()
            .into_iter()
            .filter(|d| d.stream == name)
            .map(|d| d.name)
            .collect();
        if !users.is_empty() {
            return Err(ExportError::InUse(format!(
                "stream '{name}' is exported by batch exporter(s) {}; delete them first",
                users.join(", ")
            )));
        }
        self.keys.delete_stream(name).await?;
        Ok(())
    }

    // --- exporters -------------------------------------------------------------------

    fn definitions(&self) -> Vec<ExporterDef> {
        let mut defs: Vec<ExporterDef> = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|h| h.def.clone())
            .collect();
        defs.sort_by(|a, b| a.name.cmp(&b.name));
        defs
    }

    /// The status of a running exporter, with `pendingKeys` counted now.
    fn status_of(&self, h: &Handle) -> Status {
        let mut status = h.status.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(stream) = &h.stream {
            let oldest = self.keys.oldest_seq(stream).ok().flatten().unwrap_or(0);
            status.pending_keys = self
                .keys
                .next_seq(stream)
                .saturating_sub(status.state.cursor.max(oldest));
        }
        status
    }

    /// Every exporter with its status.
    pub fn list(&self) -> Vec<(ExporterDef, Status)> {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<(ExporterDef, Status)> = running
            .values()
            .map(|h| (h.def.clone(), self.status_of(h)))
            .collect();
        out.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        out
    }

    pub fn get(&self, name: &str) -> Result<(ExporterDef, Status)> {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let h = running.get(name).ok_or_else(|| ExportError::NotFound {
            kind: "batch exporter",
            name: name.to_string(),
        })?;
        Ok((h.def.clone(), self.status_of(h)))
    }

    /// Validates, writes the sink's test object, stores the exporter and starts it.
    pub async fn create(self: &Arc<Self>, req: NewExporter) -> Result<ExporterDef> {
        if !self.settings.key_export_allowed {
            return Err(ExportError::NotAllowed);
        }
        let _admin = self.admin.lock().await;
        let stream = self.keys.stream(&req.stream)?;
        let sink_name = match req.sink {
            Some(s) => s,
            None => {
                let sinks = self.sinks()?;
                match sinks.as_slice() {
                    [only] => only.name.clone(),
                    [] => {
                        return Err(ExportError::Invalid(
                            "there is no sink: create one first (POST /v1/sinks)".into(),
                        ));
                    }
                    _ => {
                        return Err(ExportError::Invalid(format!(
                            "sinkName is required when there are several sinks ({})",
                            sinks
                                .iter()
                                .map(|s| s.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )));
                    }
                }
            }
        };
        let record = self.sink_record(&sink_name)?;
        let interval = req.interval.unwrap_or(Seconds(60));
        let min = self.settings.min_interval;
        if interval < min || interval.0 > 3600 {
            return Err(ExportError::Invalid(format!(
                "interval {interval} is outside {min} to 3600s (export.min_interval is {min})"
            )));
        }
        validate_prefix(&req.path_prefix)?;
        let name = req
            .name
            .unwrap_or_else(|| format!("{sink_name}-{}-keys", req.stream));
        crate::names::validate("batch exporter", &name).map_err(ExportError::Invalid)?;
        if self
            .store
            .get_raw(Table::Exporters, batch::def_key(&name).as_bytes())?
            .is_some()
        {
            return Err(ExportError::Exists {
                kind: "batch exporter",
                name,
            });
        }
        let sink = Sink::open(&record, &self.master)?;
        let test = sink
            .write_test_object(&req.path_prefix)
            .await
            .map_err(|e| ExportError::SinkTest(e.to_string()))?;
        log::info!("exporter '{name}': wrote test object {test} to sink '{sink_name}'");
        let cursor = if req.include_existing_keys {
            self.keys.oldest_seq(&stream)?.unwrap_or(0)
        } else {
            self.keys.durable_head(&stream).await?.map_or(0, |h| h + 1)
        };
        let def = ExporterDef {
            name: name.clone(),
            stream: req.stream,
            key_stream_id: stream.record.key_stream_id,
            interval_secs: interval.0,
            sink_name,
            path_prefix: req.path_prefix,
            format: req.format,
            created_at: now_millis(),
        };
        let state = ExporterState {
            cursor,
            ..Default::default()
        };
        self.store.apply(
            Table::Exporters,
            vec![
                (
                    batch::def_key(&name),
                    Some(serde_json::to_vec(&def).expect("definitions serialize")),
                ),
                (
                    batch::state_key(&name),
                    Some(serde_json::to_vec(&state).expect("states serialize")),
                ),
            ],
        )?;
        self.store.sync().await?;
        self.start(def.clone(), false)?;
        Ok(def)
    }

    pub async fn delete(&self, name: &str) -> Result<()> {
        let _admin = self.admin.lock().await;
        let handle = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
            .ok_or_else(|| ExportError::NotFound {
                kind: "batch exporter",
                name: name.to_string(),
            })?;
        let _ = handle.cancel.send(true);
        let _ = handle.task.await;
        self.store.apply(
            Table::Exporters,
            vec![
                (batch::def_key(name), None),
                (batch::state_key(name), None),
                (batch::intent_key(name), None),
            ],
        )?;
        self.store.sync().await?;
        Ok(())
    }

    /// Closes and uploads the exporter's current batch now; the objects written.
    pub async fn flush(&self, name: &str) -> Result<Vec<String>> {
        let sender = {
            let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            running
                .get(name)
                .ok_or_else(|| ExportError::NotFound {
                    kind: "batch exporter",
                    name: name.to_string(),
                })?
                .flush
                .clone()
        };
        let (tx, rx) = oneshot::channel();
        sender
            .send(tx)
            .await
            .map_err(|_| ExportError::Internal("the exporter task has stopped".into()))?;
        rx.await
            .map_err(|_| ExportError::Internal("the exporter task has stopped".into()))?
            .map_err(ExportError::Sink)
    }

    /// Lets every exporter close and upload its last batch, waiting at most `timeout`.
    pub async fn shutdown(&self, timeout: Duration) {
        let _ = self.stop.send(true);
        // The handles stay alive (their cancel senders too) until the tasks are done.
        let handles: Vec<(String, Handle)> = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        let deadline = tokio::time::Instant::now() + timeout;
        for (name, mut handle) in handles {
            if tokio::time::timeout_at(deadline, &mut handle.task)
                .await
                .is_err()
            {
                log::warn!(
                    "exporter '{name}' did not finish its last batch within \
                     export.shutdown_timeout; it is recorded and retried at the next start"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        for ok in ["stream-machine-keys", "a/b/c", "keys_2026.v1"] {
            validate_prefix(ok).unwrap();
        }
        for bad in ["", "/p", "p/", ".", "..", "../x", "a/../b", "a//b", "a/./b"] {
            assert!(validate_prefix(bad).is_err(), "{bad}");
        }
        assert!(validate_prefix(&"a".repeat(901)).is_err());
        assert!(validate_prefix(&"a".repeat(900)).is_ok());
    }
}
