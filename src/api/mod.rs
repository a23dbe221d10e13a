//! The admin API: an HTTP/1.1 server (hyper 1) with JSON in and out.
//!
//! Every request takes the same path through [`handle`]: match the route, authenticate
//! and check the route's scope (the one place where auth happens), read a bounded body,
//! run the handler, and turn any [`ApiError`] into its status and JSON body. Handlers
//! live in submodules by resource and only translate between JSON and the domain.

mod error;
mod exporters;
mod keys;
mod metrics;
mod sinks;
mod streams;
mod tokens;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use error::ApiError;
pub use metrics::Metrics;

use crate::auth::{Auth, Caller, Scope};
use crate::config::AccountConfig;
use crate::export::Exporters;
use crate::keys::Keys;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// Everything the handlers reach.
pub struct ApiState {
    pub keys: Arc<Keys>,
    pub exporters: Arc<Exporters>,
    pub auth: Arc<Auth>,
    pub account: AccountConfig,
    pub metrics: Metrics,
}

/// The routes, one per path pattern; the method is dispatched by the handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Healthz,
    Readyz,
    Metrics,
    Account,
    Streams,
    Stream,
    StreamKeys,
    StreamEncrypt,
    Decrypt,
    Key,
    KeyExport,
    Sinks,
    Sink,
    Exporters,
    Exporter,
    ExporterFlush,
    Tokens,
    Token,
}

impl Route {
    /// The scopes each method of the route needs (none: no token needed), or the
    /// methods the route allows when `method` is not one of them.
    fn scopes(self, method: &Method) -> Result<&'static [Scope], &'static str> {
        use Route::*;
        const NONE: &[Scope] = &[];
        const ADMIN: &[Scope] = &[Scope::Admin];
        const KEYS: &[Scope] = &[Scope::Keys];
        // Creating an exporter exports key material: the export scope too.
        const ADMIN_EXPORT: &[Scope] = &[Scope::Admin, Scope::Export];
        match (self, method) {
            (Healthz | Readyz, &Method::GET) => Ok(NONE),
            (Healthz | Readyz, _) => Err("GET"),
            (Metrics, &Method::GET) => Ok(&[Scope::Metrics]),
            (Metrics, _) => Err("GET"),
            (Account, &Method::GET) => Ok(ADMIN),
            (Account, _) => Err("GET"),
            (Streams | Sinks | Tokens, &Method::GET | &Method::POST) => Ok(ADMIN),
            (Streams | Sinks | Tokens, _) => Err("GET, POST"),
            (Stream | Sink | Exporter, &Method::GET | &Method::DELETE) => Ok(ADMIN),
            (Stream | Sink | Exporter, _) => Err("GET, DELETE"),
            (Token, &Method::DELETE) => Ok(ADMIN),
            (Token, _) => Err("DELETE"),
            (StreamKeys | StreamEncrypt, &Method::POST) => Ok(KEYS),
            (StreamKeys | StreamEncrypt, _) => Err("POST"),
            (Decrypt, &Method::POST) => Ok(&[Scope::Decrypt]),
            (Decrypt, _) => Err("POST"),
            (Key, &Method::GET) => Ok(KEYS),
            (Key, _) => Err("GET"),
            (KeyExport, &Method::GET) => Ok(&[Scope::Export]),
            (KeyExport, _) => Err("GET"),
            (Exporters, &Method::GET) => Ok(ADMIN),
            (Exporters, &Method::POST) => Ok(ADMIN_EXPORT),
            (Exporters, _) => Err("GET, POST"),
            (ExporterFlush, &Method::POST) => Ok(ADMIN),
            (ExporterFlush, _) => Err("POST"),
        }
    }
}

/// The route table: path pattern (also the `route` label of metrics) and route.
const ROUTES: [(&str, Route); 18] = [
    ("/healthz", Route::Healthz),
    ("/readyz", Route::Readyz),
    ("/metrics", Route::Metrics),
    ("/v1/account", Route::Account),
    ("/v1/streams", Route::Streams),
    ("/v1/streams/{name}", Route::Stream),
    ("/v1/streams/{name}/keys", Route::StreamKeys),
    ("/v1/streams/{name}/encrypt", Route::StreamEncrypt),
    ("/v1/decrypt", Route::Decrypt),
    ("/v1/keys/{keyLink}", Route::Key),
    ("/v1/keys/{keyLink}/export", Route::KeyExport),
    ("/v1/sinks", Route::Sinks),
    ("/v1/sinks/{name}", Route::Sink),
    ("/v1/batch-exporters", Route::Exporters),
    ("/v1/batch-exporters/{name}", Route::Exporter),
    ("/v1/batch-exporters/{name}/flush", Route::ExporterFlush),
    ("/v1/tokens", Route::Tokens),
    ("/v1/tokens/{name}", Route::Token),
];

