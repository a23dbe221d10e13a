//! Sinks: where exported objects go. Both kinds sit behind `object_store`'s one trait:
//! `S3` (any S3-compatible endpoint, static credentials or the standard AWS chain) and
//! `LOCAL` (a directory; object `P/N` lands at `<path>/P/N`).
//!
//! This module owns the sink definitions as stored (credentials wrapped by the master
//! key, never serialised in clear), building a client from one, writing an object, and
//! turning the store's failures into messages an operator can act on (bucket missing,
//! access denied, endpoint unreachable). It knows nothing of batches.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::MasterKey;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SinkType {
    S3,
    #[serde(rename = "LOCAL")]
    Local,
}

/// S3 bucket settings, as the API shows them (never with credentials).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BucketSpec {
    pub bucket_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub path_style: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalSpec {
    pub path: String,
}

/// Static S3 credentials in clear; only ever held in memory, zeroized on drop.
pub struct Credentials {
    pub access_key_id: Zeroizing<String>,
    pub secret_access_key: Zeroizing<String>,
    pub session_token: Option<Zeroizing<String>>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredCredentials {
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
}

impl Drop for StoredCredentials {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.access_key_id.zeroize();
        self.secret_access_key.zeroize();
        self.session_token.zeroize();
    }
}

/// A sink as stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SinkRecord {
    pub name: String,
    pub sink_type: SinkType,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bucket: Option<BucketSpec>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalSpec>,
    /// Credentials JSON wrapped by the master key (base64); None: the AWS chain applies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wrapped_credentials: Option<String>,
    pub created_at: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The definition is not usable (validation).
    #[error("{0}")]
    Invalid(String),
    /// A write failed; the message is already classified for operators.
    #[error("{0}")]
    Write(String),
}

fn ad_for(name: &str) -> Vec<u8> {
    format!("keyexportd/sink-credentials/{name}").into_bytes()
}

/// An S3 bucket name by the AWS rules that matter for addressing.
fn validate_bucket(name: &str) -> Result<(), SinkError> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    if !(3..=63).contains(&name.len()) || !ok_chars || name.starts_with(['-', '.']) {
        return Err(SinkError::Invalid(format!(
            "bucket.bucketName '{name}' is not a valid S3 bucket name (3 to 63 characters of \
             a-z, 0-9, '-', '.')"
        )));
    }
    Ok(())
}

impl SinkRecord {
    /// Validates a new S3 sink and wraps its credentials.
    pub fn new_s3(
        name: &str,
        bucket: BucketSpec,
        credentials: Option<Credentials>,
        master: &MasterKey,
        now: u64,
    ) -> Result<SinkRecord, SinkError> {
        crate::names::validate("sink", name).map_err(SinkError::Invalid)?;
        validate_bucket(&bucket.bucket_name)?;
        if let Some(endpoint) = &bucket.endpoint {
            let url = reqwest::Url::parse(endpoint).map_err(|e| {
                SinkError::Invalid(format!("bucket.endpoint '{endpoint}' is not a URL ({e})"))
            })?;
            if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                return Err(SinkError::Invalid(format!(
                    "bucket.endpoint '{endpoint}' must be an http:// or https:// URL"
                )));
            }
        }
        if let Some(region) = &bucket.region
            && (region.is_empty()
                || !region
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-'))
        {
            return Err(SinkError::Invalid(format!(
                "bucket.region '{region}' is not a region name (e.g. us-east-1)"
            )));
        }
        let wrapped_credentials = match credentials {
            None => None,
            Some(c) => {
                if c.access_key_id.is_empty() || c.secret_access_key.is_empty() {
                    return Err(SinkError::Invalid(
                        "credentials need both accessKeyId and secretAccessKey".into(),
                    ));
                }
                let stored = Zeroizing::new(
                    serde_json::to_vec(&StoredCredentials {
                        access_key_id: c.access_key_id.to_string(),
                        secret_access_key: c.secret_access_key.to_string(),
                        session_token: c.session_token.as_ref().map(|t| t.to_string()),
                    })
                    .expect("credentials serialize"),
                );
                let wrapped = master
                    .wrap(&stored, &ad_for(name))
                    .map_err(|e| SinkError::Invalid(e.to_string()))?;
                Some(STANDARD.encode(wrapped))
            }
        };
        Ok(SinkRecord {
            name: name.to_string(),
            sink_type: SinkType::S3,
            bucket: Some(bucket),
            local: None,
            wrapped_credentials,
            created_at: now,
        })
    }

