//! The keys half of the daemon, end to end against the real binary.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Daemon, found_in_files, python};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_or_create_rotation_and_purge() {
    let d = Daemon::start("[keys]\ngrace = \"1s\"\npurge_interval = \"1s\"\n");
    d.create_stream("s", None).await;
    d.create_stream("fast", Some("2s")).await;
    let a = d.key("s", "session-1").await;
    assert_eq!(d.key("s", "session-1").await, a, "same keyField, same key");
    assert_ne!(
        d.key("s", "session-2").await,
        a,
        "another keyField, another key"
    );
    assert_ne!(
        d.key("fast", "session-1").await,
        a,
        "streams do not share keys"
    );

    let info = d.call("GET", &format!("/v1/keys/{a}"), None).await;
    let info = info.ok();
    assert_eq!(info["stream"], "s");
    assert_eq!(info["keyLink"], a.as_str());
    for f in ["createdAt", "rotatesAt", "expiresAt"] {
        assert!(info[f].as_str().unwrap().ends_with('Z'), "{info}");
    }

    // A 2 s rotation gives a new key after rotation; the old one decrypts until purged.
    let enc = d
        .call(
            "POST",
            "/v1/streams/fast/encrypt",
            Some(json!({"keyField": "k", "values": {"email": "a@b.example"}})),
        )
        .await;
    let old = enc.ok()["keyLink"].as_str().unwrap().to_string();
    let ct = enc.body["values"]["email"].as_str().unwrap().to_string();
    assert_eq!(d.key("fast", "k").await, old);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let new = d.key("fast", "k").await;
    assert_ne!(new, old, "rotated after 2 s");
    assert_eq!(d.key("fast", "k").await, new);
    let dec = d
        .call(
            "POST",
            "/v1/decrypt",
            Some(json!({"keyLink": old, "values": {"email": ct}})),
        )
        .await;
    assert_eq!(dec.ok()["values"]["email"], "a@b.example", "within grace");

    // grace is 1 s and the janitor runs every second.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let dec = d
        .call(
            "POST",
            "/v1/decrypt",
            Some(json!({"keyLink": old, "values": {"email": ct}})),
        )
        .await;
    assert!(dec.expect_error(410).contains("purged"));
    d.call("GET", &format!("/v1/keys/{old}"), None)
        .await
        .expect_error(404);
    d.call("GET", &format!("/v1/keys/{new}"), None).await.ok();
    assert!(d.log().contains("") && !d.log().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_for_one_new_key_field_get_one_key_link() {
    let d = Arc::new(Daemon::start(""));
    d.create_stream("s", None).await;
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let d = d.clone();
            tokio::spawn(async move { d.key("s", "brand-new-session").await })
        })
        .collect();
    let mut links = HashSet::new();
    for t in tasks {
        links.insert(t.await.unwrap());
    }
    assert_eq!(links.len(), 1, "{links:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_survive_restart_and_kill_9() {
    let mut d = Daemon::start("");
    d.create_stream("s", None).await;
    let before: Vec<(String, String)> = {
        let mut v = Vec::new();
        for i in 0..50 {
            let f = format!("f{i}");
            v.push((f.clone(), d.key("s", &f).await));
        }
        v
    };
    assert!(d.stop().success(), "SIGTERM exits 0");
    d.launch();
    for (f, link) in &before {
        assert_eq!(&d.key("s", f).await, link, "same key after restart");
    }

    // kill -9 in the middle of a load of key creations.
    let answered = Arc::new(Mutex::new(Vec::<String>::new()));
    let d = Arc::new(Mutex::new(d));
    let (base, token) = {
        let g = d.lock().unwrap();
        (g.base.clone(), g.token.clone())
    };
    let http = reqwest::Client::new();
    let mut workers = Vec::new();
    for w in 0..16 {
        let answered = answered.clone();
        let http = http.clone();
        let base = base.clone();
        let token = token.clone();
        workers.push(tokio::spawn(async move {
            for i in 0.. {
                let r = http
                    .post(format!("{base}/v1/streams/s/keys"))
                    .bearer_auth(&token)
                    .json(&json!({"keyField": format!("load-{w}-{i}")}))
                    .send()
                    .await;
                let Ok(r) = r else { break };
                if r.status() != 200 {
                    break;
                }
                let Ok(v) = r.json::<Value>().await else {
                    break;
                };
                answered
                    .lock()
                    .unwrap()
                    .push(v["keyLink"].as_str().unwrap().to_string());
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    d.lock().unwrap().kill9();
    for w in workers {
        let _ = w.await;
    }
    let answered = answered.lock().unwrap().clone();
    assert!(answered.len() > 20, "load ran: {} keys", answered.len());
    let mut d = Arc::try_unwrap(d).ok().unwrap().into_inner().unwrap();
    d.launch();
    for link in &answered {
        d.call("GET", &format!("/v1/keys/{link}"), None).await.ok();
    }
    for (f, link) in &before {
        assert_eq!(&d.key("s", f).await, link);
    }
    assert!(d.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_tink_decrypts_and_reencrypts_identically() {
    let d = Daemon::start("[account]\nkey_export_allowed = true\n");
    d.create_stream("s", None).await;
    let mut keys = Vec::new();
    for session in ["session-a", "session-b"] {
        let plaintexts = [
            "a@b.example",
            "",
            "ünïcödé ✓",
            "0123456789abcdef0123456789abcdef",
        ];
        let values: serde_json::Map<String, Value> = plaintexts
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("f{i}"), Value::String(p.to_string())))
            .collect();
        let enc = d
            .call(
                "POST",
                "/v1/streams/s/encrypt",
                Some(json!({"keyField": session, "values": values})),
            )
            .await;
        let link = enc.ok()["keyLink"].as_str().unwrap().to_string();
        let export = d
            .call("GET", &format!("/v1/keys/{link}/export"), None)
            .await;
        let export = export.ok().clone();
        assert_eq!(export["keyLink"], link.as_str());
        assert!(export["tinkKey"].is_object(), "tinkKey is a nested object");
        let cases: Vec<Value> = plaintexts
            .iter()
            .enumerate()
            .map(
                |(i, p)| json!({"plaintext": p, "ciphertext": enc.body["values"][format!("f{i}")]}),
            )
            .collect();
        keys.push(json!({"keyLink": link, "tinkKey": export["tinkKey"], "cases": cases}));
    }
    let out = python("tink_interop.py", &json!({ "keys": keys }));
    for (sent, got) in keys.iter().zip(out["keys"].as_array().unwrap()) {
        for (i, case) in sent["cases"].as_array().unwrap().iter().enumerate() {
            assert_eq!(got["decrypted"][i], case["plaintext"]);
            assert_eq!(
                got["reencrypted"][i], case["ciphertext"],
                "byte-identical ciphertext"
            );
        }
    }
    assert!(
        d.log()
            .contains("key export: token 'admin' exported the keyset")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_directory_holds_no_clear_keyset_and_no_key_field() {
    let mut d = Daemon::start("[account]\nkey_export_allowed = true\n");
    d.create_stream("s", None).await;
    let field = "user-4711@pii.example";
    let link = d.key("s", field).await;
    let export = d
        .call("GET", &format!("/v1/keys/{link}/export"), None)
        .await;
    let keyset = keyexportd::crypto::keyset_from_json(&export.ok()["tinkKey"]).unwrap();
    let raw = keyexportd::crypto::raw_key_material(&keyset).unwrap();
    assert_eq!(raw[0].len(), 64);
    assert!(d.stop().success());
    for needle in [&raw[0][..], &raw[0][..16], &raw[0][48..]] {
        assert_eq!(
            found_in_files(&d.data_dir, needle),
            None,
            "raw key bytes on disk"
        );
    }
    assert_eq!(
        found_in_files(&d.data_dir, &keyset),
        None,
        "keyset proto on disk"
    );
    assert_eq!(
        found_in_files(&d.data_dir, field.as_bytes()),
        None,
        "keyField on disk"
    );
    assert!(!d.log().contains(field), "keyField in the log");
    // The keyLink itself is stored (it is not a secret): the search can find things.
    let uuid = uuid::Uuid::parse_str(&link).unwrap();
    assert!(found_in_files(&d.data_dir, uuid.as_bytes()).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_their_status_and_change_nothing() {
    let d = Daemon::start("");
    d.create_stream("s", None).await;
    let link = d.key("s", "existing").await;
    let streams_before = d.call("GET", "/v1/streams", None).await.body;

    // 1-3: authentication.
    d.call_as(None, "GET", "/v1/streams", None)
        .await
        .expect_error(401);
    d.call_as(Some("kxd_wrong"), "GET", "/v1/streams", None)
        .await
        .expect_error(401);
    d.call_as(Some(""), "POST", "/v1/streams", Some(json!({"name": "x"})))
        .await
        .expect_error(401);
    // 4: malformed JSON.
    let m = d
        .call_raw(
            "POST",
            "/v1/streams",
            Some("application/json"),
            b"{\"name\":".to_vec(),
        )
        .await;
    assert!(m.expect_error(400).contains("invalid request body"));
    // 5: unknown field.
    let m = d
        .call(
            "POST",
            "/v1/streams",
            Some(json!({"name": "x", "colour": "red"})),
        )
        .await;
    assert!(m.expect_error(400).contains("colour"));
    // 6-9: bad names.
    for bad in ["Bad", ".hidden", "", "a/b"] {
        let m = d
            .call("POST", "/v1/streams", Some(json!({ "name": bad })))
            .await;
        assert!(m.expect_error(400).contains("name"), "{bad}");
    }
    let long = "a".repeat(65);
    d.call("POST", "/v1/streams", Some(json!({ "name": long })))
        .await
        .expect_error(400);
    // 10: missing field.
    let m = d.call("POST", "/v1/streams", Some(json!({}))).await;
    assert!(m.expect_error(400).contains("name"));
    let m = d.call("POST", "/v1/streams/s/keys", Some(json!({}))).await;
    assert!(m.expect_error(400).contains("keyField"));
    // 11: bad duration.
    let m = d
        .call(
            "POST",
            "/v1/streams",
            Some(json!({"name": "x", "keyRotation": "soon"})),
        )
        .await;
    assert!(m.expect_error(400).contains("soon"));
    // 12: duplicate name.
    d.call("POST", "/v1/streams", Some(json!({"name": "s"})))
        .await
        .expect_error(409);
    // 13: unknown stream.
    d.call(
        "POST",
        "/v1/streams/nope/keys",
        Some(json!({"keyField": "a"})),
    )
    .await
    .expect_error(404);
    d.call("GET", "/v1/streams/nope", None)
        .await
        .expect_error(404);
    d.call("DELETE", "/v1/streams/nope", None)
        .await
        .expect_error(404);
    // 14: garbage ciphertext, bad base64, unknown and malformed keyLinks.
    let m = d
        .call(
            "POST",
            "/v1/decrypt",
            Some(json!({"keyLink": link, "values": {"e": "AAAA"}})),
        )
        .await;
    assert!(m.expect_error(400).contains("values.e"));
    let m = d
        .call(
            "POST",
            "/v1/decrypt",
            Some(json!({"keyLink": link, "values": {"e": "!!"}})),
        )
        .await;
    assert!(m.expect_error(400).contains("base64"));
    let unknown = uuid::Uuid::new_v4().to_string();
    d.call(
        "POST",
        "/v1/decrypt",
        Some(json!({"keyLink": unknown, "values": {}})),
    )
    .await
    .expect_error(404);
    d.call("GET", &format!("/v1/keys/{unknown}"), None)
        .await
        .expect_error(404);
    d.call("GET", "/v1/keys/not-a-uuid", None)
        .await
        .expect_error(400);
    // 15: huge body.
    let huge = format!("{{\"name\":\"{}\"}}", "a".repeat(2 << 20));
    let m = d
        .call_raw(
            "POST",
            "/v1/streams",
            Some("application/json"),
            huge.into_bytes(),
        )
        .await;
    m.expect_error(413);
    // The body was left unread, so the connection closes, and the answer says so: the
    // next request (below) goes out on a new one instead of failing on this one.
    assert!(m.closes, "413 without Connection: close");
    // 16: not JSON content.
    let m = d
        .call_raw(
            "POST",
            "/v1/streams",
            Some("text/plain"),
            b"{\"name\":\"x\"}".to_vec(),
        )
        .await;
    m.expect_error(415);
    assert!(m.closes, "415 without Connection: close");
    // A request whose body was read keeps its connection.
    let m = d.call("GET", "/v1/streams", None).await;
    assert!(m.status == 200 && !m.closes, "{}", m.body);
    // 17: values that are not strings; empty keyField; mixed single and batch shapes.
    let m = d
        .call(
            "POST",
            "/v1/streams/s/encrypt",
            Some(json!({"keyField": "a", "values": {"n": 5}})),
        )
        .await;
    assert!(m.expect_error(400).contains("values.n"));
    d.call("POST", "/v1/streams/s/keys", Some(json!({"keyField": ""})))
        .await
        .expect_error(400);
    d.call(
        "POST",
        "/v1/streams/s/encrypt",
        Some(json!({"keyField": "a", "values": {}, "events": []})),
    )
    .await
    .expect_error(400);
    let m = d
        .call(
            "POST",
            "/v1/streams/s/encrypt",
            Some(json!({"events": [{"keyField": "a", "values": {"ok": "x"}}, {"keyField": "b", "values": {"x": []}}]})),
        )
        .await;
    assert!(m.expect_error(400).contains("events[1].values.x"));
    // 18: export while not allowed.
    let m = d
        .call("GET", &format!("/v1/keys/{link}/export"), None)
        .await;
    assert!(m.expect_error(403).contains("key_export_allowed"));
    // 19: unknown route and wrong method.
    d.call("GET", "/v1/nothing", None).await.expect_error(404);
    d.call("PUT", "/v1/streams", None).await.expect_error(405);

    // Nothing changed.
    assert_eq!(
        d.call("GET", "/v1/streams", None).await.body,
        streams_before
    );
    assert_eq!(d.key("s", "existing").await, link);
    // The mixed batch above created no key for "a" before failing validation.
    assert!(!d.log().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_encryption_matches_single_encryption() {
    let d = Daemon::start("");
    d.create_stream("s", None).await;
    let events: Vec<Value> = (0..50)
        .map(|i| json!({"keyField": format!("sess-{}", i % 7), "values": {"a": format!("v{i}"), "b": "same"}}))
        .collect();
    let batch = d
        .call(
            "POST",
            "/v1/streams/s/encrypt",
            Some(json!({ "events": events })),
        )
        .await;
    let out = batch.ok()["events"].as_array().unwrap().clone();
    assert_eq!(out.len(), 50);
    for (i, e) in out.iter().enumerate() {
        let single = d
            .call(
                "POST",
                "/v1/streams/s/encrypt",
                Some(json!({"keyField": format!("sess-{}", i % 7), "values": {"a": format!("v{i}"), "b": "same"}})),
            )
            .await;
        assert_eq!(single.ok(), e, "deterministic and same key");
    }
    let distinct: HashSet<&str> = out.iter().map(|e| e["keyLink"].as_str().unwrap()).collect();
    assert_eq!(distinct.len(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_crud_account_and_health() {
    let d = Daemon::start("[account]\nbilling_id = \"demo8542234275\"\n");
    let s = d.create_stream("stream-machine", Some("24h")).await;
    assert_eq!(
        s["ref"],
        json!({"billingId": "demo8542234275", "name": "stream-machine"})
    );
    assert_eq!(s["keyRotation"], "24h");
    assert!(uuid::Uuid::parse_str(s["keyStreamId"].as_str().unwrap()).is_ok());
    let s2 = d.create_stream("short", Some("90")).await;
    assert_eq!(s2["keyRotation"], "90s");
    let one = d.call("GET", "/v1/streams/stream-machine", None).await;
    assert_eq!(one.ok()["stream"], s);
    let list = d.call("GET", "/v1/streams", None).await;
    assert_eq!(list.ok()["streams"].as_array().unwrap().len(), 2);
    let link = d.key("stream-machine", "x").await;
    assert_eq!(
        d.call("DELETE", "/v1/streams/stream-machine", None)
            .await
            .ok(),
        &json!({})
    );
    d.call("GET", "/v1/streams/stream-machine", None)
        .await
        .expect_error(404);
    d.call("GET", &format!("/v1/keys/{link}"), None)
        .await
        .expect_error(404);
    let acct = d.call("GET", "/v1/account", None).await;
    assert_eq!(
        acct.ok(),
        &json!({"billingId": "demo8542234275", "keyExportAllowed": false})
    );
    let h = d.call_as(None, "GET", "/healthz", None).await;
    assert_eq!(h.ok()["status"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_manages_streams() {
    let d = Daemon::start("");
    let (ok, out, err) = d.cli(&[
        "create",
        "stream",
        "stream-machine",
        "--key-rotation",
        "12h",
    ]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ref"]["name"], "stream-machine");
    assert_eq!(v["keyRotation"], "12h");
    let (ok, out, _) = d.cli(&["list", "streams"]);
    assert!(ok);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["streams"][0]["ref"]["name"], "stream-machine");
    let (ok, out, _) = d.cli(&["list", "stream", "-o", "table"]);
    assert!(ok);
    assert!(
        out.starts_with("NAME") && out.contains("stream-machine"),
        "{out}"
    );
    let (ok, out, _) = d.cli(&["get", "stream", "stream-machine"]);
    assert!(ok);
    assert!(out.contains("\"keyStreamId\""));
    let (ok, _, err) = d.cli(&["create", "stream", "stream-machine"]);
    assert!(!ok);
    assert!(
        err.contains("already exists") && err.contains("409"),
        "{err}"
    );
    let (ok, out, _) = d.cli(&["delete", "streams", "stream-machine"]);
    assert!(ok);
    assert_eq!(out.trim(), "{}");
    let (ok, _, err) = d.cli(&["get", "stream", "stream-machine"]);
    assert!(!ok && err.contains("not found"), "{err}");
}

#[test]
fn config_errors_stop_the_daemon_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::configure(tmp.path(), "[keys]\nrotaton = \"1h\"\n");
    let (status, err) = d.run_expecting_exit();
    assert!(!status.success());
    assert!(err.contains("rotaton"), "{err}");
    let d = Daemon::configure(tmp.path(), "[keys]\ngrace = \"soon\"\n");
    let (status, err) = d.run_expecting_exit();
    assert!(!status.success());
    assert!(err.contains("grace") && err.contains("soon"), "{err}");
    let d = Daemon::configure(tmp.path(), "[server]\nlisten = \"nowhere\"\n");
    let (status, err) = d.run_expecting_exit();
    assert!(!status.success());
    assert!(err.contains("server.listen"), "{err}");
    assert!(!d.data_dir.exists(), "a bad config creates nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_master_key_stops_the_daemon_and_changes_nothing() {
    let mut d = Daemon::start("");
    d.create_stream("s", None).await;
    let link = d.key("s", "f").await;
    assert!(d.stop().success());
    let key_path = d.data_dir.join("master.key");
    let original = std::fs::read(&key_path).unwrap();
    std::fs::remove_file(&key_path).unwrap();
    // Missing key with an existing database: refuse, do not generate a new one.
    let (status, err) = d.run_expecting_exit();
    assert!(!status.success());
    assert!(err.contains("no master key found"), "{err}");
    assert!(!key_path.exists());
    // Another key: refuse with the ids.
    let other = d.root.join("other.key");
    let out = std::process::Command::new(common::BIN)
        .arg("generate-master-key")
        .arg(&other)
        .output()
        .unwrap();
    assert!(out.status.success());
    d.reconfigure(&format!(
        "[security]\nmaster_key_file = \"{}\"\n",
        other.display()
    ));
    let (status, err) = d.run_expecting_exit();
    assert!(!status.success());
    assert!(err.contains("master key does not match"), "{err}");
    // The right key again: everything is there.
    std::fs::write(&key_path, original).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    d.reconfigure("");
    d.launch();
    assert_eq!(d.key("s", "f").await, link);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_log_level_and_second_daemon_is_refused() {
    let mut d = Daemon::start("");
    d.create_stream("s", None).await;
    d.reconfigure("[log]\nlevel = \"debug\"\n");
    d.signal(libc::SIGHUP);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !d.log().contains("log.level changed from 'info' to 'debug'") {
        assert!(std::time::Instant::now() < deadline, "{}", d.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    d.call("GET", "/v1/streams", None).await.ok();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        d.log().contains("GET /v1/streams -> 200"),
        "debug lines after reload"
    );
    // A second daemon on the same data directory is refused.
    let (status, err) = d.run_expecting_exit();
    assert!(!status.success());
    assert!(err.contains("in use by another keyexportd"), "{err}");
    assert!(d.stop().success());
}
