//! `/v1/batch-exporters`: exporter CRUD, status and flush.

use hyper::Method;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, Ctx, Reply, created, ok};
use crate::duration::{Seconds, rfc3339};
use crate::export::NewExporter;
use crate::export::batch::{ExporterDef, Format, Status};

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Ref {
    name: String,
    billing_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CreateExporter {
    #[serde(rename = "ref")]
    reference: Option<Ref>,
    name: Option<String>,
    key_stream_ref: Ref,
    interval: Option<Seconds>,
    sink_name: Option<String>,
    path_prefix: String,
    format: Option<String>,
    include_existing_keys: Option<bool>,
}

/// The exporter resource, seed-compatible; `format` only when it is not the default.
fn view(billing: &str, d: &ExporterDef) -> Value {
    let mut v = json!({
        "ref": {"billingId": billing, "name": d.name},
        "keyStreamRef": {"billingId": billing, "name": d.stream},
        "interval": Seconds(d.interval_secs).to_string(),
        "sinkName": d.sink_name,
        "pathPrefix": d.path_prefix,
    });
    if d.format == Format::Csv {
        v["format"] = json!("CSV");
    }
    v
}

fn with_status(billing: &str, d: &ExporterDef, s: &Status) -> Value {
    let mut v = view(billing, d);
    v["createdAt"] = json!(rfc3339(d.created_at));
    v["status"] = s.json();
    v
}

fn check_billing(r: &Ref, billing: &str, field: &str) -> Result<(), ApiError> {
    match &r.billing_id {
        Some(b) if b != billing => Err(ApiError::bad_request(format!(
            "{field}.billingId '{b}' is not this install's billingId '{billing}'"
        ))),
        _ => Ok(()),
    }
}

/// Checks a create body and turns it into the domain's request.
fn new_exporter(body: CreateExporter, billing: &str) -> Result<NewExporter, ApiError> {
    check_billing(&body.key_stream_ref, billing, "keyStreamRef")?;
    let name = match (body.name, body.reference) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "give the name as \"name\" or \"ref\", not both",
            ));
        }
        (Some(n), None) => Some(n),
        (None, Some(r)) => {
            check_billing(&r, billing, "ref")?;
            Some(r.name)
        }
        (None, None) => None,
    };
    let format = match body
        .format
        .as_deref()
        .map(str::to_ascii_uppercase)
        .as_deref()
    {
        None | Some("JSONL") | Some("JSON") => Format::Jsonl,
        Some("CSV") => Format::Csv,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "format '{other}' is not one of JSONL, CSV"
            )));
        }
    };
    Ok(NewExporter {
        name,
        stream: body.key_stream_ref.name,
        sink: body.sink_name,
        interval: body.interval,
        path_prefix: body.path_prefix,
        format,
        include_existing_keys: body.include_existing_keys.unwrap_or(true),
    })
}

/// Parses and checks a create body without touching state (fuzzing).
pub(crate) fn check_body(body: &[u8]) {
    if let Ok(b) = serde_json::from_slice::<CreateExporter>(body)
        && let Ok(e) = new_exporter(b, "default")
    {
        let _ = crate::export::validate_prefix(&e.path_prefix);
        if let Some(n) = &e.name {
            let _ = crate::names::validate("batch exporter", n);
        }
    }
}

pub(crate) async fn handle(one: bool, ctx: Ctx<'_>) -> Reply {
    let exporters = &ctx.state.exporters;
    let billing = ctx.state.account.billing_id.as_str();
    match (one, &ctx.method) {
        (false, &Method::GET) => {
            let list: Vec<_> = exporters
                .list()
                .iter()
                .map(|(d, s)| with_status(billing, d, s))
                .collect();
            ok(json!({ "batchExporters": list }))
        }
        (false, _) => {
            let body: CreateExporter = ctx.json()?;
            let def = exporters.create(new_exporter(body, billing)?).await?;
            log::info!(
                target: "audit",
                "key export: token '{}' created batch exporter '{}' (stream '{}' -> sink '{}', \
                 prefix '{}')",
                ctx.caller_name(),
                def.name,
                def.stream,
                def.sink_name,
                def.path_prefix
            );
            created(view(billing, &def))
        }
        (true, &Method::GET) => {
            let (d, s) = exporters.get(&ctx.param)?;
            ok(json!({"batchExporter": with_status(billing, &d, &s)}))
        }
        (true, _) => {
            exporters.delete(&ctx.param).await?;
            log::info!(
                "batch exporter '{}' deleted by token '{}'",
                ctx.param,
                ctx.caller_name()
            );
            ok(json!({}))
        }
    }
}

pub(crate) async fn flush(ctx: Ctx<'_>) -> Reply {
    let exporters = &ctx.state.exporters;
    let objects = exporters.flush(&ctx.param).await?;
    let (d, s) = exporters.get(&ctx.param)?;
    ok(json!({
        "objects": objects,
        "batchExporter": with_status(&ctx.state.account.billing_id, &d, &s),
    }))
}
