//! Batch exporters against a real S3-compatible server (moto) read back with boto3.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{Daemon, S3Server, eventually, key_links_by_object, python};
use serde_json::{Value, json};

const EXPORT_ON: &str = "[account]\nkey_export_allowed = true\n";

async fn s3_sink(d: &Daemon, s3: &S3Server, name: &str, bucket: &str) {
    let a = d
        .call(
            "POST",
            "/v1/sinks",
            Some(json!({"name": name, "sinkType": "S3", "bucket": {
                "bucketName": bucket, "region": "us-east-1", "endpoint": s3.endpoint(),
                "pathStyle": true,
                "credentials": {"accessKeyId": "test-access-key", "secretAccessKey": "test-secret-key"}
            }})),
        )
        .await;
    assert_eq!(a.status, 201, "{}", a.body);
}

async fn exporter_status(d: &Daemon, name: &str) -> Value {
    let a = d
        .call("GET", &format!("/v1/batch-exporters/{name}"), None)
        .await;
    a.ok()["batchExporter"]["status"].clone()
}

async fn wait_exported(d: &Daemon, name: &str, n: u64, secs: u64) -> Value {
    eventually(secs, &format!("{n} keys exported by {name}"), || async {
        let s = exporter_status(d, name).await;
        (s["exportedKeys"].as_u64() == Some(n)).then_some(s)
    })
    .await
}

