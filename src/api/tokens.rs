//! `/v1/tokens`: scoped API tokens. The secret is in the create answer and nowhere else.

use hyper::Method;
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, Ctx, Reply, created, ok};
use crate::auth::{Scope, TokenRecord};
use crate::duration::rfc3339;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateToken {
    name: String,
    scopes: Vec<String>,
}

fn view(t: &TokenRecord) -> serde_json::Value {
    json!({
        "name": t.name,
        "scopes": t.scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        "createdAt": rfc3339(t.created_at),
    })
}

fn parse_scopes(names: &[String]) -> Result<Vec<Scope>, ApiError> {
    names
        .iter()
        .map(|s| s.parse::<Scope>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(ApiError::bad_request)
}

/// Parses and checks a create body without touching state (fuzzing).
pub(crate) fn check_body(body: &[u8]) {
    if let Ok(b) = serde_json::from_slice::<CreateToken>(body) {
        let _ = parse_scopes(&b.scopes);
        let _ = crate::names::validate("token", &b.name);
    }
}

pub(crate) fn handle(one: bool, ctx: Ctx<'_>) -> Reply {
    let auth = &ctx.state.auth;
    match (one, &ctx.method) {
        (false, &Method::GET) => {
            let mut list: Vec<_> = auth.tokens()?.iter().map(view).collect();
            list.extend(auth.file_tokens().iter().map(|t| {
                let mut v = view(t);
                v["createdAt"] = json!(null);
                v["source"] = json!("tokens_file");
                v
            }));
            ok(json!({ "tokens": list }))
        }
        (false, _) => {
            let body: CreateToken = ctx.json()?;
            let scopes = parse_scopes(&body.scopes)?;
            let (record, secret) = auth.create_token(&body.name, &scopes)?;
            log::info!(
                target: "audit",
                "token '{}' with scopes [{}] created by token '{}'",
                record.name,
                record.scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
                ctx.caller_name()
            );
            let mut v = view(&record);
            v["token"] = json!(secret);
            created(v)
        }
        (true, _) => {
            auth.revoke(&ctx.param)?;
            log::info!(
                target: "audit",
                "token '{}' revoked by token '{}'",
                ctx.param,
                ctx.caller_name()
            );
            ok(json!({}))
        }
    }
}
