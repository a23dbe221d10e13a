//! `/v1/streams` and `/v1/streams/{name}`: create, list, get and delete streams.

use hyper::Method;
use serde::Deserialize;
use serde_json::json;

use super::{Ctx, Reply, created, ok};
use crate::duration::{Seconds, rfc3339};
use crate::store::StreamRecord;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CreateStream {
    name: String,
    key_rotation: Option<Seconds>,
}

/// The stream resource as the API shows it.
pub(crate) fn stream_json(billing_id: &str, s: &StreamRecord) -> serde_json::Value {
    json!({
        "ref": {"billingId": billing_id, "name": s.name},
        "keyRotation": Seconds(s.key_rotation_secs).to_string(),
        "keyStreamId": s.key_stream_id.to_string(),
        "createdAt": rfc3339(s.created_at),
    })
}

pub(crate) async fn handle(one: bool, ctx: Ctx<'_>) -> Reply {
    let keys = &ctx.state.keys;
    let billing = &ctx.state.account.billing_id;
    match (one, &ctx.method) {
        (false, &Method::GET) => {
            let list: Vec<_> = keys
                .streams()
                .iter()
                .map(|s| stream_json(billing, s))
                .collect();
            ok(json!({ "streams": list }))
        }
        (false, _) => {
            let body: CreateStream = ctx.json()?;
            let record = keys.create_stream(&body.name, body.key_rotation).await?;
            log::info!(
                "stream '{}' created by token '{}'",
                record.name,
                ctx.caller_name()
            );
            created(stream_json(billing, &record))
        }
        (true, &Method::GET) => {
            let stream = keys.stream(&ctx.param)?;
            ok(json!({ "stream": stream_json(billing, &stream.record) }))
        }
        (true, _) => {
            ctx.state.exporters.delete_stream(&ctx.param).await?;
            log::info!(
                "stream '{}' deleted by token '{}'",
                ctx.param,
                ctx.caller_name()
            );
            ok(json!({}))
        }
    }
}

/// Parses and checks a create body without touching state (fuzzing).
pub(crate) fn check_body(body: &[u8]) {
    if let Ok(b) = serde_json::from_slice::<CreateStream>(body) {
        let _ = crate::names::validate("stream", &b.name);
        let _ = b.key_rotation.map(|r| r.to_string());
    }
}
