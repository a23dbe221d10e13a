//! The exported file format, both ways: exporters write it, the data owner's tools
//! (`keyexportd decrypt`, `keyexportd restore`) read it back.
//!
//! JSON Lines: one `{"keyLink":"<uuid>","tinkKey":{..}}` per line, `tinkKey` the Tink
//! JSON keyset as a nested object. CSV: a `"keyLink","encryptionKey"` header, then rows
//! with the keyset JSON as a quoted string (the `csv` crate does the quoting).
//! Object names: `<prefix>/<T>-keys-<keyStreamId>---<partitions>[-n].(jsonl|csv)`.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// How exported objects are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Format {
    #[default]
    #[serde(rename = "JSONL")]
    Jsonl,
    #[serde(rename = "CSV")]
    Csv,
}

impl Format {
    pub fn extension(self) -> &'static str {
        match self {
            Format::Jsonl => "jsonl",
            Format::Csv => "csv",
        }
    }
}

/// One key as read from an exported object.
#[derive(Clone, Debug)]
pub struct ExportedKey {
    pub key_link: Uuid,
    /// The Tink JSON keyset.
    pub tink_key: Value,
    /// Where it was read: object name and 1-based line.
    pub line: usize,
}

/// Writes one exported object, a key at a time, into memory.
pub struct ObjectWriter {
    format: Format,
    /// JSON Lines are written straight into the buffer; CSV goes through the `csv`
    /// crate, which does the quoting.
    out: Inner,
}

enum Inner {
    Jsonl(Vec<u8>),
    Csv(Box<csv::Writer<Vec<u8>>>),
}

impl ObjectWriter {
    /// An empty object; `capacity` is a hint of its size in bytes.
    pub fn new(format: Format, capacity: usize) -> ObjectWriter {
        let out = match format {
            Format::Jsonl => Inner::Jsonl(Vec::with_capacity(capacity)),
            Format::Csv => {
                let mut w = csv::WriterBuilder::new()
                    .quote_style(csv::QuoteStyle::Always)
                    .from_writer(Vec::with_capacity(capacity));
                w.write_record(["keyLink".as_bytes(), b"encryptionKey"])
                    .expect("writing to memory");
                Inner::Csv(Box::new(w))
            }
        };
        ObjectWriter { format, out }
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// Adds one key: its keyLink and its Tink JSON keyset as compact JSON text.
    pub fn push(&mut self, link: Uuid, keyset_json: &[u8]) {
        let mut buf = Uuid::encode_buffer();
        let link = link.hyphenated().encode_lower(&mut buf).as_bytes();
        match &mut self.out {
            Inner::Jsonl(out) => {
                out.extend_from_slice(b"{\"keyLink\":\"");
                out.extend_from_slice(link);
                out.extend_from_slice(b"\",\"tinkKey\":");
                out.extend_from_slice(keyset_json);
                out.extend_from_slice(b"}\n");
            }
            Inner::Csv(w) => w
                .write_record([link, keyset_json])
                .expect("writing to memory"),
        }
    }

    /// The object's bytes.
    pub fn finish(self) -> Vec<u8> {
        match self.out {
            Inner::Jsonl(out) => out,
            Inner::Csv(w) => w.into_inner().expect("writing to memory"),
        }
    }
}

/// Renders keys (keyLink, Tink JSON keyset as compact JSON text) into one object.
pub fn render<'a>(format: Format, keys: impl IntoIterator<Item = (Uuid, &'a [u8])>) -> Vec<u8> {
    let mut w = ObjectWriter::new(format, 0);
    for (link, keyset) in keys {
        w.push(link, keyset);
    }
    w.finish()
}

/// True for the empty `.strm_test_<uuid>.jsonl` objects exporters write.
pub fn is_test_object(name: &str) -> bool {
    name.rsplit('/')
        .next()
        .is_some_and(|base| base.starts_with(".strm_test_"))
}

/// The format of an object, by its name; None for anything else.
pub fn format_of(name: &str) -> Option<Format> {
    if is_test_object(name) {
        None
    } else if name.ends_with(".jsonl") {
        Some(Format::Jsonl)
    } else if name.ends_with(".csv") {
        Some(Format::Csv)
    } else {
        None
    }
}

/// The batch time T (ms) and key stream id in an object name.
pub fn name_parts(name: &str) -> Option<(u64, Uuid)> {
    let base = name.rsplit('/').next()?;
    let (time, rest) = base.split_once("-keys-")?;
    let t = chrono::NaiveDateTime::parse_from_str(time, "%Y-%m-%dT%H:%M:%S").ok()?;
    let ksid = Uuid::parse_str(rest.get(..36)?).ok()?;
    Some((t.and_utc().timestamp_millis().max(0) as u64, ksid))
}