/// Creates `n` keys (session fields prefixed `p`) with one ciphertext each.
async fn make_keys(d: &Daemon, stream: &str, p: &str, n: usize) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for i in 0..n {
        let plaintext = format!("{p}-user-{i}@example.org");
        let a = d
            .call(
                "POST",
                &format!("/v1/streams/{stream}/encrypt"),
                Some(json!({"keyField": format!("{p}-{i}"), "values": {"email": plaintext}})),
            )
            .await;
        let b = a.ok();
        out.push((
            b["keyLink"].as_str().unwrap().to_string(),
            plaintext,
            b["values"]["email"].as_str().unwrap().to_string(),
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_keys_land_in_s3_exactly_once_and_python_tink_decrypts_them() {
    let s3 = S3Server::start();
    s3.create_bucket("keys-bucket");
    let d = Daemon::start(EXPORT_ON);
    let stream = d.create_stream("stream-machine", None).await;
    let ksid = stream["keyStreamId"].as_str().unwrap().to_string();
    s3_sink(&d, &s3, "s3", "keys-bucket").await;
    let created = d
        .call(
            "POST",
            "/v1/batch-exporters",
            Some(
                json!({"keyStreamRef": {"name": "stream-machine"}, "interval": "2s",
                        "sinkName": "s3", "pathPrefix": "stream-machine-keys"}),
            ),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(
        created.body,
        json!({"ref": {"billingId": "default", "name": "s3-stream-machine-keys"},
               "keyStreamRef": {"billingId": "default", "name": "stream-machine"},
               "interval": "2s", "sinkName": "s3", "pathPrefix": "stream-machine-keys"})
    );
    // 1,000 keys over several intervals.
    let mut keys = Vec::new();
    for wave in 0..4 {
        keys.extend(make_keys(&d, "stream-machine", &format!("w{wave}"), 250).await);
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let status = wait_exported(&d, "s3-stream-machine-keys", 1000, 30).await;
    assert_eq!(status["pendingKeys"], 0);
    assert!(status["lastError"].is_null(), "{status}");

    let objects = s3.dump("keys-bucket");
    let tests: Vec<&(String, String)> = objects
        .iter()
        .filter(|(k, _)| k.starts_with("stream-machine-keys/.strm_test_"))
        .collect();
    assert_eq!(tests.len(), 1, "one test object");
    assert!(tests[0].0.ends_with(".jsonl") && tests[0].1.is_empty());
    let pattern = regex_lite(&ksid);
    let data: Vec<&(String, String)> = objects
        .iter()
        .filter(|(k, _)| !k.contains(".strm_test_"))
        .collect();
    assert!(
        data.len() >= 3,
        "several intervals, several objects: {}",
        data.len()
    );
    for (name, _) in &data {
        let t = pattern(name).unwrap_or_else(|| panic!("name {name} does not match"));
        let seconds: u32 = t[17..19].parse().unwrap();
        assert_eq!(seconds % 2, 0, "{name} is on a 2 s boundary");
    }
    let by_link = key_links_by_object(&objects);
    assert_eq!(by_link.len(), 1000);
    for (link, _, _) in &keys {
        assert_eq!(
            by_link.get(link).map(Vec::len),
            Some(1),
            "{link} exactly once"
        );
    }

    // Python Tink loads every exported keyset and decrypts the daemon's ciphertexts.
    let exported: HashMap<String, Value> = objects
        .iter()
        .filter(|(k, _)| !k.contains(".strm_test_"))
        .flat_map(|(_, body)| {
            body.lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
        })
        .map(|v| {
            (
                v["keyLink"].as_str().unwrap().to_string(),
                v["tinkKey"].clone(),
            )
        })
        .collect();
    let request: Vec<Value> = keys
        .iter()
        .map(|(link, pt, ct)| {
            json!({"keyLink": link, "tinkKey": exported[link],
                   "cases": [{"plaintext": pt, "ciphertext": ct}]})
        })
        .collect();
    let out = python("tink_interop.py", &json!({ "keys": request }));
    for ((_, pt, ct), got) in keys.iter().zip(out["keys"].as_array().unwrap()) {
        assert_eq!(got["decrypted"][0], pt.as_str());
        assert_eq!(got["reencrypted"][0], ct.as_str());
    }
}

/// `<prefix>/<T>-keys-<ksid>---0.jsonl` -> T.
fn regex_lite(ksid: &str) -> impl Fn(&str) -> Option<String> + '_ {
    move |name: &str| {
        let rest = name.strip_prefix("stream-machine-keys/")?;
        let t = rest.get(..19)?;
        let ok_t = t.chars().enumerate().all(|(i, c)| match i {
            4 | 7 => c == '-',
            10 => c == 'T',
            13 | 16 => c == ':',
            _ => c.is_ascii_digit(),
        });
        (ok_t && rest[19..] == format!("-keys-{ksid}---0.jsonl")).then(|| t.to_string())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_not_allowed_refuses_and_writes_nothing() {
    let s3 = S3Server::start();
    s3.create_bucket("bkt");
    let d = Daemon::start("");
    d.create_stream("s", None).await;
    s3_sink(&d, &s3, "s3", "bkt").await;
    d.key("s", "x").await;
    let a = d
        .call(
            "POST",
            "/v1/batch-exporters",
            Some(json!({"keyStreamRef": {"name": "s"}, "sinkName": "s3", "pathPrefix": "p"})),
        )
        .await;
    assert!(a.expect_error(403).contains("key_export_allowed"));
    assert_eq!(
        d.call("GET", "/v1/batch-exporters", None).await.body,
        json!({"batchExporters": []})
    );
    assert!(s3.dump("bkt").is_empty(), "the bucket stays empty");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_upload_and_commit_reuploads_the_same_object() {
    let s3 = S3Server::start();
    s3.create_bucket("bkt");
    // The fault switch aborts the process after the first upload, before the commit.
    let tmp = tempfile::tempdir().unwrap();
    let mut d = Daemon::configure(tmp.path(), EXPORT_ON);
    d.env = vec![("KEYEXPORTD_FAULT".into(), "crash-after-upload".into())];
    d.launch();
    d.create_stream("s", None).await;
    s3_sink(&d, &s3, "s3", "bkt").await;
    let a = d
        .call(
            "POST",
            "/v1/batch-exporters",
            Some(
                json!({"keyStreamRef": {"name": "s"}, "interval": 3600, "sinkName": "s3",
                        "pathPrefix": "p", "name": "e"}),
            ),
        )
        .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let first = make_keys(&d, "s", "a", 40).await;
    let flush = d
        .http
        .post(format!("{}/v1/batch-exporters/e/flush", d.base))
        .bearer_auth(&d.token)
        .send()
        .await;
    assert!(
        flush.is_err() || flush.unwrap().status() != 200,
        "the process died mid-flush"
    );
    let status = d.wait();
    assert!(!status.success(), "aborted");
    assert!(
        d.log()
            .contains("KEYEXPORTD_FAULT: aborting at crash-after-upload")
    );
    let after_crash = s3.dump("bkt");
    let crashed: Vec<_> = after_crash
        .iter()
        .filter(|(k, _)| !k.contains(".strm_test_"))
        .cloned()
        .collect();
    assert_eq!(crashed.len(), 1, "uploaded, not committed");

    // Restart normally: the recorded batch goes out again at once, under the same name.
    d.env.clear();
    d.launch();
    let st = wait_exported(&d, "e", 40, 20).await;
    assert_eq!(st["lastObject"], crashed[0].0.as_str(), "same name");
    let second = make_keys(&d, "s", "b", 25).await;
    let flush = d.call("POST", "/v1/batch-exporters/e/flush", None).await;
    let objects: Vec<String> = flush.ok()["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(objects.len(), 1, "{objects:?}");
    assert_ne!(objects[0], crashed[0].0, "a new batch, a new name");
    let all = s3.dump("bkt");
    let again = all.iter().find(|(k, _)| *k == crashed[0].0).unwrap();
    assert_eq!(again.1, crashed[0].1, "same bytes");
    let by_link = key_links_by_object(&all);
    assert_eq!(by_link.len(), 65);
    for (link, _, _) in first.iter().chain(&second) {
        assert_eq!(by_link[link].len(), 1, "{link} in exactly one object");
    }
    let st = exporter_status(&d, "e").await;
    assert_eq!(st["exportedKeys"], 65);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_then_recovery_exports_every_key_once() {
    let mut s3 = S3Server::start();
    s3.create_bucket("bkt");
    let d = Daemon::start(EXPORT_ON);
    d.create_stream("s", None).await;
    s3_sink(&d, &s3, "s3", "bkt").await;
    let a = d
        .call(
            "POST",
            "/v1/batch-exporters",
            Some(
                json!({"keyStreamRef": {"name": "s"}, "interval": "1s", "sinkName": "s3",
                        "pathPrefix": "p", "name": "e"}),
            ),
        )
        .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let mut keys = make_keys(&d, "s", "before", 30).await;
    wait_exported(&d, "e", 30, 20).await;
    // moto keeps its state in memory: keep what it held before it goes down.
    let mut objects = s3.dump("bkt");
    s3.stop();
    for wave in 0..3 {
        keys.extend(make_keys(&d, "s", &format!("during{wave}"), 20).await);
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    let st = eventually(20, "lastError during the outage", || async {
        let s = exporter_status(&d, "e").await;
        s["lastError"].is_string().then_some(s)
    })
    .await;
    let err = st["lastError"].as_str().unwrap();
    assert!(err.contains("unreachable"), "{err}");
    assert!(st["pendingKeys"].as_u64().unwrap() > 0, "{st}");
    d.call("GET", "/healthz", None).await.ok();

    s3.launch();
    s3.create_bucket("bkt");
    keys.extend(make_keys(&d, "s", "after", 10).await);
    let st = wait_exported(&d, "e", 100, 90).await;
    assert!(st["lastError"].is_null(), "{st}");
    objects.extend(s3.dump("bkt"));
    let by_link = key_links_by_object(&objects);
    assert_eq!(by_link.len(), 100);
    for (link, _, _) in &keys {
        assert_eq!(by_link[link].len(), 1, "{link}: {:?}", by_link[link]);
    }
    assert!(!d.log().contains("test-secret-key"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_failures_at_creation_are_clear_and_store_nothing() {
    let s3 = S3Server::start();
    let d = Daemon::start(EXPORT_ON);
    d.create_stream("s", None).await;
    s3_sink(&d, &s3, "nobucket", "missing-bucket").await;
    let a = d
        .call(
            "POST",
            "/v1/batch-exporters",
            Some(json!({"keyStreamRef": {"name": "s"}, "sinkName": "nobucket", "pathPrefix": "p"})),
        )
        .await;
    let m = a.expect_error(400);
    assert!(
        m.contains("bucket does not exist") && m.contains("s3://missing-bucket"),
        "{m}"
    );
    // An endpoint nobody listens on.
    let dead = common::free_port();
    let a = d
        .call(
            "POST",
            "/v1/sinks",
            Some(json!({"name": "dead", "sinkType": "S3", "bucket": {
                "bucketName": "bkt", "endpoint": format!("http://127.0.0.1:{dead}"), "pathStyle": true,
                "credentials": {"accessKeyId": "a", "secretAccessKey": "b"}}})),
        )
        .await;
    assert_eq!(a.status, 201);
    let a = d
        .call(
            "POST",
            "/v1/batch-exporters",
            Some(json!({"keyStreamRef": {"name": "s"}, "sinkName": "dead", "pathPrefix": "p"})),
        )
        .await;
    assert!(a.expect_error(400).contains("unreachable"));
    assert_eq!(
        d.call("GET", "/v1/batch-exporters", None).await.body,
        json!({"batchExporters": []})
    );
    // The sink is returned without credentials.
    let sink = d.call("GET", "/v1/sinks/dead", None).await;
    let text = sink.ok().to_string();
    assert!(
        !text.contains("secretAccessKey") && !text.contains("\"b\"}"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_and_rejected_credentials_are_clear_and_store_nothing() {
    // Three free requests: the bucket, the IAM user and its access key; then moto's IAM
    // checks every request.
    let s3 = S3Server::start_with_auth(3);
    s3.create_bucket("guarded");
    let (key_id, secret) = s3.create_user("no-policy");
    let d = Daemon::start(EXPORT_ON);
    d.create_stream("s", None).await;
    for (sink, key_id, secret) in [
        ("denied", key_id.as_str(), secret.as_str()),
        ("rejected", "AKIAUNKNOWN", "not-a-known-secret"),
    ] {
        let a = d
            .call(
                "POST",
                "/v1/sinks",
                Some(json!({"name": sink, "sinkType": "S3", "bucket": {
                    "bucketName": "guarded", "region": "us-east-1", "endpoint": s3.endpoint(),
                    "pathStyle": true,
                    "credentials": {"accessKeyId": key_id, "secretAccessKey": secret}}})),
            )
            .await;
        assert_eq!(a.status, 201, "{}", a.body);
    }
    let attempt = |sink: &'static str| {
        d.call(
            "POST",
            "/v1/batch-exporters",
            Some(json!({"keyStreamRef": {"name": "s"}, "sinkName": sink, "pathPrefix": "p"})),
        )
    };
    let denied = attempt("denied").await;
    let m = denied.expect_error(400);
    assert!(
        m.contains("access denied") && m.contains("s3://guarded/p/.strm_test_"),
        "{m}"
    );
    assert!(!m.contains(&secret), "no secret in the message");
    let rejected = attempt("rejected").await;
    let m = rejected.expect_error(400);
    assert!(m.contains("the credentials were rejected"), "{m}");
    assert!(
        !m.contains("not-a-known-secret"),
        "no secret in the message"
    );
    assert_eq!(
        d.call("GET", "/v1/batch-exporters", None).await.body,
        json!({"batchExporters": []}),
        "nothing stored"
    );
    assert!(!d.log().contains(&secret) && !d.log().contains("not-a-known-secret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_creates_sinks_and_exporters_verbatim() {
    let s3 = S3Server::start();
    s3.create_bucket("my-bucket");
    let d = Daemon::start(EXPORT_ON);
    d.create_stream("stream-machine", None).await;
    let creds = d.root.join("aws.json");
    std::fs::write(
        &creds,
        r#"{"AccessKey":{"UserName":"u","AccessKeyId":"AKIATEST","Status":"Active","SecretAccessKey":"cli-secret","CreateDate":"2026-01-01T00:00:00Z"}}"#,
    )
    .unwrap();
    let endpoint = s3.endpoint();
    let (ok, out, err) = d.cli(&[
        "create",
        "sink",
        "s3",
        "my-bucket",
        "--credentials-file",
        creds.to_str().unwrap(),
        "--endpoint",
        &endpoint,
        "--region",
        "us-east-1",
        "--path-style",
    ]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["bucket"]["bucketName"], "my-bucket");
    assert!(!out.contains("cli-secret"));
    // Two sinks now (local and s3): the exporter names its sink.
    let (ok, _, err) = d.cli(&[
        "create",
        "batch-exporter",
        "stream-machine",
        "--interval",
        "30",
        "--path-prefix",
        "stream-machine-keys",
        "--sink",
        "s3",
    ]);
    assert!(!ok && err.contains("--export-keys"), "{err}");
    let (ok, out, err) = d.cli(&[
        "create",
        "batch-exporter",
        "stream-machine",
        "--export-keys",
        "--interval",
        "30",
        "--path-prefix",
        "stream-machine-keys",
        "--sink",
        "s3",
    ]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ref"]["name"], "s3-stream-machine-keys");
    assert_eq!(v["interval"], "30s");
    let (ok, out, _) = d.cli(&["list", "batch-exporters", "-o", "table"]);
    assert!(
        ok && out.lines().count() == 2 && out.contains("s3-stream-machine-keys"),
        "{out}"
    );
    let (ok, out, _) = d.cli(&["list", "sinks", "-o", "table"]);
    assert!(
        ok && out.contains("my-bucket") && out.contains("LOCAL"),
        "{out}"
    );
    let (ok, out, _) = d.cli(&["get", "batch-exporter", "s3-stream-machine-keys"]);
    assert!(ok && out.contains("\"status\""), "{out}");
    let (ok, _, err) = d.cli(&["delete", "sink", "s3"]);
    assert!(!ok && err.contains("409"), "{err}");
    d.key("stream-machine", "x").await;
    let (ok, out, err) = d.cli(&["flush", "batch-exporter", "s3-stream-machine-keys"]);
    assert!(ok, "{err}");
    assert!(out.contains("\"objects\":[\"stream-machine-keys/"), "{out}");
    let (ok, _, _) = d.cli(&["delete", "batch-exporters", "s3-stream-machine-keys"]);
    assert!(ok);
    let (ok, _, err) = d.cli(&["delete", "sink", "s3"]);
    assert!(ok, "{err}");
    let (ok, out, _) = d.cli(&["list", "sinks"]);
    assert!(ok && !out.contains("my-bucket"));
    let local_dir = d.root.join("exports");
    let (ok, out, err) = d.cli(&[
        "create",
        "sink",
        "archive",
        local_dir.to_str().unwrap(),
        "--sink-type",
        "local",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("\"sinkType\":\"LOCAL\""), "{out}");
    let bad = d.root.join("bad.json");
    std::fs::write(&bad, "{}").unwrap();
    let (ok, _, err) = d.cli(&[
        "create",
        "sink",
        "x",
        "b",
        "--credentials-file",
        bad.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("create-access-key"), "{err}");
}
