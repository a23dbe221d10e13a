//! In-process ceilings of the benchmark suite (`scripts/bench.sh`), printed as JSON:
//!
//! - `daead KEYS EVENTS FIELDS SECONDS`: a loop of tink-daead
//!   `encrypt_deterministically` over the same values the batch-encryption benchmark
//!   sends (EVENTS events over KEYS keys, FIELDS fields of 32 bytes): fields per second.
//! - `put SOURCE_DIR local TARGET_DIR` / `put SOURCE_DIR s3 ENDPOINT BUCKET`: writes the
//!   bytes of every file under SOURCE_DIR with object_store directly, one after the
//!   other as an exporter does: bytes per second.
//!
//! A plain timed loop rather than criterion keeps the dependency tree lean; the suite
//! repeats each ceiling and keeps the best run.

use std::sync::Arc;
use std::time::Instant;

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tink_core::keyset::Handle;

fn daead(keys: usize, events: usize, fields: usize, seconds: f64) {
    tink_daead::init();
    let primitives: Vec<_> = (0..keys)
        .map(|_| {
            let h = Handle::new(&tink_daead::aes_siv_key_template()).unwrap();
            tink_daead::new(&h).unwrap()
        })
        .collect();
    let values: Vec<Vec<u8>> = (0..events * fields)
        .map(|i| format!("{i:032}").into_bytes())
        .collect();
    let started = Instant::now();
    let mut done = 0u64;
    let mut sink = 0usize;
    while started.elapsed().as_secs_f64() < seconds {
        for (i, v) in values.iter().enumerate() {
            let p = &primitives[(i / fields) % keys];
            sink ^= p.encrypt_deterministically(v, b"").unwrap().len();
        }
        done += values.len() as u64;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"fieldsPerSecond": done as f64 / secs, "fields": done, "seconds": secs, "check": sink})
    );
}

async fn put(source: &str, store: Arc<dyn ObjectStore>) {
    let mut files = Vec::new();
    let mut stack = vec![std::path::PathBuf::from(source)];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push(p);
            }
        }
    }
    files.sort();
    let data: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|p| {
            let rel = p
                .strip_prefix(source)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            (format!("ceiling/{rel}"), std::fs::read(p).unwrap())
        })
        .collect();
    let bytes: usize = data.iter().map(|(_, b)| b.len()).sum();
    let started = Instant::now();
    for (name, body) in data {
        store
            .put(&ObjectPath::parse(&name).unwrap(), PutPayload::from(body))
            .await
            .unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"bytes": bytes, "objects": files.len(), "seconds": secs, "bytesPerSecond": bytes as f64 / secs})
    );
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("daead") => daead(
            args[1].parse().unwrap(),
            args[2].parse().unwrap(),
            args[3].parse().unwrap(),
            args[4].parse().unwrap(),
        ),
        Some("put") => {
            let store: Arc<dyn ObjectStore> = match args[2].as_str() {
                "local" | "local-fsync" => {
                    std::fs::create_dir_all(&args[3]).unwrap();
                    Arc::new(
                        object_store::local::LocalFileSystem::new_with_prefix(&args[3])
                            .unwrap()
                            .with_fsync(args[2] == "local-fsync"),
                    )
                }
                "s3" => Arc::new(
                    object_store::aws::AmazonS3Builder::new()
                        .with_endpoint(&args[3])
                        .with_allow_http(true)
                        .with_virtual_hosted_style_request(false)
                        .with_region("us-east-1")
                        .with_bucket_name(&args[4])
                        .with_access_key_id("test")
                        .with_secret_access_key("test")
                        .build()
                        .unwrap(),
                ),
                other => panic!("unknown store {other}"),
            };
            put(&args[1], store).await
        }
        _ => panic!("usage: bench_ceilings daead|put ..."),
    }
}
