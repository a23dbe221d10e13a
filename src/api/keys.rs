//! Key routes: get-or-create, encrypt (one or a batch of events), decrypt, key metadata
//! and the export of one key's keyset.
//!
//! Ciphertexts travel as standard padded base64; plaintexts as JSON strings.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;
use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::{ApiError, Ctx, Reply, ok, ok_rendered};
use crate::duration::rfc3339;
use crate::keys::IssuedKey;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KeyRequest {
    key_field: String,
}

/// A `values` object as sent: names in order, each with its string, or None when the
/// value is not a string (reported with its path once the whole body is read). Read
/// without building JSON values: batches of thousands of fields are the hot path.
struct Fields(Vec<(String, Option<String>)>);

/// One value of a `values` object: a string, or anything else (skipped).
struct FieldValue(Option<String>);

impl<'de> Deserialize<'de> for FieldValue {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FieldValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a value")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<FieldValue, E> {
                Ok(FieldValue(Some(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<FieldValue, E> {
                Ok(FieldValue(Some(v)))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<FieldValue, E> {
                Ok(FieldValue(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<FieldValue, E> {
                Ok(FieldValue(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<FieldValue, E> {
                Ok(FieldValue(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<FieldValue, E> {
                Ok(FieldValue(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<FieldValue, E> {
                Ok(FieldValue(None))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut a: A) -> Result<FieldValue, A::Error> {
                while a.next_element::<IgnoredAny>()?.is_some() {}
                Ok(FieldValue(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<FieldValue, A::Error> {
                while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(FieldValue(None))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Fields;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of named string values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Fields, A::Error> {
                let mut out = Vec::with_capacity(a.size_hint().unwrap_or(4));
                while let Some((k, v)) = a.next_entry::<String, FieldValue>()? {
                    out.push((k, v.0));
                }
                Ok(Fields(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct EncryptEvent {
    key_field: String,
    values: Fields,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct EncryptRequest {
    key_field: Option<String>,
    values: Option<Fields>,
    events: Option<Vec<EncryptEvent>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DecryptRequest {
    key_link: String,
    values: Fields,
}

fn parse_key_link(text: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(text)
        .map_err(|_| ApiError::bad_request(format!("keyLink '{text}' is not a UUID")))
}

/// The string values of a `values` object; `where_` prefixes error messages.
fn string_values<'a>(
    values: &'a Fields,
    where_: &str,
) -> Result<Vec<(&'a str, &'a str)>, ApiError> {
    values
        .0
        .iter()
        .map(|(k, v)| match v {
            Some(s) => Ok((k.as_str(), s.as_str())),
            None => Err(ApiError::bad_request(format!(
                "{where_}values.{k} must be a string"
            ))),
        })
        .collect()
}

/// Appends `{"keyLink":"..","values":{"name":"<base64>",..}}` for one encrypted event,
/// written straight into the answer.
fn write_encrypted(
    out: &mut Vec<u8>,
    ctx: &Ctx<'_>,
    key: &IssuedKey,
    values: &[(&str, &str)],
) -> Result<(), ApiError> {
    let plaintexts: Vec<&[u8]> = values.iter().map(|(_, v)| v.as_bytes()).collect();
    let cts = ctx.state.keys.encrypt(key, &plaintexts)?;
    out.extend_from_slice(b"{\"keyLink\":\"");
    out.extend_from_slice(
        key.key_link
            .hyphenated()
            .encode_lower(&mut Uuid::encode_buffer())
            .as_bytes(),
    );
    out.extend_from_slice(b"\",\"values\":{");
    for (i, ((name, _), ct)) in values.iter().zip(cts).enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut *out, name).expect("writing to memory");
        out.extend_from_slice(b":\"");
        let at = out.len();
        out.resize(at + ct.len().div_ceil(3) * 4, 0);
        let n = STANDARD
            .encode_slice(&ct, &mut out[at..])
            .expect("sized for base64");
        out.truncate(at + n);
        out.push(b'"');
    }
    out.extend_from_slice(b"}}");
    Ok(())
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

/// One event to encrypt, checked: its `keyField` and string values.
struct Plain<'a> {
    key_field: &'a str,
    values: Vec<(&'a str, &'a str)>,
}

/// Checks either shape of an encrypt body; `true` for the batch shape.
fn checked_encrypt(body: &EncryptRequest) -> Result<(bool, Vec<Plain<'_>>), ApiError> {
    match (&body.key_field, &body.values, &body.events) {
        (Some(field), Some(values), None) => Ok((
            false,
            vec![Plain {
                key_field: field,
                values: string_values(values, "")?,
            }],
        )),
        (None, None, Some(events)) => {
            let mut checked = Vec::with_capacity(events.len());
            for (i, e) in events.iter().enumerate() {
                if e.key_field.is_empty() {
                    return Err(ApiError::bad_request(format!(
                        "events[{i}].keyField must not be empty"
                    )));
                }
                checked.push(Plain {
                    key_field: &e.key_field,
                    values: string_values(&e.values, &format!("events[{i}]."))?,
                });
            }
            Ok((true, checked))
        }
        _ => Err(ApiError::bad_request(
            "send either {\"keyField\",\"values\"} or {\"events\":[{\"keyField\",\"values\"}..]}",
        )),
    }
}

pub(crate) async fn encrypt(ctx: Ctx<'_>) -> Reply {
    let body: EncryptRequest = ctx.json()?;
    let (batch, events) = checked_encrypt(&body)?;
    let fields: Vec<&str> = events.iter().map(|e| e.key_field).collect();
    let keys = ctx
        .state
        .keys
        .get_or_create_many(&ctx.param, &fields)
        .await?;
    let mut out = Vec::with_capacity(events.len() * 160);
    if batch {
        out.extend_from_slice(b"{\"events\":[");
    }
    for (i, (key, e)) in keys.iter().zip(&events).enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_encrypted(&mut out, &ctx, key, &e.values)?;
    }
    if batch {
        out.extend_from_slice(b"]}");
    }
    ok_rendered(out)
}

/// Named ciphertexts, decoded from base64.
type Ciphertexts<'a> = Vec<(&'a str, Vec<u8>)>;

/// Checks a decrypt body: the keyLink and the base64 ciphertexts.
fn checked_decrypt(body: &DecryptRequest) -> Result<(Uuid, Ciphertexts<'_>), ApiError> {
    let link = parse_key_link(&body.key_link)?;
    let mut cts = Vec::with_capacity(body.values.0.len());
    for (name, text) in string_values(&body.values, "")? {
        let ct = STANDARD.decode(text).map_err(|_| {
            ApiError::bad_request(format!("values.{name} is not standard (padded) base64"))
        })?;
        cts.push((name, ct));
    }
    Ok((link, cts))
}

pub(crate) fn decrypt(ctx: Ctx<'_>) -> Reply {
    let body: DecryptRequest = ctx.json()?;
    let (link, cts) = checked_decrypt(&body)?;
    let refs: Vec<(&str, &[u8])> = cts.iter().map(|(n, c)| (*n, c.as_slice())).collect();
    let plain = ctx.state.keys.decrypt(link, &refs)?;
    let out: Map<String, Value> = cts
        .iter()
        .zip(plain)
        .map(|((k, _), p)| (k.to_string(), Value::String(p)))
        .collect();
    ok(json!({ "values": out }))
}

/// Parses and checks the bodies of these routes without touching state (fuzzing).
pub(crate) fn check_bodies(body: &[u8]) {
    if let Ok(b) = serde_json::from_slice::<KeyRequest>(body) {
        let _ = b.key_field.is_empty();
    }
    if let Ok(b) = serde_json::from_slice::<EncryptRequest>(body) {
        let _ = checked_encrypt(&b);
    }
    if let Ok(b) = serde_json::from_slice::<DecryptRequest>(body) {
        let _ = checked_decrypt(&b);
    }
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