fn router() -> matchit::Router<(Route, &'static str)> {
    let mut r = matchit::Router::new();
    for (path, route) in ROUTES {
        r.insert(path, (route, path))
            .expect("routes do not overlap");
    }
    r
}

/// What a handler gets: the authenticated caller, the path parameter and the body.
pub(crate) struct Ctx<'a> {
    pub state: &'a ApiState,
    pub method: Method,
    pub caller: Option<Caller>,
    /// The one `{name}` or `{keyLink}` segment of the path, when the route has one.
    pub param: String,
    body: Bytes,
}

impl Ctx<'_> {
    /// The body as `T`; unknown fields, missing fields and wrong types are 400s.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::bad_request(
                "the request needs a JSON object body",
            ));
        }
        serde_json::from_slice(&self.body)
            .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
    }

    pub fn caller_name(&self) -> &str {
        self.caller.as_ref().map_or("-", |c| c.token_name.as_str())
    }
}

/// A handler's answer body: a JSON value, or bytes already rendered (large JSON answers
/// written straight from the data, and the Prometheus text).
pub(crate) enum Body {
    Json(serde_json::Value),
    Rendered {
        bytes: Vec<u8>,
        content_type: &'static str,
    },
}

/// A handler's answer: a status and a body.
pub(crate) type Reply = Result<(StatusCode, Body), ApiError>;

pub(crate) fn ok(value: serde_json::Value) -> Reply {
    Ok((StatusCode::OK, Body::Json(value)))
}

pub(crate) fn created(value: serde_json::Value) -> Reply {
    Ok((StatusCode::CREATED, Body::Json(value)))
}

/// A JSON answer rendered by the handler.
pub(crate) fn ok_rendered(bytes: Vec<u8>) -> Reply {
    Ok((
        StatusCode::OK,
        Body::Rendered {
            bytes,
            content_type: "application/json",
        },
    ))
}

async fn dispatch(route: Route, ctx: Ctx<'_>) -> Reply {
    match route {
        Route::Healthz => ok(serde_json::json!({"status": "ok"})),
        Route::Readyz => match ctx.state.keys.ready() {
            Ok(()) => ok(serde_json::json!({"status": "ready"})),
            Err(e) => {
                log::warn!("not ready: {e}");
                Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {e}"),
                ))
            }
        },
        Route::Metrics => Ok((
            StatusCode::OK,
            Body::Rendered {
                bytes: ctx.state.metrics.render().into_bytes(),
                content_type: "text/plain; version=0.0.4; charset=utf-8",
            },
        )),
        Route::Account => ok(serde_json::json!({
            "billingId": ctx.state.account.billing_id,
            "keyExportAllowed": ctx.state.account.key_export_allowed,
        })),
        Route::Streams | Route::Stream => streams::handle(route == Route::Stream, ctx).await,
        Route::StreamKeys => keys::get_or_create(ctx).await,
        Route::StreamEncrypt => keys::encrypt(ctx).await,
        Route::Decrypt => keys::decrypt(ctx),
        Route::Key => keys::info(ctx),
        Route::KeyExport => keys::export(ctx),
        Route::Sinks | Route::Sink => sinks::handle(route == Route::Sink, ctx).await,
        Route::Exporters | Route::Exporter => {
            exporters::handle(route == Route::Exporter, ctx).await
        }
        Route::ExporterFlush => exporters::flush(ctx).await,
        Route::Tokens | Route::Token => tokens::handle(route == Route::Token, ctx),
    }
}

fn respond(status: StatusCode, body: Body) -> Response<Full<Bytes>> {
    let (bytes, content_type) = match body {
        Body::Json(v) => (
            serde_json::to_vec(&v).expect("JSON values serialize"),
            "application/json",
        ),
        Body::Rendered {
            bytes,
            content_type,
        } => (bytes, content_type),
    };
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn is_json(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"))
}

/// True when the request says a body follows.
fn has_body<B>(req: &Request<B>) -> bool {
    let headers = req.headers();
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0")
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than {MAX_BODY_BYTES} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    if has_body(&req) && !is_json(&req) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the request body must be JSON: send 'Content-Type: application/json' (curl --json)",
        ));
    }
    match Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(ApiError::bad_request(format!(
            "cannot read the request body: {e}"
        ))),
    }
}

