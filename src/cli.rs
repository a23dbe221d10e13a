//! The command line: `serve` runs the daemon; the other verbs are a client of the admin
//! API that print its JSON (compact, for `jq`) or a table (`-o table`).
//!
//! Verbs mirror what operators know: `create|get|delete` take a singular noun and `list`
//! the plural; each also accepts the other form.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::Value;

use crate::config::Config;

#[derive(Parser, Debug)]
#[command(
    name = "keyexportd",
    version,
    about = "Per-session data keys, rotated and exported"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon (built-in defaults when no --config is given).
    Serve {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Write a new master key (a Tink JSON AES256_GCM keyset) to FILE, mode 0600.
    GenerateMasterKey { file: PathBuf },
    /// Print the SHA-256 of the token read from stdin, for security.tokens_file.
    HashToken,
    /// Decrypt fields of JSON Lines events with exported key objects (offline).
    Decrypt {
        /// A directory of exported objects, or s3://bucket/prefix.
        #[arg(long, value_name = "LOCATION")]
        keys: String,
        /// Where each event's keyLink is (dotted path).
        #[arg(long, default_value = "strmMeta.keyLink")]
        key_link_field: String,
        /// A field to decrypt (dotted path); repeat for several.
        #[arg(long = "field", value_name = "PATH", required = true)]
        fields: Vec<String>,
        #[command(flatten)]
        s3: S3Args,
        /// Events in (default stdin).
        input: Option<PathBuf>,
        /// Events out (default stdout).
        output: Option<PathBuf>,
    },
    /// Rebuild a stream's keys into a data directory from exported objects (offline,
    /// for disaster recovery; the daemon must not be running on that directory).
    Restore {
        /// A directory of exported objects, or s3://bucket/prefix.
        #[arg(long, value_name = "LOCATION")]
        from: String,
        /// The stream to restore into (created when missing).
        #[arg(long, default_value = "restored")]
        stream: String,
        /// Rotation of the keys' stream when it is created (default keys.rotation).
        #[arg(long)]
        key_rotation: Option<String>,
        /// The daemon's config (data directory, master key, keys.grace).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Create a resource.
    Create {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        what: CreateWhat,
    },
    /// List resources.
    List {
        #[command(flatten)]
        client: ClientArgs,
        kind: Kind,
    },
    /// Show one resource.
    Get {
        #[command(flatten)]
        client: ClientArgs,
        kind: Kind,
        name: String,
    },
    /// Delete one resource.
    Delete {
        #[command(flatten)]
        client: ClientArgs,
        kind: Kind,
        name: String,
    },
    /// Close and upload a batch exporter's current batch now.
    Flush {
        #[command(flatten)]
        client: ClientArgs,
        /// Only `batch-exporter`.
        kind: Kind,
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum CreateWhat {
    /// Create a stream.
    #[command(alias = "streams")]
    Stream {
        name: String,
        /// Key rotation period, e.g. 24h (default: keys.rotation of the daemon).
        #[arg(long)]
        key_rotation: Option<String>,
    },
    /// Create a sink: NAME and a bucket (S3) or an absolute directory (--sink-type local).
    #[command(alias = "sinks")]
    Sink {
        name: String,
        /// Bucket name for S3, directory for local.
        target: String,
        #[arg(long, value_enum, default_value_t = SinkKind::S3)]
        sink_type: SinkKind,
        /// JSON as printed by `aws iam create-access-key`:
        /// {"AccessKey":{"AccessKeyId":..,"SecretAccessKey":..}}. Without it the
        /// daemon uses the standard AWS credential chain.
        #[arg(long, value_name = "FILE")]
        credentials_file: Option<PathBuf>,
        #[arg(long)]
        endpoint: Option<String>,
        #[arg(long)]
        region: Option<String>,
        /// Path-style addressing (http://endpoint/bucket/key), for most non-AWS servers.
        #[arg(long)]
        path_style: bool,
    },
    /// Create an API token; its secret is printed once.
    #[command(alias = "tokens")]
    Token {
        name: String,
        /// Comma-separated: admin, keys, decrypt, export, metrics.
        #[arg(long, value_delimiter = ',', required = true)]
        scopes: Vec<String>,
    },
    /// Create a batch exporter of a stream's key stream.
    #[command(alias = "batch-exporters")]
    BatchExporter {
        /// The stream whose keys are exported.
        stream: String,
        /// Required: this daemon's exporters export key streams.
        #[arg(long)]
        export_keys: bool,
        /// Seconds between batches (or a duration such as 5m); default 60.
        #[arg(long)]
        interval: Option<String>,
        #[arg(long)]
        path_prefix: String,
        /// The sink (optional when only one exists).
        #[arg(long)]
        sink: Option<String>,
        /// Exporter name (default: <sink>-<stream>-keys).
        #[arg(long)]
        name: Option<String>,
        #[arg(long, value_enum, default_value_t = FormatArg::Jsonl)]
        format: FormatArg,
        /// Start at the newest key instead of every retained key.
        #[arg(long)]
        skip_existing_keys: bool,
    },
}

/// S3 options for reading exported objects, as the sink CLI takes them.
#[derive(Args, Debug, Clone, Default)]
pub struct S3Args {
    /// S3 endpoint URL (for S3-compatible servers).
    #[arg(long)]
    endpoint: Option<String>,
    #[arg(long)]
    region: Option<String>,
    #[arg(long)]
    path_style: bool,
    /// JSON as printed by `aws iam create-access-key`; else the AWS credential chain.
    #[arg(long, value_name = "FILE")]
    credentials_file: Option<PathBuf>,
}

impl S3Args {
    fn options(&self) -> Result<crate::owner::S3Options, String> {
        let credentials = match &self.credentials_file {
            None => None,
            Some(f) => {
                let v = read_credentials(f)?;
                Some((
                    v["accessKeyId"].as_str().unwrap_or_default().to_string(),
                    v["secretAccessKey"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    v["sessionToken"].as_str().map(String::from),
                ))
            }
        };
        Ok(crate::owner::S3Options {
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            path_style: self.path_style,
            credentials,
        })
    }
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum SinkKind {
    S3,
    Local,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum FormatArg {
    Jsonl,
    Csv,
}

/// Resource kinds, singular or plural.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Kind {
    #[value(alias = "streams")]
    Stream,
    #[value(alias = "sinks")]
    Sink,
    #[value(alias = "batch-exporters")]
    BatchExporter,
    #[value(alias = "tokens")]
    Token,
}

impl Kind {
    fn collection(self) -> &'static str {
        match self {
            Kind::Stream => "streams",
            Kind::Sink => "sinks",
            Kind::BatchExporter => "batch-exporters",
            Kind::Token => "tokens",
        }
    }
}

/// The AWS CLI's `create-access-key` output.
#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AwsAccessKeyFile {
    access_key: AwsAccessKey,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AwsAccessKey {
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
}

fn read_credentials(path: &std::path::Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read --credentials-file {}: {e}", path.display()))?;
    let parsed: AwsAccessKeyFile = serde_json::from_str(&text).map_err(|e| {
        format!(
            "--credentials-file {} is not the JSON of `aws iam create-access-key` \
             ({{\"AccessKey\":{{\"AccessKeyId\":..,\"SecretAccessKey\":..}}}}): {e}",
            path.display()
        )
    })?;
    let k = parsed.access_key;
    let mut v = serde_json::json!({
        "accessKeyId": k.access_key_id,
        "secretAccessKey": k.secret_access_key,
    });
    if let Some(t) = k.session_token {
        v["sessionToken"] = Value::String(t);
    }
    Ok(v)
}

#[derive(Clone, Copy, Debug, ValueEnum, Default, PartialEq, Eq)]
pub enum Output {
    #[default]
    Json,
    Table,
}

#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// Admin API address (default: server.listen of --config, else 127.0.0.1:8750).
    #[arg(long, global = true)]
    api_host: Option<String>,
    /// Token file (default: admin.token in the daemon's data directory).
    #[arg(long, global = true, env = "KEYEXPORTD_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The daemon's config file, to find its address and data directory.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// PEM certificate to trust for an https:// API (e.g. the daemon's self-signed one).
    #[arg(long, global = true, value_name = "FILE")]
    ca_cert: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Json)]
    output: Output,
}

/// A connection to the admin API.
struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
    output: Output,
}