    /// Validates a new local-directory sink.
    pub fn new_local(name: &str, path: &str, now: u64) -> Result<SinkRecord, SinkError> {
        crate::names::validate("sink", name).map_err(SinkError::Invalid)?;
        if !path.starts_with('/') {
            return Err(SinkError::Invalid(format!(
                "local.path '{path}' must be an absolute path"
            )));
        }
        Ok(SinkRecord {
            name: name.to_string(),
            sink_type: SinkType::Local,
            bucket: None,
            local: Some(LocalSpec {
                path: path.to_string(),
            }),
            wrapped_credentials: None,
            created_at: now,
        })
    }

    /// The sink as the API shows it: no credentials, only whether there are some.
    pub fn view(&self) -> serde_json::Value {
        let mut v = serde_json::json!({"name": self.name, "sinkType": self.sink_type});
        if let Some(b) = &self.bucket {
            let mut bucket = serde_json::to_value(b).expect("bucket serializes");
            bucket["credentials"] = if self.wrapped_credentials.is_some() {
                serde_json::json!("static (write-only)")
            } else {
                serde_json::json!("AWS default chain")
            };
            v["bucket"] = bucket;
        }
        if let Some(l) = &self.local {
            v["local"] = serde_json::to_value(l).expect("local serializes");
        }
        v
    }

    /// Where objects land, for messages: `s3://bucket` or the directory.
    pub fn location(&self) -> String {
        match (&self.bucket, &self.local) {
            (Some(b), _) => format!("s3://{}", b.bucket_name),
            (_, Some(l)) => l.path.clone(),
            _ => String::from("?"),
        }
    }
}

/// An S3 client for `bucket`: static credentials, or the standard AWS chain.
pub fn s3_client(
    bucket: &BucketSpec,
    credentials: Option<&Credentials>,
) -> Result<Arc<dyn ObjectStore>, String> {
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(&bucket.bucket_name)
        .with_region(bucket.region.clone().unwrap_or_else(|| "us-east-1".into()))
        .with_virtual_hosted_style_request(!bucket.path_style)
        // The exporter retries whole batches with its own backoff; keep the client's
        // retries short so that errors surface in status quickly.
        .with_retry(RetryConfig {
            max_retries: 2,
            retry_timeout: Duration::from_secs(15),
            ..Default::default()
        })
        .with_client_options(
            ClientOptions::new()
                .with_connect_timeout(Duration::from_secs(5))
                .with_timeout(Duration::from_secs(300)),
        );
    if let Some(endpoint) = &bucket.endpoint {
        builder = builder
            .with_endpoint(endpoint)
            .with_allow_http(endpoint.starts_with("http://"));
    }
    if let Some(c) = credentials {
        builder = builder
            .with_access_key_id(c.access_key_id.as_str())
            .with_secret_access_key(c.secret_access_key.as_str());
        if let Some(t) = &c.session_token {
            builder = builder.with_token(t.as_str());
        }
    }
    Ok(Arc::new(
        builder.build().map_err(|e| scrub(&e.to_string()))?,
    ))
}

/// Every object name under `prefix` (all of the store when empty), sorted.
pub async fn list_objects(store: &dyn ObjectStore, prefix: &str) -> Result<Vec<String>, String> {
    use futures_util::TryStreamExt;
    let prefix = if prefix.is_empty() {
        None
    } else {
        Some(ObjectPath::parse(prefix).map_err(|e| format!("prefix '{prefix}': {e}"))?)
    };
    let mut names: Vec<String> = store
        .list(prefix.as_ref())
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .map_err(|e| scrub(&e.to_string()))?;
    names.sort();
    Ok(names)
}

/// The bytes of one object.
pub async fn read_object(store: &dyn ObjectStore, name: &str) -> Result<Vec<u8>, String> {
    let path = ObjectPath::parse(name).map_err(|e| format!("'{name}': {e}"))?;
    let got = store.get(&path).await.map_err(|e| scrub(&e.to_string()))?;
    Ok(got
        .bytes()
        .await
        .map_err(|e| scrub(&e.to_string()))?
        .to_vec())
}

/// A client for one sink.
#[derive(Clone)]
pub struct Sink {
    pub name: String,
    location: String,
    target: Arc<Target>,
}