async fn handle(
    state: &ApiState,
    router: &matchit::Router<(Route, &'static str)>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let started = std::time::Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let matched = router
        .at(&path)
        .ok()
        .map(|m| (*m.value, m.params.iter().next().map(|(_, v)| v.to_string())));
    let pattern = matched.as_ref().map_or("unmatched", |((_, p), _)| *p);
    // Set once the body has been read: an answer given before (an error) leaves it on
    // the connection, which hyper then closes.
    let mut unread_body = has_body(&req);
    let result: Reply = async {
        let Some(((route, _), param)) = matched else {
            return Err(ApiError::not_found(format!("no route {path}")));
        };
        let authorization = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let caller = match route.scopes(&method) {
            Ok([]) => None,
            Ok(scopes) => Some(state.auth.check(authorization, scopes)?),
            Err(allowed) => {
                state.auth.authenticate(authorization)?;
                return Err(ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    format!("{method} is not allowed on {path}; allowed: {allowed}"),
                ));
            }
        };
        let body = read_body(req).await?;
        unread_body = false;
        let ctx = Ctx {
            state,
            method: method.clone(),
            caller,
            param: param.unwrap_or_default(),
            body,
        };
        dispatch(route, ctx).await
    }
    .await;
    let mut response = match result {
        Ok((status, body)) => {
            log::debug!("{method} {path} -> {}", status.as_u16());
            respond(status, body)
        }
        Err(e) => {
            log::debug!("{method} {path} -> {}: {}", e.status.as_u16(), e.message);
            respond(e.status, Body::Json(e.body()))
        }
    };
    if unread_body {
        // Say so: a client would otherwise send its next request on a connection that
        // is closing, and see it fail without an answer.
        response.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    state.metrics.observe(
        pattern,
        method.as_str(),
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

/// Serves one connection (plain TCP or TLS) until it closes or the shutdown drains it.
async fn serve_connection<I>(
    io: I,
    state: Arc<ApiState>,
    router: Arc<matchit::Router<(Route, &'static str)>>,
    watcher: hyper_util::server::graceful::Watcher,
    peer: SocketAddr,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let state = state.clone();
        let router = router.clone();
        async move { Ok::<_, Infallible>(handle(&state, &router, req).await) }
    });
    let conn = http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .serve_connection(TokioIo::new(io), service);
    if let Err(e) = watcher.watch(conn).await {
        log::debug!("connection from {peer}: {e}");
    }
}

/// Serves the API on `listener` (over TLS when `tls` is set) until `shutdown` turns
/// true, then stops accepting and lets in-flight requests finish (at most `drain`).
pub async fn serve(
    listener: TcpListener,
    state: Arc<ApiState>,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let router = Arc::new(router());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        log::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let (state, router, watcher) = (state.clone(), router.clone(), graceful.watcher());
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => serve_connection(stream, state, router, watcher, peer).await,
                        Some(acceptor) => {
                            match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                                Ok(Ok(s)) => serve_connection(s, state, router, watcher, peer).await,
                                Ok(Err(e)) => log::debug!("TLS handshake with {peer} failed: {e}"),
                                Err(_) => log::debug!("TLS handshake with {peer} timed out"),
                            }
                        }
                    }
                });
            }
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        log::warn!("in-flight requests did not finish within {drain:?}; closing them");
    }
}

/// A TLS acceptor from PEM files (certificate chain, private key).
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<tokio_rustls::TlsAcceptor, String> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("server.tls_cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "server.tls_cert {}: no certificate in the file",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("server.tls_key {}: {e}", key.display()))?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("server.tls_cert / server.tls_key: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Entry points for the fuzz targets (`fuzz/`) and their regression tests.
#[doc(hidden)]
pub mod fuzzing {
    /// Runs every request-body parser of the API, with the checks that need no state,
    /// on `body`. Must never panic.
    pub fn request_bodies(body: &[u8]) {
        super::streams::check_body(body);
        super::keys::check_bodies(body);
        super::sinks::check_body(body);
        super::exporters::check_body(body);
        super::tokens::check_body(body);
    }
}

/// The address a listener is bound to, for logs.
pub fn local_addr(listener: &TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}
