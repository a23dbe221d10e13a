//! Operations: metrics, readiness, SIGHUP reload of the tokens file, and the store's
//! 503 when it cannot write.

mod common;

use std::time::Duration;

use common::{Daemon, eventually};
use serde_json::json;

async fn metrics(d: &Daemon) -> String {
    let r = d
        .http
        .get(format!("{}/metrics", d.base))
        .bearer_auth(&d.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    r.text().await.unwrap()
}

/// The value of the sample whose line starts with `series` (name and labels).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_keys_exporters_and_requests() {
    let d = Daemon::start(
        "[account]\nkey_export_allowed = true\n[keys]\ngrace = \"1s\"\nrotation = \"1h\"\n",
    );
    d.create_stream("s", Some("1s")).await;
    for i in 0..5 {
        d.key("s", &format!("f{i}")).await;
    }
    d.call("GET", "/v1/streams/nope", None)
        .await
        .expect_error(404);
    let a = d
        .call(
            "POST",
            "/v1/batch-exporters",
            Some(json!({"keyStreamRef": {"name": "s"}, "pathPrefix": "p", "interval": 3600, "name": "e"})),
        )
        .await;
    assert_eq!(a.status, 201);
    let m = metrics(&d).await;
    assert_eq!(sample(&m, "keyexportd_keys_created_total"), Some(5.0));
    assert_eq!(
        sample(&m, "keyexportd_key_stream_length{stream=\"s\"}"),
        Some(5.0)
    );
    let tables = sample(&m, "keyexportd_current_key_tables{stream=\"s\"}").unwrap();
    assert!((1.0..=2.0).contains(&tables), "{tables} pointer tables");
    assert_eq!(
        sample(&m, "keyexportd_exporter_pending_keys{exporter=\"e\"}"),
        Some(5.0)
    );
    assert_eq!(
        sample(&m, "keyexportd_exporter_keys_total{exporter=\"e\"}"),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &m,
            "keyexportd_http_requests_total{route=\"/v1/streams/{name}\",method=\"GET\",status=\"404\"}"
        ),
        Some(1.0)
    );
    assert!(m.contains("keyexportd_http_request_duration_seconds_bucket{"));
    assert!(sample(&m, "keyexportd_store_size_bytes").unwrap() > 0.0);
    d.call("POST", "/v1/batch-exporters/e/flush", None)
        .await
        .ok();
    let m = metrics(&d).await;
    assert_eq!(
        sample(&m, "keyexportd_exporter_keys_total{exporter=\"e\"}"),
        Some(5.0)
    );
    assert_eq!(
        sample(&m, "keyexportd_exporter_objects_total{exporter=\"e\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, "keyexportd_exporter_pending_keys{exporter=\"e\"}"),
        Some(0.0)
    );
    assert!(
        sample(
            &m,
            "keyexportd_exporter_seconds_since_last_batch{exporter=\"e\"}"
        )
        .unwrap()
            < 5.0
    );
    // The keys rotate after 1 s and are purged 1 s later; their rotation period's
    // pointer table goes once they have all rotated.
    let m = eventually(15, "the purge", || async {
        let m = metrics(&d).await;
        (sample(&m, "keyexportd_keys_purged_total") == Some(5.0)
            && sample(&m, "keyexportd_current_key_tables{stream=\"s\"}") == Some(0.0))
        .then_some(m)
    })
    .await;
    assert_eq!(sample(&m, "keyexportd_keys_live"), Some(0.0));
    let r = d.call_as(None, "GET", "/readyz", None).await;
    assert_eq!(r.ok()["status"], "ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_tokens_file() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens_path = tmp.path().join("tokens.json");
    let hash = |secret: &str| {
        let mut child = std::process::Command::new(common::BIN)
            .arg("hash-token")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{secret}\n").as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let one = "kxd_provisioned-token-one-0123456789";
    let two = "kxd_provisioned-token-two-9876543210";
    std::fs::write(
        &tokens_path,
        json!({"tokens": [{"name": "pipeline", "scopes": ["keys"], "sha256": hash(one)}]})
            .to_string(),
    )
    .unwrap();
    let mut d = Daemon::configure(
        tmp.path(),
        &format!("[security]\ntokens_file = \"{}\"\n", tokens_path.display()),
    );
    d.launch();
    d.create_stream("s", None).await;
    let body = Some(json!({"keyField": "f"}));
    d.call_as(Some(one), "POST", "/v1/streams/s/keys", body.clone())
        .await
        .ok();
    d.call_as(Some(one), "GET", "/v1/streams", None)
        .await
        .expect_error(403);
    let list = d.call("GET", "/v1/tokens", None).await;
    assert!(list.ok().to_string().contains("\"source\":\"tokens_file\""));
    let m = d.call("DELETE", "/v1/tokens/pipeline", None).await;
    assert!(m.expect_error(409).contains("tokens_file"));

    // Replace token one by token two, then SIGHUP.
    std::fs::write(
        &tokens_path,
        json!({"tokens": [{"name": "batch", "scopes": ["keys", "decrypt"], "sha256": hash(two)}]})
            .to_string(),
    )
    .unwrap();
    d.signal(libc::SIGHUP);
    eventually(10, "the reload", || async {
        d.log()
            .contains(
                "security.tokens_file reloaded: added token 'batch', removed token 'pipeline'",
            )
            .then_some(())
    })
    .await;
    d.call_as(Some(one), "POST", "/v1/streams/s/keys", body.clone())
        .await
        .expect_error(401);
    d.call_as(Some(two), "POST", "/v1/streams/s/keys", body.clone())
        .await
        .ok();
    // A broken file keeps the tokens in force.
    std::fs::write(&tokens_path, "{not json").unwrap();
    d.signal(libc::SIGHUP);
    eventually(10, "the failed reload", || async {
        d.log()
            .contains("the previous tokens stay in force")
            .then_some(())
    })
    .await;
    d.call_as(Some(two), "POST", "/v1/streams/s/keys", body.clone())
        .await
        .ok();
    let log = d.log();
    assert!(
        !log.contains(one) && !log.contains(two),
        "no token in the log"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
}
