//! Test harness: the real `keyexportd` binary on a temporary data directory, a free
//! loopback port, and an HTTP client holding the admin token.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_keyexportd");

/// Deep-merges `overlay` into `base`.
fn merge(base: &mut toml::Table, overlay: toml::Table) {
    for (k, v) in overlay {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// A running daemon and everything needed to talk to it.
pub struct Daemon {
    pub root: PathBuf,
    pub config_path: PathBuf,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    pub base: String,
    pub token: String,
    pub http: reqwest::Client,
    /// Extra environment for the next launch (fault injection).
    pub env: Vec<(String, String)>,
    /// Every answer body received, for the secrets test.
    pub transcript: std::sync::Mutex<Vec<String>>,
    /// The certificate the CLI and client trust when the API speaks TLS.
    pub ca_cert: Option<PathBuf>,
    child: Option<Child>,
    _tmp: Option<tempfile::TempDir>,
}

pub struct Answer {
    pub status: u16,
    pub body: Value,
    /// The answer said `Connection: close`.
    pub closes: bool,
}

impl Answer {
    /// Asserts the status and an error body with a message.
    pub fn expect_error(&self, status: u16) -> &str {
        assert_eq!(self.status, status, "body: {}", self.body);
        let msg = self.body["error"]["message"].as_str().unwrap_or_else(|| {
            panic!("error body without message: {}", self.body);
        });
        assert!(!msg.is_empty());
        assert!(self.body["error"]["code"].is_string(), "{}", self.body);
        msg
    }

    pub fn ok(&self) -> &Value {
        assert!(
            (200..300).contains(&self.status),
            "status {}: {}",
            self.status,
            self.body
        );
        &self.body
    }
}

impl Daemon {
    /// Starts a daemon with the test defaults overlaid by `overrides` (TOML).
    pub fn start(overrides: &str) -> Daemon {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let mut d = Daemon::configure(&root, overrides);
        d._tmp = Some(tmp);
        d.launch();
        d
    }

    /// Writes the config for a daemon rooted at `root` without starting it.
    pub fn configure(root: &Path, overrides: &str) -> Daemon {
        let data_dir = root.join("data");
        let mut config: toml::Table = toml::from_str(&format!(
            r#"
            [server]
            listen = "127.0.0.1:0"
            [storage]
            data_dir = "{}"
            [export]
            min_interval = "1s"
            [log]
            level = "info"
            "#,
            data_dir.display()
        ))
        .unwrap();
        merge(&mut config, toml::from_str(overrides).unwrap());
        let config_path = root.join("keyexportd.toml");
        std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
        Daemon {
            root: root.to_path_buf(),
            config_path,
            data_dir,
            log_path: root.join("daemon.log"),
            base: String::new(),
            token: String::new(),
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .build()
                .unwrap(),
            env: Vec::new(),
            transcript: Default::default(),
            ca_cert: None,
            child: None,
            _tmp: None,
        }
    }

    /// Trusts `pem` (a self-signed certificate) for this daemon's TLS.
    pub fn trust(&mut self, pem: &Path) {
        self.ca_cert = Some(pem.to_path_buf());
        let cert = reqwest::Certificate::from_pem(&std::fs::read(pem).unwrap()).unwrap();
        self.http = reqwest::Client::builder()
            .tls_certs_only([cert])
            .build()
            .unwrap();
    }

    /// Rewrites the config with new overrides (for restarts and SIGHUP).
    pub fn reconfigure(&mut self, overrides: &str) {
        let fresh = Daemon::configure(&self.root, overrides);
        self.config_path = fresh.config_path.clone();
    }

    /// Starts the binary and waits until it listens.
    pub fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        let start_len = std::fs::metadata(&self.log_path).unwrap().len() as usize;
        let child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&self.config_path)
            .env_remove("RUST_LOG")
            .envs(self.env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
            let new = &text[start_len.min(text.len())..];
            if let Some(pos) = new.find(" listening on ") {
                let rest = &new[pos + " listening on ".len()..];
                let line = rest.lines().next().unwrap();
                let addr = line.split([' ', ';']).next().unwrap();
                let scheme = if line.contains("(TLS)") {
                    "https"
                } else {
                    "http"
                };
                self.base = format!("{scheme}://{addr}");
                break;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("daemon exited with {status} before listening:\n{new}");
            }
            assert!(Instant::now() < deadline, "daemon did not start:\n{new}");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.token = std::fs::read_to_string(self.data_dir.join("admin.token"))
            .unwrap()
            .trim()
            .to_string();
    }

    /// Runs the binary with `serve` and waits for it to exit; (status, stderr).
    pub fn run_expecting_exit(&self) -> (ExitStatus, String) {
        let mut child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&self.config_path)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                return (status, err);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("daemon did not exit");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid() as i32, sig);
        }
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait()
    }

    pub fn wait(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("daemon did not stop");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, no chance to flush.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// A request with the admin token.
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Answer {
        let token = self.token.clone();
        self.call_as(Some(&token), method, path, body).await
    }

    pub async fn call_as(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Answer {
        let mut req = self.http.request(
            reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
            format!("{}{path}", self.base),
        );
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        self.record(Answer::from(resp).await)
    }

    fn record(&self, a: Answer) -> Answer {
        self.transcript.lock().unwrap().push(a.body.to_string());
        a
    }

    /// A request with a raw body and content type.
    pub async fn call_raw(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Answer {
        let mut req = self
            .http
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                format!("{}{path}", self.base),
            )
            .bearer_auth(&self.token)
            .body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        self.record(Answer::from(req.send().await.unwrap()).await)
    }

    pub async fn create_stream(&self, name: &str, rotation: Option<&str>) -> Value {
        let mut body = serde_json::json!({ "name": name });
        if let Some(r) = rotation {
            body["keyRotation"] = r.into();
        }
        let a = self.call("POST", "/v1/streams", Some(body)).await;
        assert_eq!(a.status, 201, "{}", a.body);
        a.body
    }

    pub async fn key(&self, stream: &str, field: &str) -> String {
        let a = self
            .call(
                "POST",
                &format!("/v1/streams/{stream}/keys"),
                Some(serde_json::json!({ "keyField": field })),
            )
            .await;
        a.ok()["keyLink"].as_str().unwrap().to_string()
    }

    /// Runs the CLI against this daemon; (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .arg("--api-host")
            .arg(&self.base)
            .arg("--token-file")
            .arg(self.data_dir.join("admin.token"));
        if let Some(ca) = &self.ca_cert {
            cmd.arg("--ca-cert").arg(ca);
        }
        let out = cmd.output().unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        let mut t = self.transcript.lock().unwrap();
        t.push(stdout.clone());
        t.push(stderr.clone());
        (out.status.success(), stdout, stderr)
    }
}