/// Parses one exported object. Bad lines are reported (with the object and line) and
/// skipped; the rest is returned.
pub fn parse(name: &str, bytes: &[u8]) -> (Vec<ExportedKey>, Vec<String>) {
    let mut keys = Vec::new();
    let mut problems = Vec::new();
    let key_of = |line: usize, link: &str, tink_key: Value| match Uuid::parse_str(link) {
        Ok(key_link) if tink_key.is_object() => Ok(ExportedKey {
            key_link,
            tink_key,
            line,
        }),
        Ok(_) => Err(format!("{name}:{line}: tinkKey is not a JSON object")),
        Err(_) => Err(format!("{name}:{line}: keyLink '{link}' is not a UUID")),
    };
    let mut add = |r: Result<ExportedKey, String>| match r {
        Ok(k) => keys.push(k),
        Err(p) => problems.push(p),
    };
    match format_of(name) {
        Some(Format::Jsonl) => {
            #[derive(Deserialize)]
            #[serde(rename_all = "camelCase")]
            struct Line {
                key_link: String,
                tink_key: Value,
            }
            for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                add(match serde_json::from_slice::<Line>(line) {
                    Ok(l) => key_of(i + 1, &l.key_link, l.tink_key),
                    Err(e) => Err(format!("{name}:{}: not a key line: {e}", i + 1)),
                });
            }
        }
        Some(Format::Csv) => {
            let mut r = csv::ReaderBuilder::new()
                .has_headers(true)
                .from_reader(bytes);
            for (i, record) in r.records().enumerate() {
                // Line 1 is the header.
                let line = i + 2;
                add(match record {
                    Ok(rec) if rec.len() == 2 => match serde_json::from_str::<Value>(&rec[1]) {
                        Ok(v) => key_of(line, &rec[0], v),
                        Err(e) => Err(format!("{name}:{line}: encryptionKey is not JSON: {e}")),
                    },
                    Ok(rec) => Err(format!("{name}:{line}: {} fields, expected 2", rec.len())),
                    Err(e) => Err(format!("{name}:{line}: not a CSV row: {e}")),
                });
            }
        }
        None => add(Err(format!(
            "{name}: not an exported key object (.jsonl or .csv)"
        ))),
    }
    (keys, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_both_formats_and_report_bad_lines() {
        let a = Uuid::new_v4();
        let b = Uuid::new_v4();
        let ka = serde_json::json!({"primaryKeyId": 1, "key": [{"x": "quote \" inside"}]});
        let kb = serde_json::json!({"primaryKeyId": 2, "key": []});
        let (ta, tb) = (ka.to_string(), kb.to_string());
        for format in [Format::Jsonl, Format::Csv] {
            let bytes = render(format, [(a, ta.as_bytes()), (b, tb.as_bytes())]);
            let name = format!("p/2021-05-04T14:13:30-keys-{a}---0.{}", format.extension());
            let (keys, problems) = parse(&name, &bytes);
            assert!(problems.is_empty(), "{problems:?}");
            assert_eq!(keys.len(), 2);
            assert_eq!(keys[0].key_link, a);
            assert_eq!(keys[0].tink_key, ka);
            assert_eq!(keys[1].tink_key, kb);
            assert_eq!(name_parts(&name), Some((1_620_137_610_000, a)));
        }
        let csv = render(Format::Csv, [(a, ta.as_bytes())]);
        assert!(csv.starts_with(b"\"keyLink\",\"encryptionKey\"\n"));
        let bad = format!(
            "{{\"keyLink\":\"{a}\",\"tinkKey\":{{}}}}\nnot json\n{{\"keyLink\":\"x\",\"tinkKey\":{{}}}}\n"
        );
        let (keys, problems) = parse("o.jsonl", bad.as_bytes());
        assert_eq!(keys.len(), 1);
        assert_eq!(problems.len(), 2);
        assert!(problems[0].starts_with("o.jsonl:2:"), "{problems:?}");
        assert!(problems[1].starts_with("o.jsonl:3:"), "{problems:?}");
        assert!(is_test_object("p/.strm_test_1.jsonl"));
        assert_eq!(format_of("p/.strm_test_1.jsonl"), None);
        assert_eq!(parse("x.txt", b"").1.len(), 1);
    }
}
