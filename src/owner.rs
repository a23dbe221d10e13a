//! The data owner's side, in the same binary: read exported key objects from a
//! directory or an S3 prefix, decrypt JSON Lines events with them
//! (`keyexportd decrypt`), and rebuild a stream's keys into a data directory for
//! disaster recovery (`keyexportd restore`).
//!
//! Nothing here talks to a running daemon. Bad input (an unreadable object, a corrupt
//! key line, an event that is not JSON, a field that is not base64) is reported with
//! its location and skipped; the rest goes on. Memory grows with the number of keys,
//! not of events: events are streamed line by line.

use std::collections::HashMap;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use object_store::ObjectStore;
use serde_json::Value;
use uuid::Uuid;

use crate::crypto::{self, KeysetBytes};
use crate::export::sink::{self, BucketSpec, Credentials};
use crate::keyfile::{self, ExportedKey};

/// Where exported objects are read from.
pub enum KeySource {
    Dir(PathBuf),
    S3 {
        store: Arc<dyn ObjectStore>,
        bucket: String,
        prefix: String,
    },
}

/// S3 connection options, as the sink CLI takes them.
#[derive(Clone, Debug, Default)]
pub struct S3Options {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub path_style: bool,
    pub credentials: Option<(String, String, Option<String>)>,
}

impl KeySource {
    /// A directory, or `s3://bucket/prefix`.
    pub fn parse(location: &str, s3: &S3Options) -> Result<KeySource, String> {
        if let Some(rest) = location.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(format!("{location}: no bucket name (s3://bucket/prefix)"));
            }
            let spec = BucketSpec {
                bucket_name: bucket.to_string(),
                region: s3.region.clone(),
                endpoint: s3.endpoint.clone(),
                path_style: s3.path_style,
            };
            let creds = s3
                .credentials
                .as_ref()
                .map(|(id, secret, token)| Credentials {
                    access_key_id: id.clone().into(),
                    secret_access_key: secret.clone().into(),
                    session_token: token.clone().map(Into::into),
                });
            let store =
                sink::s3_client(&spec, creds.as_ref()).map_err(|e| format!("{location}: {e}"))?;
            Ok(KeySource::S3 {
                store,
                bucket: bucket.to_string(),
                prefix: prefix.trim_end_matches('/').to_string(),
            })
        } else {
            let dir = PathBuf::from(location);
            if !dir.is_dir() {
                return Err(format!(
                    "{location}: not a directory (or s3://bucket/prefix)"
                ));
            }
            Ok(KeySource::Dir(dir))
        }
    }

    fn describe(&self, name: &str) -> String {
        match self {
            KeySource::Dir(d) => d.join(name).display().to_string(),
            KeySource::S3 { bucket, .. } => format!("s3://{bucket}/{name}"),
        }
    }

    /// The names of the key objects (JSON Lines and CSV, not test objects), sorted.
    pub async fn objects(&self) -> Result<Vec<String>, String> {
        let mut names = match self {
            KeySource::Dir(dir) => {
                let mut out = Vec::new();
                let mut stack = vec![dir.clone()];
                while let Some(d) = stack.pop() {
                    let entries =
                        std::fs::read_dir(&d).map_err(|e| format!("{}: {e}", d.display()))?;
                    for e in entries {
                        let p = e.map_err(|e| format!("{}: {e}", d.display()))?.path();
                        if p.is_dir() {
                            stack.push(p);
                        } else if let Ok(rel) = p.strip_prefix(dir) {
                            out.push(rel.to_string_lossy().into_owned());
                        }
                    }
                }
                out
            }
            KeySource::S3 {
                store,
                bucket,
                prefix,
            } => sink::list_objects(store.as_ref(), prefix)
                .await
                .map_err(|e| format!("s3://{bucket}/{prefix}: cannot list: {e}"))?,
        };
        names.retain(|n| keyfile::format_of(n).is_some());
        names.sort();
        Ok(names)
    }

    async fn read(&self, name: &str) -> Result<Vec<u8>, String> {
        match self {
            KeySource::Dir(dir) => std::fs::read(dir.join(name)).map_err(|e| e.to_string()),
            KeySource::S3 { store, .. } => sink::read_object(store.as_ref(), name).await,
        }
    }

    /// Every key of every object, with the object's batch time; problems (unreadable
    /// objects, bad lines) are reported with their location and skipped.
    pub async fn load(&self, problems: &mut Vec<String>) -> Result<LoadedKeys, String> {
        let names = self.objects().await?;
        let mut loaded = LoadedKeys::default();
        for name in &names {
            let where_ = self.describe(name);
            let bytes = match self.read(name).await {
                Ok(b) => b,
                Err(e) => {
                    problems.push(format!("{where_}: cannot read: {e}"));
                    continue;
                }
            };
            let (keys, bad) = keyfile::parse(&where_, &bytes);
            problems.extend(bad);
            loaded.objects += 1;
            let batch_time = keyfile::name_parts(name).map(|(t, _)| t);
            for k in keys {
                loaded.keys.push((k, batch_time, where_.clone()));
            }
        }
        Ok(loaded)
    }
}

