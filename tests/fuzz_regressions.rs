//! Inputs kept from fuzzing (and the seeds it started from) run through the same entry
//! points as the fuzz targets in `fuzz/`: none may panic.

use std::path::Path;

fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            (p.display().to_string(), std::fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no regression inputs in {}", dir.display());
    out
}

#[test]
fn request_bodies() {
    for (name, data) in inputs("request_bodies") {
        eprintln!("{name}");
        keyexportd::api::fuzzing::request_bodies(&data);
    }
}

#[test]
fn config() {
    for (name, data) in inputs("config") {
        eprintln!("{name}");
        if let Ok(text) = std::str::from_utf8(&data)
            && let Ok(config) = keyexportd::config::Config::parse(text)
        {
            let _ = config.validate();
        }
    }
}