/// Where a sink writes.
enum Target {
    S3(Arc<dyn ObjectStore>),
    /// A directory. object_store names the files (so that its listing, which the owner's
    /// tools use, reads them back), the daemon writes them: see [`write_durably`].
    Local {
        root: std::path::PathBuf,
        files: LocalFileSystem,
    },
}

/// How much of a local object is written before waiting for the disk to take it.
const LOCAL_CHUNK_BYTES: usize = 1 << 20;

/// Writes a local object so that it is on disk before the call returns (the exporter
/// moves its cursor past the object's keys next; a power cut must not lose them):
/// a staging file `<name>#<n>` (object_store's listing skips such names), written a
/// chunk at a time with each chunk's writeback waited for, then fsync, rename into
/// place, and fsync of the directories from the sink's root down.
///
/// Waiting chunk by chunk keeps little of the object dirty at any time. On ext4
/// (data=ordered) every fsync of the database commits the journal, which first writes
/// out the data blocks allocated since the last commit: with a whole 35 MB object dirty,
/// the key requests waiting for their group commit waited for it too (p99 of key
/// creation during a local export 16-29 ms against 2.5 ms idle, see BENCHMARKS.md).
fn write_durably(
    root: &std::path::Path,
    path: &std::path::Path,
    bytes: &[u8],
) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("an object path without a directory"))?;
    std::fs::create_dir_all(dir)?;
    let (mut file, staging) = (1u32..)
        .map(|n| {
            let mut name = path.as_os_str().to_owned();
            name.push(format!("#{n}"));
            std::path::PathBuf::from(name)
        })
        .find_map(|staging| {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&staging)
            {
                Ok(f) => Some(Ok((f, staging))),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => None,
                Err(e) => Some(Err(e)),
            }
        })
        .expect("an unbounded search finds a free name")?;
    let written = (|| {
        let mut offset = 0u64;
        for chunk in bytes.chunks(LOCAL_CHUNK_BYTES) {
            file.write_all(chunk)?;
            wait_for_writeback(&file, offset, chunk.len() as u64)?;
            offset += chunk.len() as u64;
        }
        file.sync_all()?;
        std::fs::rename(&staging, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&staging);
        return Err(e);
    }
    let mut synced = Some(dir);
    while let Some(d) = synced {
        std::fs::File::open(d)?.sync_all()?;
        synced = d.parent().filter(|_| d != root && d.starts_with(root));
    }
    Ok(())
}

/// Writes out the pages of `file` in `offset..offset + len` and waits for them.
#[cfg(target_os = "linux")]
fn wait_for_writeback(file: &std::fs::File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: a valid open descriptor and a range within the file.
    let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), offset as i64, len as i64, flags) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn wait_for_writeback(file: &std::fs::File, _offset: u64, _len: u64) -> std::io::Result<()> {
    file.sync_data()
}

impl Sink {
    /// Builds the client of a stored sink.
    pub fn open(record: &SinkRecord, master: &MasterKey) -> Result<Sink, SinkError> {
        let target = match (&record.bucket, &record.local) {
            (Some(b), _) => {
                let credentials = match &record.wrapped_credentials {
                    None => None,
                    Some(wrapped) => {
                        let bytes = STANDARD.decode(wrapped).map_err(|_| {
                            SinkError::Invalid("stored credentials are corrupt".into())
                        })?;
                        let clear = master.unwrap(&bytes, &ad_for(&record.name)).map_err(|_| {
                            SinkError::Invalid("stored credentials cannot be unwrapped".into())
                        })?;
                        let c: StoredCredentials =
                            serde_json::from_slice(&clear).map_err(|_| {
                                SinkError::Invalid("stored credentials are corrupt".into())
                            })?;
                        Some(Credentials {
                            access_key_id: Zeroizing::new(c.access_key_id.clone()),
                            secret_access_key: Zeroizing::new(c.secret_access_key.clone()),
                            session_token: c.session_token.clone().map(Zeroizing::new),
                        })
                    }
                };
                Target::S3(
                    s3_client(b, credentials.as_ref())
                        .map_err(|e| SinkError::Invalid(format!("sink '{}': {e}", record.name)))?,
                )
            }
            (_, Some(l)) => {
                std::fs::create_dir_all(&l.path).map_err(|e| {
                    SinkError::Write(format!(
                        "sink '{}': cannot create the directory {}: {e}",
                        record.name, l.path
                    ))
                })?;
                let files = LocalFileSystem::new_with_prefix(&l.path).map_err(|e| {
                    SinkError::Write(format!("sink '{}': {}: {e}", record.name, l.path))
                })?;
                // object_store resolves the directory through symlinks; so does the
                // walk that syncs directories up to it.
                let root = std::fs::canonicalize(&l.path).map_err(|e| {
                    SinkError::Write(format!("sink '{}': {}: {e}", record.name, l.path))
                })?;
                Target::Local { root, files }
            }
            _ => return Err(SinkError::Invalid("sink without bucket or path".into())),
        };
        Ok(Sink {
            name: record.name.clone(),
            location: record.location(),
            target: Arc::new(target),
        })
    }