/// Keys read from a location, in object order.
#[derive(Default)]
pub struct LoadedKeys {
    pub objects: usize,
    /// The key, its object's batch time (ms) when the name carries one, the object.
    pub keys: Vec<(ExportedKey, Option<u64>, String)>,
}

// ---------------------------------------------------------------------------------------
// restore
// ---------------------------------------------------------------------------------------

/// What `keyexportd restore` did.
#[derive(Debug, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoreSummary {
    pub stream: String,
    pub objects: usize,
    pub restored: u64,
    pub already_present: u64,
    pub conflicts: u64,
    pub purged: u64,
    pub expired: u64,
    pub problems: u64,
}

/// Rebuilds the keys found at `source` into `stream` of the opened data directory.
/// Restored keys decrypt through the API until their expiry and are never exported
/// again. Problems and refusals go to `report`.
pub async fn restore(
    keys: &crate::keys::Keys,
    source: &KeySource,
    stream: &str,
    key_rotation: Option<crate::duration::Seconds>,
    report: &mut dyn FnMut(String),
) -> Result<RestoreSummary, String> {
    use crate::keys::{KeysError, RestoreOutcome};
    match keys.stream(stream) {
        Ok(_) => {}
        Err(KeysError::StreamNotFound(_)) => {
            keys.create_stream(stream, key_rotation)
                .await
                .map_err(|e| format!("cannot create stream '{stream}': {e}"))?;
        }
        Err(e) => return Err(e.to_string()),
    }
    let mut problems = Vec::new();
    let loaded = source.load(&mut problems).await?;
    let mut summary = RestoreSummary {
        stream: stream.to_string(),
        objects: loaded.objects,
        ..Default::default()
    };
    let now = crate::duration::now_millis();
    for (key, batch_time, object) in &loaded.keys {
        // Exported lines carry no timestamps: the batch that closed at T holds keys
        // created before T, so T bounds the creation time from above and the restored
        // key expires no earlier than the original.
        let created_at = batch_time.unwrap_or(now);
        match keys.restore_key(stream, key.key_link, &key.tink_key, created_at) {
            Ok(RestoreOutcome::Restored) => summary.restored += 1,
            Ok(RestoreOutcome::AlreadyPresent) => summary.already_present += 1,
            Ok(RestoreOutcome::Conflict) => {
                summary.conflicts += 1;
                report(format!(
                    "{object}:{}: keyLink {} exists here with other key material; not replaced",
                    key.line, key.key_link
                ));
            }
            Ok(RestoreOutcome::Purged) => summary.purged += 1,
            Ok(RestoreOutcome::Expired) => summary.expired += 1,
            Err(e) => problems.push(format!("{object}:{}: {e}", key.line)),
        }
    }
    keys.sync().await.map_err(|e| e.to_string())?;
    summary.problems = problems.len() as u64;
    for p in problems {
        report(p);
    }
    Ok(summary)
}