impl Answer {
    async fn from(resp: reqwest::Response) -> Answer {
        let status = resp.status().as_u16();
        let closes = resp
            .headers()
            .get(reqwest::header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        let text = resp.text().await.unwrap();
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("status {status}: body is not JSON: {text:?}"));
        Answer {
            status,
            body,
            closes,
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// True when `needle` occurs in any file under `dir`.
pub fn found_in_files(dir: &Path, needle: &[u8]) -> Option<PathBuf> {
    files_under(dir).into_iter().find(|p| {
        let bytes = std::fs::read(p).unwrap_or_default();
        bytes.windows(needle.len()).any(|w| w == needle)
    })
}

/// Runs a Python script from `tests/py` with `input` as JSON on stdin; its JSON stdout.
pub fn python(script: &str, input: &Value) -> Value {
    use std::io::Write;
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(script);
    let mut child = Command::new("python3")
        .arg(&path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 is needed for the interop tests (.ci/run installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{script} failed (is PyPI 'tink' installed? .ci/run installs it):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A free TCP port on loopback (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// moto's S3 server on a loopback port, read back with boto3.
pub struct S3Server {
    pub port: u16,
    child: Option<Child>,
    /// Environment of the server process (moto's settings).
    env: Vec<(String, String)>,
}

impl S3Server {
    pub fn start() -> S3Server {
        let mut s = S3Server {
            port: free_port(),
            child: None,
            env: Vec::new(),
        };
        s.launch();
        s
    }

    /// moto with authentication enforced after its first `free_requests` requests: from
    /// then on its IAM decides, so unknown access keys are rejected and a user without a
    /// policy is denied.
    pub fn start_with_auth(free_requests: u32) -> S3Server {
        let mut s = S3Server {
            port: free_port(),
            child: None,
            env: vec![(
                "INITIAL_NO_AUTH_ACTION_COUNT".into(),
                free_requests.to_string(),
            )],
        };
        s.launch();
        s
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// (Re)starts the server on its port; its state starts empty.
    pub fn launch(&mut self) {
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .envs(self.env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server is needed for the S3 tests (.ci/run installs moto[server])");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "moto_server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(Instant::now() < deadline, "moto_server did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn tool(&self, args: &[&str]) -> Value {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/s3tool.py");
        let out = Command::new("python3")
            .arg(path)
            .arg(self.endpoint())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "s3tool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn create_bucket(&self, bucket: &str) {
        self.tool(&["create-bucket", bucket]);
    }

    /// Creates an IAM user without any policy (two requests); returns its access key
    /// id and secret.
    pub fn create_user(&self, user: &str) -> (String, String) {
        let v = self.tool(&["create-user", user]);
        (
            v["accessKeyId"].as_str().unwrap().to_string(),
            v["secretAccessKey"].as_str().unwrap().to_string(),
        )
    }

    /// Every object of the bucket: (key, body).
    pub fn dump(&self, bucket: &str) -> Vec<(String, String)> {
        self.tool(&["dump", bucket])["objects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                (
                    o["key"].as_str().unwrap().to_string(),
                    o["body"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// keyLink -> the objects it appears in, over exported JSON Lines objects.
pub fn key_links_by_object(
    objects: &[(String, String)],
) -> std::collections::HashMap<String, Vec<String>> {
    let mut map: std::collections::HashMap<String, Vec<String>> = Default::default();
    for (name, body) in objects {
        if !name.ends_with(".jsonl") || name.contains("/.strm_test_") {
            continue;
        }
        for line in body.lines() {
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{name}: bad line {line:?}: {e}"));
            assert!(v["tinkKey"].is_object(), "{name}: tinkKey is an object");
            map.entry(v["keyLink"].as_str().unwrap().to_string())
                .or_default()
                .push(name.clone());
        }
    }
    map
}

/// Polls `f` every 100 ms until it returns Some, or panics after `secs`.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