    /// Writes one object (atomically: S3 PUT, or a rename into place on disk after the
    /// file and its directory were synced).
    pub async fn put(&self, path: &str, bytes: Vec<u8>) -> Result<(), SinkError> {
        let location = ObjectPath::parse(path)
            .map_err(|e| SinkError::Invalid(format!("object name '{path}': {e}")))?;
        let result = match &*self.target {
            Target::S3(store) => store
                .put(&location, PutPayload::from(bytes))
                .await
                .map(|_| ()),
            Target::Local { root, files } => {
                let file = files
                    .path_to_filesystem(&location)
                    .map_err(|e| SinkError::Write(self.explain(path, &e)))?;
                let root = root.clone();
                tokio::task::spawn_blocking(move || write_durably(&root, &file, &bytes))
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))
                    .and_then(|r| r)
                    .map_err(|e| object_store::Error::Generic {
                        store: "LocalFileSystem",
                        source: Box::new(e),
                    })
            }
        };
        result.map_err(|e| SinkError::Write(self.explain(path, &e)))
    }

    /// Writes the empty `<prefix>/.strm_test_<uuid>.jsonl` that proves the sink takes
    /// writes under `prefix`; returns its name.
    pub async fn write_test_object(&self, prefix: &str) -> Result<String, SinkError> {
        let name = format!("{prefix}/.strm_test_{}.jsonl", uuid::Uuid::new_v4());
        self.put(&name, Vec::new()).await?;
        Ok(name)
    }

    /// An operator's reading of a failed write.
    fn explain(&self, path: &str, e: &object_store::Error) -> String {
        let text = scrub(&e.to_string());
        let lower = text.to_lowercase();
        let hint = if lower.contains("nosuchbucket") || lower.contains("bucket does not exist") {
            "the bucket does not exist".to_string()
        } else if matches!(e, object_store::Error::Unauthenticated { .. })
            // S3 answers these with 403 too: look for them before access denied.
            || lower.contains("invalidaccesskeyid")
            || lower.contains("signaturedoesnotmatch")
        {
            "the credentials were rejected: check the access key id and secret".to_string()
        } else if matches!(e, object_store::Error::PermissionDenied { .. })
            || lower.contains("accessdenied")
            || lower.contains("access denied")
            || lower.contains("forbidden")
        {
            "access denied: check the credentials and the bucket policy".to_string()
        } else if lower.contains("connect")
            || lower.contains("dns")
            || lower.contains("timed out")
            || lower.contains("error sending request")
        {
            "the endpoint is unreachable".to_string()
        } else if lower.contains("permission denied") || lower.contains("read-only") {
            "the directory is not writable by the daemon".to_string()
        } else if lower.contains("no space") {
            "the disk is full".to_string()
        } else {
            "the write failed".to_string()
        };
        format!(
            "sink '{}': cannot write {}/{path}: {hint} ({text})",
            self.name, self.location
        )
    }
}

