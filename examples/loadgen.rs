//! Load generator for the reliability scripts: creates keys at a steady rate (or as fast
//! as it can), writes every answered keyLink to a file as soon as it is answered, and
//! prints a JSON summary. Keeps going through connection errors, so a daemon can be
//! killed and restarted under it.
//!
//! ```text
//! cargo run --release --example loadgen -- --base http://127.0.0.1:8750 \
//!     --token-file keyexportd-data/admin.token --stream s --rate 1000 --seconds 60 \
//!     --out answered.txt
//! ```
//!
//! `--count N` stops after N requests, `--stop-file F` as soon as F exists.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Args {
    base: String,
    token: String,
    stream: String,
    /// Requests per second in total; 0 means as fast as the connections allow.
    rate: u64,
    seconds: u64,
    connections: usize,
    prefix: String,
    out: Option<String>,
    /// Stop after this many requests (0: no limit).
    count: u64,
    /// Stop as soon as this file exists (the benchmark's end of a measured phase).
    stop_file: Option<std::path::PathBuf>,
}

fn parse_args() -> Args {
    let mut a = Args {
        base: "http://127.0.0.1:8750".into(),
        token: String::new(),
        stream: "s".into(),
        rate: 0,
        seconds: 10,
        connections: 16,
        prefix: format!("load-{}", std::process::id()),
        out: None,
        count: 0,
        stop_file: None,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let v = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--base" => a.base = v,
            "--token-file" => {
                a.token = std::fs::read_to_string(&v)
                    .unwrap_or_else(|e| panic!("--token-file {v}: {e}"))
                    .trim()
                    .to_string()
            }
            "--stream" => a.stream = v,
            "--rate" => a.rate = v.parse().expect("--rate N"),
            "--seconds" => a.seconds = v.parse().expect("--seconds N"),
            "--connections" => a.connections = v.parse().expect("--connections N"),
            "--prefix" => a.prefix = v,
            "--out" => a.out = Some(v),
            "--count" => a.count = v.parse().expect("--count N"),
            "--stop-file" => a.stop_file = Some(v.into()),
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    a
}

#[tokio::main]
async fn main() {
    let args = Arc::new(parse_args());
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        // Below the daemon's 30 s for an idle connection, so that the pool never sends
        // a request on a connection the daemon is closing.
        .pool_idle_timeout(Duration::from_secs(20))
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let out: Option<Arc<Mutex<std::fs::File>>> = args.out.as_ref().map(|p| {
        Arc::new(Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .unwrap(),
        ))
    });
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    // The first few failures, as said by the client or the daemon (the summary shows them).
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let latencies = Arc::new(Mutex::new(Vec::<u32>::new()));
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.seconds);
    let mut workers = Vec::new();
    for _ in 0..args.connections {
        let (args, client, out, ok, failed, latencies, next) = (
            args.clone(),
            client.clone(),
            out.clone(),
            ok.clone(),
            failed.clone(),
            latencies.clone(),
            next.clone(),
        );
        let failures = failures.clone();
        workers.push(tokio::spawn(async move {
            let url = format!("{}/v1/streams/{}/keys", args.base, args.stream);
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                // Request n is due at n / rate seconds after the start.
                if let Some(micros) = (n * 1_000_000).checked_div(args.rate) {
                    let due = started + Duration::from_micros(micros);
                    tokio::time::sleep_until(due.into()).await;
                }
                if Instant::now() >= deadline
                    || (args.count > 0 && n >= args.count)
                    || args.stop_file.as_ref().is_some_and(|f| f.exists())
                {
                    break;
                }
                let t = Instant::now();
                let r = client
                    .post(&url)
                    .bearer_auth(&args.token)
                    .json(&serde_json::json!({"keyField": format!("{}-{n}", args.prefix)}))
                    .send()
                    .await;
                let link = match r {
                    Ok(r) if r.status() == 200 => r
                        .json::<serde_json::Value>()
                        .await
                        .map_err(|e| format!("reading the answer: {e}"))
                        .and_then(|v| {
                            v["keyLink"]
                                .as_str()
                                .map(String::from)
                                .ok_or_else(|| format!("no keyLink in {v}"))
                        }),
                    Ok(r) => Err(format!(
                        "{}: {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    )),
                    Err(e) => Err(format!("{e:?}")),
                };
                match link {
                    Ok(link) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        latencies
                            .lock()
                            .unwrap()
                            .push(t.elapsed().as_micros() as u32);
                        if let Some(f) = &out {
                            let mut f = f.lock().unwrap();
                            let _ = writeln!(f, "{link}");
                            let _ = f.flush();
                        }
                    }
                    Err(e) => {
                        if let Ok(mut f) = failures.lock()
                            && f.len() < 5
                        {
                            f.push(format!("request {n}: {e}"));
                        }
                        failed.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut l = latencies.lock().unwrap().clone();
    l.sort_unstable();
    let pct = |p: f64| -> f64 {
        if l.is_empty() {
            0.0
        } else {
            l[((l.len() - 1) as f64 * p) as usize] as f64 / 1000.0
        }
    };
    let okn = ok.load(Ordering::Relaxed);
    println!(
        "{}",
        serde_json::json!({
            "ok": okn,
            "failed": failed.load(Ordering::Relaxed),
            "seconds": elapsed,
            "perSecond": okn as f64 / elapsed,
            "p50Ms": pct(0.50),
            "p99Ms": pct(0.99),
            "maxMs": pct(1.0),
            "failures": *failures.lock().unwrap(),
        })
    );
}