impl Client {
    fn new(args: &ClientArgs) -> Result<Client, String> {
        let config = Config::load(args.config.as_deref()).map_err(|e| e.to_string())?;
        let host = args
            .api_host
            .clone()
            .unwrap_or(config.server.listen.clone());
        let base = if host.starts_with("http://") || host.starts_with("https://") {
            host.trim_end_matches('/').to_string()
        } else if config.server.tls_cert.is_some() {
            format!("https://{host}")
        } else {
            format!("http://{host}")
        };
        let mut http = reqwest::Client::builder();
        if let Some(path) = &args.ca_cert {
            let pem = std::fs::read(path)
                .map_err(|e| format!("cannot read --ca-cert {}: {e}", path.display()))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| format!("--ca-cert {}: {e}", path.display()))?;
            http = http.tls_certs_only([cert]);
        }
        let http = http
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        let token_file = args.token_file.clone().unwrap_or_else(|| {
            config
                .storage
                .data_dir
                .join(crate::daemon::ADMIN_TOKEN_FILE)
        });
        let token = std::fs::read_to_string(&token_file)
            .map_err(|e| {
                format!(
                    "cannot read the token file {} ({e}); pass --token-file",
                    token_file.display()
                )
            })?
            .trim()
            .to_string();
        Ok(Client {
            http,
            base,
            token,
            output: args.output,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| format!("cannot reach the daemon at {}: {e}", self.base))?;
        let status = resp.status();
        let value: Value = resp
            .json()
            .await
            .map_err(|e| format!("unreadable answer from the daemon ({status}): {e}"))?;
        if status.is_success() {
            Ok(value)
        } else {
            let message = value["error"]["message"]
                .as_str()
                .unwrap_or("unknown error");
            Err(format!("{} ({})", message, status.as_u16()))
        }
    }