/// Drops anything that looks like a credential from an error text: query strings of
/// URLs (presigned parameters) and header dumps.
fn scrub(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for word in text.split_inclusive(char::is_whitespace) {
        if let Some(q) = word.find('?').filter(|_| word.contains("://")) {
            out.push_str(&word[..q]);
            out.push_str("?… ");
        } else if word.to_lowercase().contains("authorization") || word.contains("X-Amz-") {
            out.push_str("[redacted] ");
        } else {
            out.push_str(word);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_objects_are_written_whole_under_their_names() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("exports");
        let record = SinkRecord::new_local("l", root.to_str().unwrap(), 1).unwrap();
        let sink = Sink::open(&record, &MasterKey::generate().unwrap()).unwrap();
        // Larger than one chunk, in a new directory two levels down.
        let body: Vec<u8> = (0..LOCAL_CHUNK_BYTES * 2 + 17).map(|i| i as u8).collect();
        let name = "p/q/2026-12-04T00:00:00-keys-x---0.jsonl";
        sink.put(name, body.clone()).await.unwrap();
        assert_eq!(std::fs::read(root.join(name)).unwrap(), body);
        // A staging file left by a crash is not an object to readers.
        std::fs::write(root.join("p/q/left.jsonl#1"), b"half").unwrap();
        let files = LocalFileSystem::new_with_prefix(&root).unwrap();
        assert_eq!(list_objects(&files, "p").await.unwrap(), vec![name]);
        // Writing the same name again replaces it (a retried batch).
        sink.put(name, b"again".to_vec()).await.unwrap();
        assert_eq!(std::fs::read(root.join(name)).unwrap(), b"again");
        // A file where a directory should be: the write fails with a message.
        std::fs::write(root.join("blocked"), b"").unwrap();
        let err = sink.put("blocked/x.jsonl", vec![1]).await.unwrap_err();
        assert!(err.to_string().contains("cannot write"), "{err}");
        // The writes that succeeded left no staging file: only the one planted above.
        let mut staged = Vec::new();
        let mut dirs = vec![root.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.to_string_lossy().contains('#') {
                    staged.push(path);
                }
            }
        }
        assert_eq!(staged, vec![root.join("p/q/left.jsonl#1")]);
    }

    #[test]
    fn validation_and_view_hide_credentials() {
        let mk = MasterKey::generate().unwrap();
        let creds = || Credentials {
            access_key_id: Zeroizing::new("AKIAEXAMPLE".into()),
            secret_access_key: Zeroizing::new("very-secret-key".into()),
            session_token: None,
        };
        let bucket = BucketSpec {
            bucket_name: "my-bucket".into(),
            region: Some("eu-west-1".into()),
            endpoint: Some("http://127.0.0.1:9000".into()),
            path_style: true,
        };
        let r = SinkRecord::new_s3("s3", bucket.clone(), Some(creds()), &mk, 1).unwrap();
        let stored = serde_json::to_string(&r).unwrap();
        assert!(!stored.contains("very-secret-key") && !stored.contains("AKIAEXAMPLE"));
        let view = r.view().to_string();
        assert!(!view.contains("very-secret-key") && !view.contains("AKIAEXAMPLE"));
        assert!(view.contains("\"bucketName\":\"my-bucket\""), "{view}");
        assert!(Sink::open(&r, &mk).is_ok());
        let bad = |f: &dyn Fn(&mut BucketSpec)| {
            let mut b = bucket.clone();
            f(&mut b);
            SinkRecord::new_s3("s3", b, None, &mk, 1)
                .unwrap_err()
                .to_string()
        };
        assert!(bad(&|b| b.bucket_name = "UPPER".into()).contains("bucketName"));
        assert!(bad(&|b| b.bucket_name = String::new()).contains("bucketName"));
        assert!(bad(&|b| b.endpoint = Some("ftp://x".into())).contains("endpoint"));
        assert!(bad(&|b| b.endpoint = Some("not a url".into())).contains("endpoint"));
        assert!(bad(&|b| b.region = Some("eu west".into())).contains("region"));
        assert!(SinkRecord::new_s3("Bad", bucket.clone(), None, &mk, 1).is_err());
        assert!(SinkRecord::new_local("l", "relative/dir", 1).is_err());
    }

    #[tokio::test]
    async fn local_sink_writes_under_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let mk = MasterKey::generate().unwrap();
        let path = dir.path().join("out");
        let r = SinkRecord::new_local("local", path.to_str().unwrap(), 1).unwrap();
        let sink = Sink::open(&r, &mk).unwrap();
        let test = sink.write_test_object("p/q").await.unwrap();
        assert!(test.starts_with("p/q/.strm_test_") && test.ends_with(".jsonl"));
        assert_eq!(std::fs::read(path.join(&test)).unwrap(), b"");
        sink.put("p/q/a.jsonl", b"x\n".to_vec()).await.unwrap();
        assert_eq!(std::fs::read(path.join("p/q/a.jsonl")).unwrap(), b"x\n");
    }

    #[test]
    fn scrub_removes_query_strings() {
        let s = scrub("error sending request for url (http://h/b/k?X-Amz-Signature=abc) boom");
        assert!(!s.contains("abc"), "{s}");
        assert!(s.contains("boom"));
    }
}