// ---------------------------------------------------------------------------------------
// decrypt
// ---------------------------------------------------------------------------------------

/// Options of `keyexportd decrypt`.
pub struct DecryptOptions {
    pub key_link_field: String,
    pub fields: Vec<String>,
}

/// Counts printed at the end of `keyexportd decrypt`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DecryptSummary {
    pub keys: usize,
    pub events: u64,
    pub decrypted_fields: u64,
    pub unknown_key: u64,
    pub errors: u64,
}

fn get_path<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, part| v.get(part))
}

fn get_path_mut<'a>(v: &'a mut Value, path: &str) -> Option<&'a mut Value> {
    path.split('.').try_fold(v, |v, part| v.get_mut(part))
}

/// Parses the keys into a keyLink -> keyset map; bad keysets are problems.
pub fn keyset_map(loaded: &LoadedKeys, problems: &mut Vec<String>) -> HashMap<Uuid, KeysetBytes> {
    let mut map = HashMap::with_capacity(loaded.keys.len());
    for (k, _, object) in &loaded.keys {
        match crypto::keyset_from_json(&k.tink_key) {
            Ok(ks) => {
                map.insert(k.key_link, ks);
            }
            Err(e) => problems.push(format!("{object}:{}: {e}", k.line)),
        }
    }
    map
}

/// Decrypts the named fields of JSON Lines events from `input` to `output`. Events
/// whose key is unknown pass through unchanged; bad events and fields are reported on
/// `report` with their input line and passed through unchanged.
pub fn decrypt_events(
    keys: &HashMap<Uuid, KeysetBytes>,
    options: &DecryptOptions,
    input: impl BufRead,
    mut output: impl Write,
    report: &mut dyn FnMut(String),
) -> std::io::Result<DecryptSummary> {
    let mut summary = DecryptSummary {
        keys: keys.len(),
        ..Default::default()
    };
    let progress = std::io::stderr().is_terminal();
    let mut last_progress = Instant::now();
    for (i, line) in input.lines().enumerate() {
        let line = line?;
        let n = i + 1;
        if line.trim().is_empty() {
            writeln!(output, "{line}")?;
            continue;
        }
        summary.events += 1;
        if progress && last_progress.elapsed() > Duration::from_secs(2) {
            eprint!(
                "\rdecrypt: {} events, {} fields decrypted",
                summary.events, summary.decrypted_fields
            );
            last_progress = Instant::now();
        }
        let mut event: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                report(format!(
                    "input line {n}: not a JSON event ({e}); passed through"
                ));
                summary.errors += 1;
                writeln!(output, "{line}")?;
                continue;
            }
        };
        let link = get_path(&event, &options.key_link_field)
            .and_then(Value::as_str)
            .and_then(|s| Uuid::parse_str(s).ok());
        let Some(keyset) = link.and_then(|l| keys.get(&l)) else {
            if link.is_none() {
                report(format!(
                    "input line {n}: no keyLink at '{}'; passed through",
                    options.key_link_field
                ));
                summary.errors += 1;
            } else {
                summary.unknown_key += 1;
            }
            writeln!(output, "{line}")?;
            continue;
        };
        let link = link.expect("checked above");
        for field in &options.fields {
            let Some(slot) = get_path_mut(&mut event, field) else {
                continue;
            };
            let Some(text) = slot.as_str() else {
                report(format!(
                    "input line {n}: field '{field}' is not a string; left as is"
                ));
                summary.errors += 1;
                continue;
            };
            let Ok(ct) = STANDARD.decode(text) else {
                report(format!(
                    "input line {n}: field '{field}' is not valid base64; left as is"
                ));
                summary.errors += 1;
                continue;
            };
            let plain = crypto::with_daead(
                *link.as_bytes(),
                || Ok(keyset.clone()),
                |p| crypto::decrypt(p, &ct),
            );
            match plain {
                Ok(Ok(bytes)) => match String::from_utf8(bytes) {
                    Ok(s) => {
                        *slot = Value::String(s);
                        summary.decrypted_fields += 1;
                    }
                    Err(_) => {
                        report(format!(
                            "input line {n}: field '{field}' decrypts to bytes that are not UTF-8; left as is"
                        ));
                        summary.errors += 1;
                    }
                },
                _ => {
                    report(format!(
                        "input line {n}: field '{field}' does not decrypt with key {link}; left as is"
                    ));
                    summary.errors += 1;
                }
            }
        }
        serde_json::to_writer(&mut output, &event)?;
        writeln!(output)?;
    }
    if progress {
        eprintln!();
    }
    output.flush()?;
    Ok(summary)
}