    fn print(&self, value: &Value) {
        match self.output {
            Output::Json => println!("{value}"),
            Output::Table => print!("{}", table(value)),
        }
    }
}

/// Flattens one resource into (column, cell) pairs; `ref` becomes its `name`.
fn flatten(prefix: &str, value: &Value, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                if k == "ref" && prefix.is_empty() {
                    if let Some(name) = v.get("name").and_then(Value::as_str) {
                        out.push(("name".into(), name.to_string()));
                    }
                    continue;
                }
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        Value::String(s) => out.push((prefix.to_string(), s.clone())),
        Value::Null => out.push((prefix.to_string(), String::new())),
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

/// Renders a list answer (`{"things":[...]}`), a wrapped resource or a bare one as an
/// aligned text table.
pub fn table(value: &Value) -> String {
    let items: Vec<&Value> = match value {
        Value::Object(map) if map.len() == 1 => match map.values().next() {
            Some(Value::Array(a)) => a.iter().collect(),
            Some(inner @ Value::Object(_)) => vec![inner],
            _ => vec![value],
        },
        _ => vec![value],
    };
    let rows: Vec<Vec<(String, String)>> = items
        .iter()
        .map(|item| {
            // List entries may wrap the resource once more ({"sink":{..}}).
            let item = match item {
                Value::Object(m) if m.len() == 1 && m.values().all(Value::is_object) => {
                    m.values().next().unwrap_or(item)
                }
                _ => item,
            };
            let mut cells = Vec::new();
            flatten("", item, &mut cells);
            cells
        })
        .collect();
    let mut columns: Vec<String> = Vec::new();
    for row in &rows {
        for (c, _) in row {
            if !columns.contains(c) {
                columns.push(c.clone());
            }
        }
    }
    let grid: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            columns
                .iter()
                .map(|c| {
                    row.iter()
                        .find(|(k, _)| k == c)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default()
                })
                .collect()
        })
        .collect();
    let headers: Vec<String> = columns.iter().map(|c| c.to_uppercase()).collect();
    let widths: Vec<usize> = (0..columns.len())
        .map(|i| {
            grid.iter()
                .map(|r| r[i].chars().count())
                .chain([headers[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| {
        let mut s = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(&headers);
    for row in &grid {
        out.push_str(&line(row));
    }
    out
}

async fn client_command(command: Command) -> Result<(), String> {
    use reqwest::Method;
    match command {
        Command::Create { client, what } => {
            let c = Client::new(&client)?;
            let value = match what {
                CreateWhat::Stream { name, key_rotation } => {
                    let mut body = serde_json::json!({ "name": name });
                    if let Some(r) = key_rotation {
                        body["keyRotation"] = Value::String(r);
                    }
                    c.call(Method::POST, "/v1/streams", Some(body)).await?
                }
                CreateWhat::Sink {
                    name,
                    target,
                    sink_type,
                    credentials_file,
                    endpoint,
                    region,
                    path_style,
                } => {
                    let body = match sink_type {
                        SinkKind::Local => {
                            if credentials_file.is_some()
                                || endpoint.is_some()
                                || region.is_some()
                                || path_style
                            {
                                return Err("--credentials-file, --endpoint, --region and --path-style are for S3 sinks".into());
                            }
                            let path = std::path::absolute(&target)
                                .map_err(|e| format!("{target}: {e}"))?;
                            serde_json::json!({"name": name, "sinkType": "LOCAL",
                                "local": {"path": path.to_string_lossy()}})
                        }
                        SinkKind::S3 => {
                            let mut bucket =
                                serde_json::json!({"bucketName": target, "pathStyle": path_style});
                            if let Some(e) = endpoint {
                                bucket["endpoint"] = Value::String(e);
                            }
                            if let Some(r) = region {
                                bucket["region"] = Value::String(r);
                            }
                            if let Some(f) = credentials_file {
                                bucket["credentials"] = read_credentials(&f)?;
                            }
                            serde_json::json!({"name": name, "sinkType": "S3", "bucket": bucket})
                        }
                    };
                    c.call(Method::POST, "/v1/sinks", Some(body)).await?
                }
                CreateWhat::Token { name, scopes } => {
                    let body = serde_json::json!({"name": name, "scopes": scopes});
                    c.call(Method::POST, "/v1/tokens", Some(body)).await?
                }
                CreateWhat::BatchExporter {
                    stream,
                    export_keys,
                    interval,
                    path_prefix,
                    sink,
                    name,
                    format,
                    skip_existing_keys,
                } => {
                    if !export_keys {
                        return Err(format!(
                            "this daemon exports key streams: add --export-keys to create a \
                             batch exporter of the keys of stream '{stream}'"
                        ));
                    }
                    let mut body = serde_json::json!({
                        "keyStreamRef": {"name": stream},
                        "pathPrefix": path_prefix,
                        "format": match format { FormatArg::Jsonl => "JSONL", FormatArg::Csv => "CSV" },
                        "includeExistingKeys": !skip_existing_keys,
                    });
                    if let Some(i) = interval {
                        body["interval"] = match i.parse::<u64>() {
                            Ok(n) => Value::from(n),
                            Err(_) => Value::String(i),
                        };
                    }
                    if let Some(s) = sink {
                        body["sinkName"] = Value::String(s);
                    }
                    if let Some(n) = name {
                        body["name"] = Value::String(n);
                    }
                    c.call(Method::POST, "/v1/batch-exporters", Some(body))
                        .await?
                }
            };
            c.print(&value);
        }
        Command::List { client, kind } => {
            let c = Client::new(&client)?;
            let value = c
                .call(Method::GET, &format!("/v1/{}", kind.collection()), None)
                .await?;
            c.print(&value);
        }
        Command::Get { client, kind, name } => {
            if kind == Kind::Token {
                return Err("tokens are listed, not shown one by one: list tokens".into());
            }
            let c = Client::new(&client)?;
            let value = c
                .call(
                    Method::GET,
                    &format!("/v1/{}/{name}", kind.collection()),
                    None,
                )
                .await?;
            c.print(&value);
        }
        Command::Delete { client, kind, name } => {
            let c = Client::new(&client)?;
            let value = c
                .call(
                    Method::DELETE,
                    &format!("/v1/{}/{name}", kind.collection()),
                    None,
                )
                .await?;
            c.print(&value);
        }
        Command::Flush { client, kind, name } => {
            if kind != Kind::BatchExporter {
                return Err(
                    "only batch exporters can be flushed: flush batch-exporter NAME".into(),
                );
            }
            let c = Client::new(&client)?;
            let value = c
                .call(
                    Method::POST,
                    &format!("/v1/batch-exporters/{name}/flush"),
                    None,
                )
                .await?;
            c.print(&value);
        }
        Command::Serve { .. }
        | Command::GenerateMasterKey { .. }
        | Command::HashToken
        | Command::Decrypt { .. }
        | Command::Restore { .. } => {
            unreachable!("handled by main")
        }
    }
    Ok(())
}

/// `decrypt` and `restore`: the data owner's offline tools.
async fn owner_command(command: Command) -> Result<ExitCode, String> {
    use crate::owner;
    match command {
        Command::Decrypt {
            keys,
            key_link_field,
            fields,
            s3,
            input,
            output,
        } => {
            let source = owner::KeySource::parse(&keys, &s3.options()?)?;
            let mut problems = Vec::new();
            let loaded = source.load(&mut problems).await?;
            let map = owner::keyset_map(&loaded, &mut problems);
            let problem_count = problems.len();
            for p in problems {
                eprintln!("keyexportd decrypt: {p}");
            }
            if map.is_empty() {
                return Err(format!("no keys found at {keys}"));
            }
            let input_stream =
                owner::open_input(input.as_deref()).map_err(|e| format!("input: {e}"))?;
            let output_stream =
                owner::open_output(output.as_deref()).map_err(|e| format!("output: {e}"))?;
            let summary = owner::decrypt_events(
                &map,
                &owner::DecryptOptions {
                    key_link_field,
                    fields,
                },
                input_stream,
                output_stream,
                &mut |r| eprintln!("keyexportd decrypt: {r}"),
            )
            .map_err(|e| format!("I/O error: {e}"))?;
            eprintln!(
                "keyexportd decrypt: {} keys from {} objects; {} events, {} fields decrypted, {} \
                 events with an unknown keyLink (passed through), {} errors",
                summary.keys,
                loaded.objects,
                summary.events,
                summary.decrypted_fields,
                summary.unknown_key,
                summary.errors + problem_count as u64
            );
            Ok(if summary.errors + problem_count as u64 > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Restore {
            from,
            stream,
            key_rotation,
            config,
            s3,
        } => {
            let config = Config::load(config.as_deref()).map_err(|e| e.to_string())?;
            crate::daemon::set_log_filter("warn");
            let rotation = key_rotation
                .map(|r| crate::duration::Seconds::parse(&r))
                .transpose()
                .map_err(|e| format!("--key-rotation: {e}"))?;
            let source = owner::KeySource::parse(&from, &s3.options()?)?;
            let data = crate::daemon::open_data_dir(&config).map_err(|e| e.to_string())?;
            let summary = owner::restore(&data.keys, &source, &stream, rotation, &mut |r| {
                eprintln!("keyexportd restore: {r}")
            })
            .await?;
            data.store.close().map_err(|e| e.to_string())?;
            println!(
                "{}",
                serde_json::to_string(&summary).expect("a summary serializes")
            );
            Ok(if summary.conflicts + summary.problems > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        _ => unreachable!("only decrypt and restore"),
    }
}

/// Runs a parsed command line; the process exit code.
pub fn main(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve { config } => {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("keyexportd: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(crate::daemon::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    log::error!("{e}");
                    eprintln!("keyexportd: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::GenerateMasterKey { file } => match crate::daemon::generate_master_key(&file) {
            Ok(id) => {
                eprintln!("wrote master key id {id} to {}", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("keyexportd: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Decrypt { .. } | Command::Restore { .. } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a current-thread runtime builds");
            match runtime.block_on(owner_command(cli.command)) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("keyexportd: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::HashToken => {
            let mut secret = String::new();
            if let Err(e) = std::io::stdin().read_line(&mut secret) {
                eprintln!("keyexportd: cannot read the token from stdin: {e}");
                return ExitCode::FAILURE;
            }
            println!("{}", crate::auth::token_hash(&secret));
            ExitCode::SUCCESS
        }
        command => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a current-thread runtime builds");
            match runtime.block_on(client_command(command)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("keyexportd: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_flatten_refs_and_wrappers() {
        let v = serde_json::json!({"streams":[
            {"ref":{"billingId":"b","name":"one"},"keyRotation":"24h"},
            {"ref":{"billingId":"b","name":"two"},"keyRotation":"1h"}
        ]});
        let t = table(&v);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "NAME  KEYROTATION");
        assert_eq!(lines[1], "one   24h");
        assert_eq!(lines[2], "two   1h");
        let wrapped =
            serde_json::json!({"sinks":[{"sink":{"name":"s3","bucket":{"bucketName":"b"}}}]});
        assert!(table(&wrapped).contains("BUCKET.BUCKETNAME"));
    }

    #[test]
    fn kinds_take_both_forms() {
        let cli = Cli::try_parse_from(["keyexportd", "list", "streams"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::List {
                kind: Kind::Stream,
                ..
            }
        ));
        let cli = Cli::try_parse_from(["keyexportd", "get", "stream", "x", "-o", "table"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Get {
                kind: Kind::Stream,
                ..
            }
        ));
    }
}
