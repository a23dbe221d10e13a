//! The data owner's tools: `keyexportd decrypt` and `keyexportd restore` on keys that a
//! real exporter wrote to a local directory and to an S3 server.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{BIN, Daemon, S3Server, eventually};
use serde_json::{Value, json};

const FIELDS: [&str; 3] = ["user.email", "user.name", "ip"];

async fn s3_sink(d: &Daemon, s3: &S3Server, bucket: &str) {
    let a = d
        .call(
            "POST",
            "/v1/sinks",
            Some(json!({"name": "s3", "sinkType": "S3", "bucket": {
                "bucketName": bucket, "endpoint": s3.endpoint(), "pathStyle": true,
                "credentials": {"accessKeyId": "test-access-key", "secretAccessKey": "test-secret-key"}}})),
        )
        .await;
    assert_eq!(a.status, 201, "{}", a.body);
}

/// Encrypts `n` events over `sessions` sessions with three fields each; returns the
/// encrypted JSON Lines and the plaintext events (same order).
async fn encrypted_events(
    d: &Daemon,
    stream: &str,
    n: usize,
    sessions: usize,
) -> (String, Vec<Value>) {
    let mut lines = String::new();
    let mut plain = Vec::new();
    for chunk in 0..n.div_ceil(1000) {
        let range = chunk * 1000..((chunk + 1) * 1000).min(n);
        let values: Vec<Value> = range
            .clone()
            .map(|i| {
                json!({"email": format!("user{i}@example.org"), "name": format!("Name Ñumber {i}"),
                       "ip": format!("10.0.{}.{}", i / 256 % 256, i % 256)})
            })
            .collect();
        let events: Vec<Value> = range
            .clone()
            .zip(&values)
            .map(|(i, v)| json!({"keyField": format!("session-{}", i % sessions), "values": v}))
            .collect();
        let a = d
            .call(
                "POST",
                &format!("/v1/streams/{stream}/encrypt"),
                Some(json!({ "events": events })),
            )
            .await;
        for ((i, v), out) in range.zip(&values).zip(a.ok()["events"].as_array().unwrap()) {
            let c = &out["values"];
            lines.push_str(
                &json!({"strmMeta": {"keyLink": out["keyLink"]}, "n": i,
                        "user": {"email": c["email"], "name": c["name"]}, "ip": c["ip"]})
                .to_string(),
            );
            lines.push('\n');
            plain.push(json!({"strmMeta": {"keyLink": out["keyLink"]}, "n": i,
                              "user": {"email": v["email"], "name": v["name"]}, "ip": v["ip"]}));
        }
    }
    (lines, plain)
}

