//! Key routes: get-or-create, encrypt (one or a batch of events), decrypt, key metadata
//! and the export of one key's keyset.
//!
//! Ciphertexts travel as standard padded base64; plaintexts as JSON strings.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::{ApiError, Ctx, Reply, ok};
use crate::duration::rfc3339;
use crate::keys::IssuedKey;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KeyRequest {
    key_field: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct EncryptEvent {
    key_field: String,
    values: Map<String, Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct EncryptRequest {
    key_field: Option<String>,
    values: Option<Map<String, Value>>,
    events: Option<Vec<EncryptEvent>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DecryptRequest {
    key_link: String,
    values: Map<String, Value>,
}

fn parse_key_link(text: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(text)
        .map_err(|_| ApiError::bad_request(format!("keyLink '{text}' is not a UUID")))
}

/// The string values of a `values` object; `where_` prefixes error messages.
fn string_values<'a>(
    values: &'a Map<String, Value>,
    where_: &str,
) -> Result<Vec<(&'a str, &'a str)>, ApiError> {
    values
        .iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k.as_str(), s.as_str())),
            _ => Err(ApiError::bad_request(format!(
                "{where_}values.{k} must be a string"
            ))),
        })
        .collect()
}

fn encrypted(ctx: &Ctx<'_>, key: &IssuedKey, values: &[(&str, &str)]) -> Result<Value, ApiError> {
    let plaintexts: Vec<&[u8]> = values.iter().map(|(_, v)| v.as_bytes()).collect();
    let cts = ctx.state.keys.encrypt(key, &plaintexts)?;
    let out: Map<String, Value> = values
        .iter()
        .zip(cts)
        .map(|((k, _), ct)| (k.to_string(), Value::String(STANDARD.encode(ct))))
        .collect();
    Ok(json!({"keyLink": key.key_link.to_string(), "values": out}))
}

pub(crate) async fn get_or_create(ctx: Ctx<'_>) -> Reply {
    let body: KeyRequest = ctx.json()?;
    let key = ctx
        .state
        .keys
        .get_or_create(&ctx.param, &body.key_field)
        .await?;
    ok(json!({
        "keyLink": key.key_link.to_string(),
        "createdAt": rfc3339(key.created_at),
        "rotatesAt": rfc3339(key.rotates_at),
    }))
}

pub(crate) async fn encrypt(ctx: Ctx<'_>) -> Reply {
    let body: EncryptRequest = ctx.json()?;
    match (body.key_field, body.values, body.events) {
        (Some(field), Some(values), None) => {
            let values = string_values(&values, "")?;
            let key = ctx.state.keys.get_or_create(&ctx.param, &field).await?;
            ok(encrypted(&ctx, &key, &values)?)
        }
        (None, None, Some(events)) => {
            let mut checked = Vec::with_capacity(events.len());
            for (i, e) in events.iter().enumerate() {
                if e.key_field.is_empty() {
                    return Err(ApiError::bad_request(format!(
                        "events[{i}].keyField must not be empty"
                    )));
                }
                checked.push(string_values(&e.values, &format!("events[{i}]."))?);
            }
            let fields: Vec<&str> = events.iter().map(|e| e.key_field.as_str()).collect();
            let keys = ctx
                .state
                .keys
                .get_or_create_many(&ctx.param, &fields)
                .await?;
            let out = keys
                .iter()
                .zip(&checked)
                .map(|(key, values)| encrypted(&ctx, key, values))
                .collect::<Result<Vec<_>, _>>()?;
            ok(json!({ "events": out }))
        }
        _ => Err(ApiError::bad_request(
            "send either {\"keyField\",\"values\"} or {\"events\":[{\"keyField\",\"values\"}..]}",
        )),
    }
}

pub(crate) fn decrypt(ctx: Ctx<'_>) -> Reply {
    let body: DecryptRequest = ctx.json()?;
    let link = parse_key_link(&body.key_link)?;
    let texts = string_values(&body.values, "")?;
    let mut cts = Vec::with_capacity(texts.len());
    for (name, text) in &texts {
        let ct = STANDARD.decode(text).map_err(|_| {
            ApiError::bad_request(format!("values.{name} is not standard (padded) base64"))
        })?;
        cts.push((*name, ct));
    }
    let refs: Vec<(&str, &[u8])> = cts.iter().map(|(n, c)| (*n, c.as_slice())).collect();
    let plain = ctx.state.keys.decrypt(link, &refs)?;
    let out: Map<String, Value> = texts
        .iter()
        .zip(plain)
        .map(|((k, _), p)| (k.to_string(), Value::String(p)))
        .collect();
    ok(json!({ "values": out }))
}

pub(crate) fn info(ctx: Ctx<'_>) -> Reply {
    let link = parse_key_link(&ctx.param)?;
    let k = ctx.state.keys.key_info(link)?;
    ok(json!({
        "keyLink": k.key_link.to_string(),
        "stream": k.stream,
        "createdAt": rfc3339(k.created_at),
        "rotatesAt": rfc3339(k.rotates_at),
        "expiresAt": rfc3339(k.expires_at),
    }))
}

pub(crate) fn export(ctx: Ctx<'_>) -> Reply {
    if !ctx.state.account.key_export_allowed {
        return Err(ApiError::forbidden(
            "key export is not allowed for this account: set account.key_export_allowed = \
             true in the config to allow it",
        ));
    }
    let link = parse_key_link(&ctx.param)?;
    let keyset = ctx.state.keys.export_keyset(link)?;
    log::info!(
        target: "audit",
        "key export: token '{}' exported the keyset of keyLink {link}",
        ctx.caller_name()
    );
    ok(json!({"keyLink": link.to_string(), "tinkKey": keyset}))
}
