//! Batch exporters with the local-directory sink: formats, splitting, where a new
//! exporter starts, retention, shutdown, restarts, and bad input.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use common::{Daemon, files_under, key_links_by_object};
use serde_json::{Value, json};

const EXPORT_ON: &str = "[account]\nkey_export_allowed = true\n";

/// Every exported file under `dir` as (name relative to dir, body).
fn read_objects(dir: &Path) -> Vec<(String, String)> {
    if !dir.exists() {
        return Vec::new();
    }
    let mut v: Vec<(String, String)> = files_under(dir)
        .into_iter()
        .map(|p| {
            (
                p.strip_prefix(dir).unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

async fn create_exporter(d: &Daemon, body: Value) -> Value {
    let a = d.call("POST", "/v1/batch-exporters", Some(body)).await;
    assert_eq!(a.status, 201, "{}", a.body);
    a.body
}

async fn flush(d: &Daemon, name: &str) -> Vec<String> {
    let a = d
        .call("POST", &format!("/v1/batch-exporters/{name}/flush"), None)
        .await;
    a.ok()["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

async fn keys(d: &Daemon, stream: &str, prefix: &str, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(d.key(stream, &format!("{prefix}-{i}")).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_sink_csv_and_split_objects() {
    let d =
        Daemon::start("[account]\nkey_export_allowed = true\n[export]\nmax_keys_per_object = 10\n");
    let sinks = d.call("GET", "/v1/sinks", None).await;
    let export_dir = d.data_dir.join("export");
    assert_eq!(
        sinks.ok(),
        &json!({"sinks": [{"sink": {"name": "local", "sinkType": "LOCAL",
                                     "local": {"path": export_dir.to_string_lossy()}}}]})
    );
    d.create_stream("s", None).await;
    let links = keys(&d, "s", "k", 25).await;
    // The only sink is the default one: sinkName may be left out.
    let e = create_exporter(
        &d,
        json!({"keyStreamRef": {"name": "s"}, "interval": 3600, "pathPrefix": "csv/keys",
               "format": "CSV"}),
    )
    .await;
    assert_eq!(e["ref"]["name"], "local-s-keys");
    assert_eq!(e["sinkName"], "local");
    assert_eq!(e["format"], "CSV");
    let objects = flush(&d, "local-s-keys").await;
    assert_eq!(objects.len(), 3, "{objects:?}");
    for (i, o) in objects.iter().enumerate() {
        assert!(o.ends_with(&format!("---0-{}.csv", i + 1)), "{o}");
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    for o in &objects {
        let body = std::fs::read_to_string(export_dir.join(o)).unwrap();
        let mut lines = body.lines();
        assert_eq!(lines.next(), Some("\"keyLink\",\"encryptionKey\""));
        let rows: Vec<&str> = lines.collect();
        assert!(rows.len() <= 10);
        for row in rows {
            let (link, keyset) = row.split_once("\",\"").unwrap();
            let link = link.trim_start_matches('"');
            let keyset = keyset.trim_end_matches('"').replace("\"\"", "\"");
            let parsed: Value = serde_json::from_str(&keyset).unwrap();
            keyexportd::crypto::keyset_from_json(&parsed).unwrap();
            *seen.entry(link.to_string()).or_default() += 1;
        }
    }
    assert_eq!(seen.len(), 25);
    for l in &links {
        assert_eq!(seen[l], 1);
    }
    assert!(
        flush(&d, "local-s-keys").await.is_empty(),
        "no object for an empty batch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn include_existing_keys_false_starts_at_the_newest() {
    let d = Daemon::start(EXPORT_ON);
    d.create_stream("s", None).await;
    let old = keys(&d, "s", "old", 5).await;
    create_exporter(
        &d,
        json!({"keyStreamRef": {"name": "s"}, "interval": 3600, "pathPrefix": "all", "name": "all"}),
    )
    .await;
    create_exporter(
        &d,
        json!({"keyStreamRef": {"name": "s"}, "interval": 3600, "pathPrefix": "new", "name": "new",
               "includeExistingKeys": false}),
    )
    .await;
    let new = keys(&d, "s", "new", 3).await;
    flush(&d, "all").await;
    flush(&d, "new").await;
    let export_dir = d.data_dir.join("export");
    let all = key_links_by_object(&read_objects(&export_dir.join("all")));
    let newer = key_links_by_object(&read_objects(&export_dir.join("new")));
    assert_eq!(all.len(), 8);
    assert_eq!(newer.len(), 3);
    for l in &old {
        assert!(all.contains_key(l) && !newer.contains_key(l));
    }
    for l in &new {
        assert!(newer.contains_key(l));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_past_retention_are_never_exported() {
    let d = Daemon::start(
        "[account]\nkey_export_allowed = true\n[keys]\nstream_retention = \"3s\"\nrotation = \"2s\"\ngrace = \"1s\"\n",
    );
    d.create_stream("s", Some("2s")).await;
    let old = keys(&d, "s", "old", 4).await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let fresh = keys(&d, "s", "fresh", 2).await;
    create_exporter(
        &d,
        json!({"keyStreamRef": {"name": "s"}, "interval": 3600, "pathPrefix": "p", "name": "e"}),
    )
    .await;
    flush(&d, "e").await;
    let got = key_links_by_object(&read_objects(&d.data_dir.join("export/p")));
    for l in &old {
        assert!(!got.contains_key(l), "a key past retention was exported");
    }
    for l in &fresh {
        assert_eq!(got[l].len(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_uploads_the_open_batch_and_restart_resumes() {
    let mut d = Daemon::start(EXPORT_ON);
    d.create_stream("s", None).await;
    create_exporter(
        &d,
        json!({"keyStreamRef": {"name": "s"}, "interval": 3600, "pathPrefix": "p", "name": "e"}),
    )
    .await;
    let first = keys(&d, "s", "a", 7).await;
    assert!(d.stop().success());
    let dir = d.data_dir.join("export/p");
    let got = key_links_by_object(&read_objects(&dir));
    assert_eq!(
        got.len(),
        7,
        "the open batch went out at SIGTERM:\n{}",
        d.log()
    );
    d.launch();
    // The restarted exporter writes its test object as it starts.
    common::eventually(
        10,
        "a test object at creation and one at the restart",
        || async {
            let tests = read_objects(&dir)
                .iter()
                .filter(|(n, b)| n.starts_with(".strm_test_") && b.is_empty())
                .count();
            (tests == 2).then_some(())
        },
    )
    .await;
    let second = keys(&d, "s", "b", 4).await;
    let st = d.call("GET", "/v1/batch-exporters/e", None).await;
    assert_eq!(st.ok()["batchExporter"]["status"]["exportedKeys"], 7);
    assert_eq!(st.body["batchExporter"]["status"]["pendingKeys"], 4);
    flush(&d, "e").await;
    let got = key_links_by_object(&read_objects(&dir));
    assert_eq!(got.len(), 11);
    for l in first.iter().chain(&second) {
        assert_eq!(got[l].len(), 1);
    }
    let st = d.call("GET", "/v1/batch-exporters/e", None).await;
    let status = &st.ok()["batchExporter"]["status"];
    assert_eq!(status["exportedKeys"], 11);
    assert_eq!(status["pendingKeys"], 0);
    assert!(status["lastObject"].as_str().unwrap().starts_with("p/"));
    assert!(
        status["nextBatchAt"]
            .as_str()
            .unwrap()
            .ends_with(":00:00.000Z")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sink_and_exporter_requests_store_nothing() {
    let d = Daemon::start(EXPORT_ON);
    d.create_stream("s", None).await;
    let dir = d.root.join("second");
    let a = d
        .call(
            "POST",
            "/v1/sinks",
            Some(json!({"name": "second", "sinkType": "LOCAL", "local": {"path": dir}})),
        )
        .await;
    assert_eq!(a.status, 201, "{}", a.body);
    create_exporter(
        &d,
        json!({"keyStreamRef": {"name": "s"}, "sinkName": "local", "pathPrefix": "p", "name": "e"}),
    )
    .await;
    let sinks_before = d.call("GET", "/v1/sinks", None).await.body;
    // Definitions only: the status moves on by itself.
    let definitions = |v: Value| -> Vec<Value> {
        v["batchExporters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let mut e = e.clone();
                e.as_object_mut().unwrap().remove("status");
                e
            })
            .collect()
    };
    let exporters_before = definitions(d.call("GET", "/v1/batch-exporters", None).await.body);
    let exp = |extra: Value| {
        let mut body =
            json!({"keyStreamRef": {"name": "s"}, "sinkName": "local", "pathPrefix": "q"});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            "unknown sink",
            exp(json!({"sinkName": "nope"})),
            404,
            "sink 'nope' not found",
        ),
        (
            "unknown stream",
            exp(json!({"keyStreamRef": {"name": "nope"}})),
            404,
            "stream 'nope' not found",
        ),
        (
            "duplicate name",
            exp(json!({"name": "e"})),
            409,
            "already exists",
        ),
        ("interval abc", exp(json!({"interval": "abc"})), 400, "abc"),
        ("interval 0", exp(json!({"interval": 0})), 400, "interval"),
        ("interval 2h", exp(json!({"interval": "2h"})), 400, "3600s"),
        (
            "prefix ../x",
            exp(json!({"pathPrefix": "../x"})),
            400,
            "pathPrefix",
        ),
        (
            "prefix p/",
            exp(json!({"pathPrefix": "p/"})),
            400,
            "pathPrefix",
        ),
        (
            "prefix /p",
            exp(json!({"pathPrefix": "/p"})),
            400,
            "pathPrefix",
        ),
        (
            "prefix .",
            exp(json!({"pathPrefix": "."})),
            400,
            "pathPrefix",
        ),
        (
            "prefix missing",
            json!({"keyStreamRef": {"name": "s"}, "sinkName": "local"}),
            400,
            "pathPrefix",
        ),
        (
            "two sinks, none named",
            json!({"keyStreamRef": {"name": "s"}, "pathPrefix": "q"}),
            400,
            "sinkName is required",
        ),
        ("bad format", exp(json!({"format": "XML"})), 400, "format"),
        (
            "unknown field",
            exp(json!({"colour": "red"})),
            400,
            "colour",
        ),
        (
            "bad exporter name",
            exp(json!({"name": "Bad Name"})),
            400,
            "name",
        ),
        (
            "other billing id",
            exp(json!({"keyStreamRef": {"name": "s", "billingId": "other"}})),
            400,
            "billingId",
        ),
    ];
    for (what, body, status, needle) in cases {
        let a = d.call("POST", "/v1/batch-exporters", Some(body)).await;
        let m = a.expect_error(status);
        assert!(m.contains(needle), "{what}: {m}");
    }
    let sink_cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            "unknown sink type",
            json!({"name": "x", "sinkType": "GCS"}),
            400,
            "sinkType 'GCS'",
        ),
        (
            "missing bucket",
            json!({"name": "x", "sinkType": "S3"}),
            400,
            "bucket",
        ),
        (
            "empty bucket name",
            json!({"name": "x", "sinkType": "S3", "bucket": {"bucketName": ""}}),
            400,
            "bucketName",
        ),
        (
            "missing path",
            json!({"name": "x", "sinkType": "LOCAL"}),
            400,
            "path",
        ),
        (
            "relative path",
            json!({"name": "x", "sinkType": "LOCAL", "local": {"path": "rel"}}),
            400,
            "absolute",
        ),
        (
            "duplicate",
            json!({"name": "second", "sinkType": "LOCAL", "local": {"path": "/tmp/x"}}),
            409,
            "already exists",
        ),
        (
            "bad name",
            json!({"name": "../x", "sinkType": "LOCAL", "local": {"path": "/tmp/x"}}),
            400,
            "name",
        ),
        (
            "bad endpoint",
            json!({"name": "x", "sinkType": "S3", "bucket": {"bucketName": "bkt", "endpoint": "nope"}}),
            400,
            "endpoint",
        ),
        (
            "half credentials",
            json!({"name": "x", "sinkType": "S3", "bucket": {"bucketName": "bkt", "credentials": {"accessKeyId": "a"}}}),
            400,
            "secretAccessKey",
        ),
    ];
    for (what, body, status, needle) in sink_cases {
        let a = d.call("POST", "/v1/sinks", Some(body)).await;
        let m = a.expect_error(status);
        assert!(m.contains(needle), "{what}: {m}");
    }
    // Things in use, and things that do not exist.
    let m = d.call("DELETE", "/v1/sinks/local", None).await;
    assert!(m.expect_error(409).contains("batch exporter(s) e"));
    assert_eq!(m.body["error"]["code"], "FAILED_PRECONDITION");
    d.call("DELETE", "/v1/streams/s", None)
        .await
        .expect_error(409);
    d.call("DELETE", "/v1/sinks/nope", None)
        .await
        .expect_error(404);
    d.call("DELETE", "/v1/batch-exporters/nope", None)
        .await
        .expect_error(404);
    d.call("GET", "/v1/batch-exporters/nope", None)
        .await
        .expect_error(404);
    d.call("POST", "/v1/batch-exporters/nope/flush", None)
        .await
        .expect_error(404);

    assert_eq!(d.call("GET", "/v1/sinks", None).await.body, sinks_before);
    assert_eq!(
        definitions(d.call("GET", "/v1/batch-exporters", None).await.body),
        exporters_before
    );
    assert!(
        !d.data_dir.join("export/q").exists(),
        "no test object for a refused exporter"
    );
    // Deleting in order works.
    d.call("DELETE", "/v1/batch-exporters/e", None).await.ok();
    d.call("DELETE", "/v1/streams/s", None).await.ok();
    d.call("DELETE", "/v1/sinks/local", None).await.ok();
}
