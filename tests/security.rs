//! Security: scopes on every route, token revocation, TLS, file modes, and a full
//! scenario after which no secret appears in any log line, answer or error message.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use common::{Daemon, S3Server, eventually, files_under, found_in_files};
use serde_json::{Value, json};

/// Every route with a method, a body, and the scopes it needs.
fn routes(link: &str) -> Vec<(&'static str, String, Option<Value>, &'static [&'static str])> {
    vec![
        ("GET", "/v1/account".into(), None, &["admin"]),
        ("GET", "/v1/streams".into(), None, &["admin"]),
        (
            "POST",
            "/v1/streams".into(),
            Some(json!({"name": "new"})),
            &["admin"],
        ),
        ("GET", "/v1/streams/s".into(), None, &["admin"]),
        ("DELETE", "/v1/streams/s".into(), None, &["admin"]),
        (
            "POST",
            "/v1/streams/s/keys".into(),
            Some(json!({"keyField": "f"})),
            &["keys"],
        ),
        (
            "POST",
            "/v1/streams/s/encrypt".into(),
            Some(json!({"keyField": "f", "values": {"a": "b"}})),
            &["keys"],
        ),
        (
            "POST",
            "/v1/decrypt".into(),
            Some(json!({"keyLink": link, "values": {}})),
            &["decrypt"],
        ),
        ("GET", format!("/v1/keys/{link}"), None, &["keys"]),
        ("GET", format!("/v1/keys/{link}/export"), None, &["export"]),
        ("GET", "/v1/sinks".into(), None, &["admin"]),
        (
            "POST",
            "/v1/sinks".into(),
            Some(json!({"name": "x", "sinkType": "LOCAL", "local": {"path": "/tmp/x"}})),
            &["admin"],
        ),
        ("GET", "/v1/sinks/local".into(), None, &["admin"]),
        ("DELETE", "/v1/sinks/local".into(), None, &["admin"]),
        ("GET", "/v1/batch-exporters".into(), None, &["admin"]),
        (
            "POST",
            "/v1/batch-exporters".into(),
            Some(json!({"keyStreamRef": {"name": "s"}, "pathPrefix": "p"})),
            &["admin", "export"],
        ),
        ("GET", "/v1/batch-exporters/e".into(), None, &["admin"]),
        ("DELETE", "/v1/batch-exporters/e".into(), None, &["admin"]),
        (
            "POST",
            "/v1/batch-exporters/e/flush".into(),
            None,
            &["admin"],
        ),
        ("GET", "/v1/tokens".into(), None, &["admin"]),
        (
            "POST",
            "/v1/tokens".into(),
            Some(json!({"name": "t", "scopes": ["keys"]})),
            &["admin"],
        ),
        ("DELETE", "/v1/tokens/t".into(), None, &["admin"]),
        ("GET", "/metrics".into(), None, &["metrics"]),
    ]
}

const SCOPES: [&str; 5] = ["admin", "keys", "decrypt", "export", "metrics"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_checks_its_scopes() {
    let d = Daemon::start("[account]\nkey_export_allowed = true\n");
    d.create_stream("s", None).await;
    let link = d.key("s", "f").await;
    let mut tokens = Vec::new();
    for scope in SCOPES {
        let a = d
            .call(
                "POST",
                "/v1/tokens",
                Some(json!({"name": format!("only-{scope}"), "scopes": [scope]})),
            )
            .await;
        assert_eq!(a.status, 201, "{}", a.body);
        assert_eq!(a.body["scopes"], json!([scope]));
        tokens.push((scope, a.body["token"].as_str().unwrap().to_string()));
    }
    let a = d
        .call(
            "POST",
            "/v1/tokens",
            Some(json!({"name": "admin-no-export", "scopes": ["admin"]})),
        )
        .await;
    let admin_only = a.body["token"].as_str().unwrap().to_string();
    let a = d
        .call("POST", "/v1/tokens", Some(json!({"name": "revoked", "scopes": ["admin", "keys", "decrypt", "export", "metrics"]})))
        .await;
    let revoked = a.body["token"].as_str().unwrap().to_string();
    d.call("DELETE", "/v1/tokens/revoked", None).await.ok();

    let streams_before = d.call("GET", "/v1/streams", None).await.body;
    let mut checked = 0;
    for (method, path, body, needs) in routes(&link) {
        for (scope, token) in &tokens {
            if needs.len() == 1 && needs[0] == *scope {
                continue;
            }
            let a = d.call_as(Some(token), method, &path, body.clone()).await;
            let m = a.expect_error(403);
            let missing = needs.iter().find(|n| *n != scope).unwrap();
            assert!(
                m.contains(&format!("'{missing}' scope")),
                "{method} {path} with {scope}: {m}"
            );
            checked += 1;
        }
        let a = d.call_as(None, method, &path, body.clone()).await;
        a.expect_error(401);
        let a = d.call_as(Some(&revoked), method, &path, body.clone()).await;
        assert!(a.expect_error(401).contains("revoked"));
    }
    assert!(checked > 80, "{checked}");
    // Admin without export cannot create an exporter (key export is gated twice).
    let a = d
        .call_as(
            Some(&admin_only),
            "POST",
            "/v1/batch-exporters",
            Some(json!({"keyStreamRef": {"name": "s"}, "pathPrefix": "p"})),
        )
        .await;
    assert!(a.expect_error(403).contains("'export' scope"));
    // A token with the right scope passes the check.
    let keys_token = &tokens[1].1;
    let a = d
        .call_as(
            Some(keys_token),
            "POST",
            "/v1/streams/s/keys",
            Some(json!({"keyField": "f"})),
        )
        .await;
    assert_eq!(a.ok()["keyLink"], link.as_str());
    let a = d.call_as(None, "GET", "/healthz", None).await;
    a.ok();
    let a = d.call_as(None, "GET", "/readyz", None).await;
    assert_eq!(a.ok()["status"], "ready");
    let metrics = d
        .http
        .get(format!("{}/metrics", d.base))
        .bearer_auth(&tokens[4].1)
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);
    assert!(
        metrics
            .text()
            .await
            .unwrap()
            .contains("keyexportd_keys_created_total")
    );
    assert_eq!(
        d.call("GET", "/v1/streams", None).await.body,
        streams_before
    );
    // Token management.
    let list = d.call("GET", "/v1/tokens", None).await;
    let names: Vec<&str> = list.ok()["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"admin") && names.contains(&"only-keys") && !names.contains(&"revoked")
    );
    assert!(
        !list.body.to_string().contains("kxd_"),
        "no secret in the list"
    );
    let m = d.call("DELETE", "/v1/tokens/admin", None).await;
    assert!(m.expect_error(409).contains("admin.token"));
    d.call("DELETE", "/v1/tokens/nope", None)
        .await
        .expect_error(404);
    let m = d
        .call(
            "POST",
            "/v1/tokens",
            Some(json!({"name": "x", "scopes": ["root"]})),
        )
        .await;
    assert!(m.expect_error(400).contains("'root' is not a scope"));
    d.call(
        "POST",
        "/v1/tokens",
        Some(json!({"name": "x", "scopes": []})),
    )
    .await
    .expect_error(400);
    d.call(
        "POST",
        "/v1/tokens",
        Some(json!({"name": "only-keys", "scopes": ["keys"]})),
    )
    .await
    .expect_error(409);
    // The CLI manages tokens too.
    let (ok, out, err) = d.cli(&["create", "token", "pipeline", "--scopes", "keys,decrypt"]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(v["token"].as_str().unwrap().starts_with("kxd_"));
    assert_eq!(v["scopes"], json!(["keys", "decrypt"]));
    let (ok, out, _) = d.cli(&["list", "tokens", "-o", "table"]);
    assert!(
        ok && out.contains("pipeline") && !out.contains("kxd_"),
        "{out}"
    );
    let (ok, _, _) = d.cli(&["delete", "token", "pipeline"]);
    assert!(ok);
    let a = d
        .call_as(
            v["token"].as_str(),
            "POST",
            "/v1/streams/s/keys",
            Some(json!({"keyField": "f"})),
        )
        .await;
    a.expect_error(401);
    assert!(
        d.log()
            .contains("token 'pipeline' revoked by token 'admin'")
    );
}

/// Base64 and hex spellings of `bytes`, as they could leak into text.
fn spellings(bytes: &[u8]) -> Vec<String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    vec![
        b64.encode(bytes),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes),
        hex,
        // A middle chunk, in case the value is embedded differently.
        b64.encode(&bytes[8..32]),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_logs_answers_or_errors() {
    let mut s3 = S3Server::start();
    s3.create_bucket("secrets-bucket");
    let d = Daemon::start("[account]\nkey_export_allowed = true\n[log]\nlevel = \"debug\"\n");
    const S3_SECRET: &str = "S3-SECRET-wJalrXUtnFEMI-K7MDENG-bPxRfiCY";
    const S3_KEY_ID: &str = "AKIA-SECRET-KEY-ID-4711";
    d.create_stream("s", None).await;
    let a = d
        .call(
            "POST",
            "/v1/sinks",
            Some(json!({"name": "s3", "sinkType": "S3", "bucket": {
                "bucketName": "secrets-bucket", "endpoint": s3.endpoint(), "pathStyle": true,
                "credentials": {"accessKeyId": S3_KEY_ID, "secretAccessKey": S3_SECRET}}})),
        )
        .await;
    assert_eq!(a.status, 201);
    let t = d
        .call(
            "POST",
            "/v1/tokens",
            Some(json!({"name": "pipe", "scopes": ["keys", "decrypt"]})),
        )
        .await;
    let token_secret = t.body["token"].as_str().unwrap().to_string();
    // Keys, encryption, exports (API and exporter), decrypts.
    let mut raw_keys = Vec::new();
    for i in 0..5 {
        let enc = d
            .call_as(
                Some(&token_secret),
                "POST",
                "/v1/streams/s/encrypt",
                Some(json!({"keyField": format!("f{i}"), "values": {"v": "x"}})),
            )
            .await;
        let link = enc.ok()["keyLink"].as_str().unwrap().to_string();
        let exp = d
            .call("GET", &format!("/v1/keys/{link}/export"), None)
            .await;
        let keyset = keyexportd::crypto::keyset_from_json(&exp.ok()["tinkKey"]).unwrap();
        raw_keys.extend(keyexportd::crypto::raw_key_material(&keyset).unwrap());
    }
    let a = d
        .call(
            "POST",
            "/v1/batch-exporters",
            Some(
                json!({"keyStreamRef": {"name": "s"}, "sinkName": "s3", "pathPrefix": "p",
                        "interval": 1, "name": "e"}),
            ),
        )
        .await;
    assert_eq!(a.status, 201, "{}", a.body);
    eventually(20, "export", || async {
        let s = d.call("GET", "/v1/batch-exporters/e", None).await;
        (s.body["batchExporter"]["status"]["exportedKeys"] == 5).then_some(())
    })
    .await;
    // Failing uploads: the server goes away while keys keep coming.
    s3.stop();
    for i in 0..3 {
        d.key("s", &format!("outage-{i}")).await;
    }
    eventually(20, "an upload failure", || async {
        let s = d.call("GET", "/v1/batch-exporters/e", None).await;
        s.body["batchExporter"]["status"]["lastError"]
            .is_string()
            .then_some(())
    })
    .await;
    d.call("POST", "/v1/batch-exporters/e/flush", None)
        .await
        .expect_error(503);
    // Bad requests and error paths, including a wrong master-key-like body and a
    // creation that fails at the sink.
    d.call_as(Some("kxd_not-a-token"), "GET", "/v1/streams", None)
        .await
        .expect_error(401);
    d.call(
        "POST",
        "/v1/decrypt",
        Some(json!({"keyLink": uuid::Uuid::new_v4(), "values": {"a": "AAAA"}})),
    )
    .await
    .expect_error(404);
    d.call_raw(
        "POST",
        "/v1/sinks",
        Some("application/json"),
        b"{\"name\":".to_vec(),
    )
    .await
    .expect_error(400);
    d.call(
        "POST",
        "/v1/batch-exporters",
        Some(json!({"keyStreamRef": {"name": "s"}, "sinkName": "s3", "pathPrefix": "q"})),
    )
    .await
    .expect_error(400);
    let (ok, _, _) = d.cli(&["get", "sink", "s3"]);
    assert!(ok);
    let (ok, _, _) = d.cli(&["flush", "batch-exporter", "e"]);
    assert!(!ok);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let master = std::fs::read_to_string(d.data_dir.join("master.key")).unwrap();
    let master_json: Value = serde_json::from_str(&master).unwrap();
    let master_value = master_json["key"][0]["keyData"]["value"]
        .as_str()
        .unwrap()
        .to_string();
    let admin_token = d.token.clone();
    let log = d.log();
    assert!(!log.contains("panicked"), "{log}");
    let transcript = d.transcript.lock().unwrap().clone();
    // Answers that legitimately carry a secret: the token's create answer, key exports.
    let others: Vec<&String> = transcript
        .iter()
        .filter(|t| {
            !t.contains("\"tinkKey\"") && !t.contains(&format!("\"token\":\"{token_secret}\""))
        })
        .collect();
    let mut needles: Vec<String> = vec![
        S3_SECRET.into(),
        S3_KEY_ID.into(),
        token_secret.clone(),
        admin_token.clone(),
        master_value.clone(),
    ];
    for raw in &raw_keys {
        needles.extend(spellings(raw));
    }
    for needle in &needles {
        assert!(
            !log.contains(needle.as_str()),
            "a secret in the log: {needle}"
        );
        for t in &others {
            assert!(!t.contains(needle.as_str()), "a secret in an answer: {t}");
        }
    }
    // The stored S3 credentials are wrapped.
    assert_eq!(
        found_in_files(&d.data_dir.join("db"), S3_SECRET.as_bytes()),
        None
    );
    assert_eq!(
        found_in_files(&d.data_dir.join("db"), admin_token.as_bytes()),
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_private_and_an_exposed_master_key_is_refused() {
    let mut d = Daemon::start("");
    d.create_stream("s", None).await;
    d.key("s", "f").await;
    assert!(d.stop().success());
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&d.data_dir), 0o700);
    assert_eq!(mode(&d.data_dir.join("admin.token")), 0o600);
    assert_eq!(mode(&d.data_dir.join("master.key")), 0o600);
    for f in files_under(&d.data_dir) {
        assert_eq!(mode(&f) & 0o077, 0, "{} is readable by others", f.display());
    }
    let key = d.data_dir.join("master.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (status, err) = d.run_expecting_exit();
    assert!(!status.success());
    assert!(
        err.contains("accessible by other users") && err.contains("chmod 600"),
        "{err}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    d.launch();
    d.key("s", "f").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_api_and_plaintext_remote_refusal() {
    let tmp = tempfile::tempdir().unwrap();
    let cert = tmp.path().join("cert.pem");
    let key = tmp.path().join("key.pem");
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl is needed for the TLS test (.ci/run installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut d = Daemon::start(&format!(
        "[server]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        cert.display(),
        key.display()
    ));
    assert!(d.base.starts_with("https://"), "{}", d.base);
    d.trust(&cert);
    d.create_stream("s", None).await;
    d.key("s", "f").await;
    let (ok, out, err) = d.cli(&["list", "streams"]);
    assert!(ok, "{err}");
    assert!(out.contains("\"name\":\"s\""));
    // Plain HTTP to the TLS port gets no answer.
    let plain = d.base.replace("https://", "http://");
    let r = reqwest::Client::new()
        .get(format!("{plain}/healthz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(r.is_err() || !r.unwrap().status().is_success());
    // Without the certificate, the client refuses the connection.
    let r = reqwest::Client::new()
        .get(format!("{}/healthz", d.base))
        .send()
        .await;
    assert!(r.is_err());

    let d2 = Daemon::configure(tmp.path(), "[server]\nlisten = \"0.0.0.0:0\"\n");
    let (status, err) = d2.run_expecting_exit();
    assert!(!status.success());
    assert!(err.contains("allow_plaintext_remote"), "{err}");
}
