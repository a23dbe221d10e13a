//! The README's promises: the daemon runs on its embedded defaults, and the curl
//! walk-through works verbatim against it.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn walkthrough() -> String {
    let readme = include_str!("../README.md");
    let start = readme
        .find("<!-- walkthrough")
        .expect("README has the walkthrough marker");
    let block = &readme[start..];
    let open = block.find("```sh\n").unwrap() + "```sh\n".len();
    let close = block[open..].find("```").unwrap();
    block[open..open + close].to_string()
}

#[test]
fn embedded_defaults_and_the_curl_walkthrough() {
    let cwd = tempfile::tempdir().unwrap();
    let log_path = cwd.path().join("daemon.log");
    let mut daemon = Command::new(common::BIN)
        .arg("serve")
        .current_dir(cwd.path())
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log_path)
        .unwrap()
        .contains("listening on 127.0.0.1:8750")
    {
        if let Some(status) = daemon.try_wait().unwrap() {
            panic!(
                "daemon exited ({status}); is port 8750 in use?\n{}",
                std::fs::read_to_string(&log_path).unwrap()
            );
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &walkthrough()])
        .current_dir(cwd.path())
        .output()
        .unwrap();
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let status = daemon.wait().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "walkthrough failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("\"keyStreamId\""), "{stdout}");
    assert!(
        stdout.contains("{\"values\":{\"email\":\"a@b.example\"}}"),
        "{stdout}"
    );
    assert!(stdout.contains("\"expiresAt\""), "{stdout}");
    assert!(status.success(), "SIGTERM exits 0");
    let data = cwd.path().join("keyexportd-data");
    assert!(data.join("admin.token").exists() && data.join("master.key").exists());
    let log = std::fs::read_to_string(&log_path).unwrap();
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    assert!(!log.contains(token.trim()), "the token is never logged");
}
