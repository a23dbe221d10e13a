//! `/v1/sinks` and `/v1/sinks/{name}`: sink CRUD. Credentials are write-only: accepted
//! on create, stored wrapped, never returned.

use hyper::Method;
use serde::Deserialize;
use serde_json::json;
use zeroize::Zeroizing;

use super::{ApiError, Ctx, Reply, created, ok};
use crate::export::NewSink;
use crate::export::sink::{BucketSpec, Credentials, SinkRecord};

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CredentialsBody {
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct BucketBody {
    bucket_name: String,
    region: Option<String>,
    endpoint: Option<String>,
    #[serde(default)]
    path_style: bool,
    credentials: Option<CredentialsBody>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LocalBody {
    path: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CreateSink {
    name: String,
    sink_type: String,
    bucket: Option<BucketBody>,
    local: Option<LocalBody>,
}

fn new_sink(body: CreateSink) -> Result<NewSink, ApiError> {
    Ok(
        match (
            body.sink_type.to_ascii_uppercase().as_str(),
            body.bucket,
            body.local,
        ) {
            ("S3", Some(b), None) => {
                let credentials = b.credentials.map(|c| Credentials {
                    access_key_id: Zeroizing::new(c.access_key_id),
                    secret_access_key: Zeroizing::new(c.secret_access_key),
                    session_token: c.session_token.map(Zeroizing::new),
                });
                let spec = BucketSpec {
                    bucket_name: b.bucket_name,
                    region: b.region,
                    endpoint: b.endpoint,
                    path_style: b.path_style,
                };
                NewSink::S3 {
                    name: body.name,
                    bucket: spec,
                    credentials,
                }
            }
            ("S3", None, _) => {
                return Err(ApiError::bad_request(
                    "an S3 sink needs \"bucket\":{\"bucketName\":..}",
                ));
            }
            ("LOCAL", None, Some(l)) => NewSink::Local {
                name: body.name,
                path: l.path,
            },
            ("LOCAL", _, None) => {
                return Err(ApiError::bad_request(
                    "a LOCAL sink needs \"local\":{\"path\":\"/absolute/dir\"}",
                ));
            }
            ("S3", Some(_), Some(_)) | ("LOCAL", Some(_), Some(_)) => {
                return Err(ApiError::bad_request(
                    "give \"bucket\" for an S3 sink or \"local\" for a LOCAL sink, not both",
                ));
            }
            (other, _, _) => {
                return Err(ApiError::bad_request(format!(
                    "sinkType '{other}' is not one of S3, LOCAL"
                )));
            }
        },
    )
}

/// Parses and checks a create body without touching state (fuzzing): the sink's
/// own validation runs with a throw-away master key.
pub(crate) fn check_body(body: &[u8]) {
    static MASTER: std::sync::OnceLock<crate::crypto::MasterKey> = std::sync::OnceLock::new();
    let Ok(b) = serde_json::from_slice::<CreateSink>(body) else {
        return;
    };
    let master = MASTER.get_or_init(|| crate::crypto::MasterKey::generate().expect("a key"));
    match new_sink(b) {
        Ok(NewSink::S3 {
            name,
            bucket,
            credentials,
        }) => {
            let _ = SinkRecord::new_s3(&name, bucket, credentials, master, 0);
        }
        Ok(NewSink::Local { name, path }) => {
            let _ = SinkRecord::new_local(&name, &path, 0);
        }
        Err(_) => {}
    }
}

pub(crate) async fn handle(one: bool, ctx: Ctx<'_>) -> Reply {
    let exporters = &ctx.state.exporters;
    match (one, &ctx.method) {
        (false, &Method::GET) => {
            let list: Vec<_> = exporters
                .sinks()?
                .iter()
                .map(|s| json!({"sink": s.view()}))
                .collect();
            ok(json!({ "sinks": list }))
        }
        (false, _) => {
            let body: CreateSink = ctx.json()?;
            let record = exporters.create_sink(new_sink(body)?).await?;
            log::info!(
                "sink '{}' ({}) created by token '{}'",
                record.name,
                record.location(),
                ctx.caller_name()
            );
            created(record.view())
        }
        (true, &Method::GET) => ok(json!({"sink": exporters.sink(&ctx.param)?.view()})),
        (true, _) => {
            exporters.delete_sink(&ctx.param).await?;
            log::info!(
                "sink '{}' deleted by token '{}'",
                ctx.param,
                ctx.caller_name()
            );
            ok(json!({}))
        }
    }
}
