//! The HTTP ceiling of the benchmark suite: a minimal hyper 1 server, built like the
//! daemon's (HTTP/1.1, multi-threaded tokio, nodelay), that reads each request body and
//! answers a fixed small JSON body. `scripts/bench.sh` drives it with the same load
//! generator, connections and duration as the daemon, so the ratio of the two is what
//! the daemon's own work costs.
//!
//! usage: ceiling_server 127.0.0.1:PORT

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

const ANSWER: &[u8] = br#"{"keyLink":"3b398d5c-2d7c-4673-9f73-3693e137ddbb","createdAt":"2026-12-03T18:56:34.123Z","rotatesAt":"2026-12-04T18:56:34.123Z"}"#;

async fn answer(req: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let _ = req.into_body().collect().await;
    let mut resp = Response::new(Full::new(Bytes::from_static(ANSWER)));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8799".into());
    let listener = tokio::net::TcpListener::bind(&addr).await.expect("bind");
    eprintln!("ceiling server on {addr}");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service_fn(answer))
                .await;
        });
    }
}