/// Opens `path` for reading, `-` or none meaning stdin.
pub fn open_input(path: Option<&Path>) -> std::io::Result<Box<dyn BufRead>> {
    match path {
        None => Ok(Box::new(std::io::BufReader::new(std::io::stdin()))),
        Some(p) if p == Path::new("-") => Ok(Box::new(std::io::BufReader::new(std::io::stdin()))),
        Some(p) => Ok(Box::new(std::io::BufReader::new(std::fs::File::open(p)?))),
    }
}

/// Opens `path` for writing, `-` or none meaning stdout.
pub fn open_output(path: Option<&Path>) -> std::io::Result<Box<dyn Write>> {
    match path {
        None => Ok(Box::new(std::io::BufWriter::new(std::io::stdout()))),
        Some(p) if p == Path::new("-") => Ok(Box::new(std::io::BufWriter::new(std::io::stdout()))),
        Some(p) => Ok(Box::new(std::io::BufWriter::new(std::fs::File::create(p)?))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decrypts_named_fields_and_reports_bad_input() {
        let ks = crypto::new_data_key().unwrap();
        let link = Uuid::new_v4();
        let ct = crypto::with_daead(
            *link.as_bytes(),
            || Ok(ks.clone()),
            |p| crypto::encrypt(p, b"a@b.example").unwrap(),
        )
        .unwrap();
        let b64 = STANDARD.encode(ct);
        let keys = HashMap::from([(link, ks)]);
        let other = Uuid::new_v4();
        let input = format!(
            "{{\"strmMeta\":{{\"keyLink\":\"{link}\"}},\"user\":{{\"email\":\"{b64}\"}},\"n\":1}}\n\
             {{\"strmMeta\":{{\"keyLink\":\"{other}\"}},\"user\":{{\"email\":\"{b64}\"}}}}\n\
             not json\n\
             {{\"strmMeta\":{{\"keyLink\":\"{link}\"}},\"user\":{{\"email\":\"!!\"}}}}\n"
        );
        let mut out = Vec::new();
        let mut reports = Vec::new();
        let summary = decrypt_events(
            &keys,
            &DecryptOptions {
                key_link_field: "strmMeta.keyLink".into(),
                fields: vec!["user.email".into()],
            },
            input.as_bytes(),
            &mut out,
            &mut |r| reports.push(r),
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        let first: Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(first["user"]["email"], "a@b.example");
        assert_eq!(first["n"], 1);
        assert!(lines[1].contains(&b64), "unknown key: unchanged");
        assert_eq!(lines[2], "not json");
        assert_eq!(
            summary,
            DecryptSummary {
                keys: 1,
                events: 4,
                decrypted_fields: 1,
                unknown_key: 1,
                errors: 2
            }
        );
        assert!(reports[0].starts_with("input line 3:"), "{reports:?}");
        assert!(reports[1].starts_with("input line 4:") && reports[1].contains("base64"));
    }
}