/// Runs `keyexportd decrypt`; (success, stdout, stderr).
fn decrypt(keys: &str, extra: &[&str], input: &Path) -> (bool, String, String) {
    let mut args = vec!["decrypt", "--keys", keys];
    for f in FIELDS {
        args.extend(["--field", f]);
    }
    args.extend(extra);
    let out = Command::new(BIN).args(&args).arg(input).output().unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

async fn flush(d: &Daemon, name: &str) {
    d.call("POST", &format!("/v1/batch-exporters/{name}/flush"), None)
        .await
        .ok();
    eventually(10, "nothing pending", || async {
        let s = d
            .call("GET", &format!("/v1/batch-exporters/{name}"), None)
            .await;
        (s.body["batchExporter"]["status"]["pendingKeys"] == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decrypt_ten_thousand_events_from_local_and_s3_exports_like_python_tink() {
    let s3 = S3Server::start();
    s3.create_bucket("owner-keys");
    let d = Daemon::start("[account]\nkey_export_allowed = true\n");
    d.create_stream("s", None).await;
    s3_sink(&d, &s3, "owner-keys").await;
    for (name, sink, format) in [
        ("local", "local", "JSONL"),
        ("csv", "local", "CSV"),
        ("s3", "s3", "JSONL"),
    ] {
        let a = d
            .call(
                "POST",
                "/v1/batch-exporters",
                Some(json!({"name": name, "keyStreamRef": {"name": "s"}, "sinkName": sink,
                            "interval": 3600, "pathPrefix": format!("keys-{name}"), "format": format})),
            )
            .await;
        assert_eq!(a.status, 201, "{}", a.body);
    }
    let (events, plain) = encrypted_events(&d, "s", 10_000, 700).await;
    for name in ["local", "csv", "s3"] {
        flush(&d, name).await;
    }
    let events_path = d.root.join("events.jsonl");
    std::fs::write(&events_path, &events).unwrap();
    let expected: Vec<Value> = plain;

    let check = |stdout: &str, what: &str| {
        let got: Vec<Value> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(got.len(), 10_000, "{what}");
        for (g, e) in got.iter().zip(&expected) {
            assert_eq!(g, e, "{what}");
        }
    };
    let local_dir = d.data_dir.join("export/keys-local");
    let (ok, out_local, err) = decrypt(local_dir.to_str().unwrap(), &[], &events_path);
    assert!(ok, "{err}");
    check(&out_local, "local JSONL");
    assert!(
        err.contains("10000 events, 30000 fields decrypted, 0 events with an unknown keyLink"),
        "{err}"
    );
    let csv_dir = d.data_dir.join("export/keys-csv");
    let (ok, out_csv, err) = decrypt(csv_dir.to_str().unwrap(), &[], &events_path);
    assert!(ok, "{err}");
    assert_eq!(out_csv, out_local, "CSV exports decrypt the same");
    let creds = d.root.join("aws.json");
    std::fs::write(
        &creds,
        r#"{"AccessKey":{"AccessKeyId":"test-access-key","SecretAccessKey":"test-secret-key"}}"#,
    )
    .unwrap();
    let endpoint = s3.endpoint();
    let (ok, out_s3, err) = decrypt(
        "s3://owner-keys/keys-s3",
        &[
            "--endpoint",
            &endpoint,
            "--path-style",
            "--credentials-file",
            creds.to_str().unwrap(),
        ],
        &events_path,
    );
    assert!(ok, "{err}");
    assert_eq!(out_s3, out_local, "S3 exports decrypt the same");

    // Python Tink with only the exported files gives identical output.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/decrypt_events.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(&local_dir)
        .arg("strmMeta.keyLink")
        .args(FIELDS)
        .stdin(std::fs::File::open(&events_path).unwrap())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        out_local,
        "identical to Python Tink"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_from_the_bucket_into_a_new_data_directory() {
    let s3 = S3Server::start();
    s3.create_bucket("restore-keys");
    let mut d = Daemon::start("[account]\nkey_export_allowed = true\n");
    d.create_stream("s", None).await;
    s3_sink(&d, &s3, "restore-keys").await;
    let a = d
        .call(
            "POST",
            "/v1/batch-exporters",
            Some(
                json!({"name": "e", "keyStreamRef": {"name": "s"}, "sinkName": "s3",
                        "interval": 3600, "pathPrefix": "backup"}),
            ),
        )
        .await;
    assert_eq!(a.status, 201);
    let (events, plain) = encrypted_events(&d, "s", 300, 40).await;
    flush(&d, "e").await;
    assert!(d.stop().success());
    // Disaster: the data directory is gone.
    std::fs::remove_dir_all(&d.data_dir).unwrap();

    let creds = d.root.join("aws.json");
    std::fs::write(
        &creds,
        r#"{"AccessKey":{"AccessKeyId":"test-access-key","SecretAccessKey":"test-secret-key"}}"#,
    )
    .unwrap();
    let endpoint = s3.endpoint();
    let restore = |extra: &[&str]| {
        let out = Command::new(BIN)
            .args([
                "restore",
                "--from",
                "s3://restore-keys/backup",
                "--stream",
                "s",
                "--config",
            ])
            .arg(&d.config_path)
            .args([
                "--endpoint",
                &endpoint,
                "--path-style",
                "--credentials-file",
            ])
            .arg(&creds)
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    let (ok, out, err) = restore(&[]);
    assert!(ok, "{err}");
    let summary: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["restored"], 40, "{summary}");
    assert_eq!(summary["conflicts"], 0);
    // Idempotent.
    let (ok, out, err) = restore(&[]);
    assert!(ok, "{err}");
    let summary: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["restored"], 0);
    assert_eq!(summary["alreadyPresent"], 40);

    // The restored daemon decrypts the earlier ciphertexts through the API.
    d.launch();
    let mut by_link: HashMap<String, (Value, Value)> = HashMap::new();
    for (line, p) in events.lines().zip(&plain) {
        let e: Value = serde_json::from_str(line).unwrap();
        by_link.insert(
            e["strmMeta"]["keyLink"].as_str().unwrap().to_string(),
            (e, p.clone()),
        );
    }
    assert_eq!(by_link.len(), 40);
    for (link, (enc, p)) in &by_link {
        let dec = d
            .call(
                "POST",
                "/v1/decrypt",
                Some(json!({"keyLink": link, "values": {"email": enc["user"]["email"], "ip": enc["ip"]}})),
            )
            .await;
        assert_eq!(dec.ok()["values"]["email"], p["user"]["email"]);
        assert_eq!(dec.body["values"]["ip"], p["ip"]);
        let info = d.call("GET", &format!("/v1/keys/{link}"), None).await;
        assert_eq!(info.ok()["stream"], "s");
    }
    // Restored keys are not exported again, and a session gets a new key.
    let a = d
        .call(
            "POST",
            "/v1/batch-exporters",
            Some(
                json!({"name": "again", "keyStreamRef": {"name": "s"}, "sinkName": "local",
                        "interval": 3600, "pathPrefix": "again"}),
            ),
        )
        .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let f = d
        .call("POST", "/v1/batch-exporters/again/flush", None)
        .await;
    assert_eq!(f.ok()["objects"], json!([]));
    let fresh = d.key("s", "session-1").await;
    assert!(!by_link.contains_key(&fresh));

    // A keyLink that exists with other key material is refused, and said so.
    assert!(d.stop().success());
    let objects = s3.dump("restore-keys");
    let (name, body) = objects
        .iter()
        .find(|(k, _)| !k.contains(".strm_test_"))
        .unwrap();
    let mut lines: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (first, second) = (lines[0]["tinkKey"].clone(), lines[1]["tinkKey"].clone());
    lines[0]["tinkKey"] = second;
    lines[1]["tinkKey"] = first;
    let tampered = d.root.join("tampered");
    let target = tampered.join(name);
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&target, text + "{broken line\n").unwrap();
    let out = Command::new(BIN)
        .args(["restore", "--from"])
        .arg(&tampered)
        .args(["--stream", "s", "--config"])
        .arg(&d.config_path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("exists here with other key material"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{}:{}: not a key line",
            target.display(),
            lines.len() + 1
        )),
        "{stderr}"
    );
    let summary: Value = serde_json::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!(summary["conflicts"], 2);
    assert_eq!(summary["problems"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decrypt_reports_bad_input_with_its_location_and_goes_on() {
    let d = Daemon::start("[account]\nkey_export_allowed = true\n");
    d.create_stream("s", None).await;
    let a = d
        .call(
            "POST",
            "/v1/batch-exporters",
            Some(
                json!({"name": "e", "keyStreamRef": {"name": "s"}, "sinkName": "local",
                        "interval": 3600, "pathPrefix": "k"}),
            ),
        )
        .await;
    assert_eq!(a.status, 201);
    let (events, plain) = encrypted_events(&d, "s", 5, 5).await;
    flush(&d, "e").await;
    let keys_dir = d.root.join("keys");
    std::fs::create_dir_all(&keys_dir).unwrap();
    for entry in std::fs::read_dir(d.data_dir.join("export/k")).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, keys_dir.join(p.file_name().unwrap())).unwrap();
    }
    // A corrupt line in a key file, and a key object that cannot be read.
    let key_file = std::fs::read_dir(&keys_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            !p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".strm_test_")
        })
        .unwrap();
    let mut text = std::fs::read_to_string(&key_file).unwrap();
    text.push_str("{\"keyLink\": \"truncated\n");
    std::fs::write(&key_file, &text).unwrap();
    std::os::unix::fs::symlink(keys_dir.join("gone"), keys_dir.join("dangling.jsonl")).unwrap();
    // Events: one not JSON, one with a field that is not base64.
    let mut lines: Vec<String> = events.lines().map(String::from).collect();
    lines.insert(2, "this is not json".into());
    let mut bad: Value = serde_json::from_str(&lines[0]).unwrap();
    bad["ip"] = json!("%%% not base64");
    lines.push(bad.to_string());
    let input = d.root.join("events.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let (ok, out, err) = decrypt(keys_dir.to_str().unwrap(), &[], &input);
    assert!(!ok, "errors make a non-zero exit");
    let n = text.lines().count();
    assert!(
        err.contains(&format!("{}:{n}: not a key line", key_file.display())),
        "{err}"
    );
    assert!(err.contains("dangling.jsonl: cannot read"), "{err}");
    assert!(err.contains("input line 3: not a JSON event"), "{err}");
    assert!(
        err.contains("input line 7: field 'ip' is not valid base64"),
        "{err}"
    );
    let got: Vec<&str> = out.lines().collect();
    assert_eq!(got.len(), 7, "every line is written");
    assert_eq!(got[2], "this is not json");
    let first: Value = serde_json::from_str(got[0]).unwrap();
    assert_eq!(first, plain[0], "the rest is decrypted");
    let last: Value = serde_json::from_str(got[6]).unwrap();
    assert_eq!(last["ip"], "%%% not base64");
    assert_eq!(last["user"]["email"], plain[0]["user"]["email"]);
    // No keys at all is an error of its own.
    let empty = d.root.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (ok, _, err) = decrypt(empty.to_str().unwrap(), &[], &input);
    assert!(!ok && err.contains("no keys found"), "{err}");
    let (ok, _, err) = decrypt("/nonexistent/dir", &[], &input);
    assert!(!ok && err.contains("not a directory"), "{err}");
}
