//! The daemon's configuration: a TOML file whose every key has a built-in default.
//!
//! This module owns parsing and validation only. Unknown keys and bad values stop the
//! daemon at start-up with a message that names the key, so a typo never silently falls
//! back to a default. `etc/keyexportd.toml` documents every key; a unit test keeps that
//! file and these defaults in step.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::duration::Seconds;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config: {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub account: AccountConfig,
    pub keys: KeysConfig,
    pub export: ExportConfig,
    pub security: SecurityConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the admin API. Port 0 picks a free port (tests use it); the bound
    /// address is logged.
    pub listen: String,
    /// PEM certificate chain and private key: the API speaks TLS when both are set.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Allows a non-loopback `listen` without TLS (tokens would cross the network in
    /// clear); off by default.
    pub allow_plaintext_remote: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub data_dir: PathBuf,
    /// sled's page cache in MiB: the main knob for the daemon's resident memory.
    pub cache_capacity_mb: u64,
    /// Writes are refused (503) while less than this is free on the data directory's
    /// disk, so that the database never runs out of space mid-write. 0 disables.
    pub min_free_mb: u64,
    /// Group commit: when fewer than 16 writes wait for the disk, the flusher waits this
    /// long (µs) for more before it flushes. 0 flushes at once.
    pub group_commit_linger_us: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccountConfig {
    pub billing_id: String,
    pub key_export_allowed: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeysConfig {
    /// Rotation period of streams created without `keyRotation`.
    pub rotation: Seconds,
    /// How long a key stays usable for decryption after it rotates.
    pub grace: Seconds,
    /// How long key stream entries are kept (and so how far back exporters reach).
    pub stream_retention: Seconds,
    /// How often the janitor purges expired keys and trims key streams.
    pub purge_interval: Seconds,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    pub min_interval: Seconds,
    pub max_keys_per_object: u64,
    pub shutdown_timeout: Seconds,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// Tink JSON keyset (AES256_GCM) that wraps every stored keyset. When unset the
    /// daemon uses `$CREDENTIALS_DIRECTORY/master.key` (systemd `LoadCredential=`), else
    /// `<data_dir>/master.key`, generating it on first start.
    pub master_key_file: Option<PathBuf>,
    /// JSON file of operator-provisioned tokens (hashes only), re-read on SIGHUP:
    /// `{"tokens":[{"name":"pipeline","scopes":["keys"],"sha256":"<hex>"}]}`.
    pub tokens_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// env_logger filter (`info`, `keyexportd=debug,info`). `RUST_LOG`, when set, wins.
    /// Re-read on SIGHUP.
    pub level: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8750".into(),
            tls_cert: None,
            tls_key: None,
            allow_plaintext_remote: false,
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            data_dir: PathBuf::from("./keyexportd-data"),
            cache_capacity_mb: 64,
            min_free_mb: 64,
            group_commit_linger_us: 1000,
        }
    }
}

impl Default for AccountConfig {
    fn default() -> Self {
        AccountConfig {
            billing_id: "default".into(),
            key_export_allowed: false,
        }
    }
}

impl Default for KeysConfig {
    fn default() -> Self {
        KeysConfig {
            rotation: Seconds(24 * 3600),
            grace: Seconds(3600),
            stream_retention: Seconds(7 * 24 * 3600),
            purge_interval: Seconds(1),
        }
    }
}

impl Default for ExportConfig {
    fn default() -> Self {
        ExportConfig {
            min_interval: Seconds(30),
            max_keys_per_object: 100_000,
            shutdown_timeout: Seconds(30),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
        }
    }
}

impl Config {
    /// Reads and validates `path`, or returns the validated defaults when `path` is None.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let config = match path {
            None => Config::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                Config::parse(&text).map_err(|message| ConfigError::Parse {
                    path: path.to_owned(),
                    message,
                })?
            }
        };
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text; the error names the offending key and line.
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
    }

    /// The listen address as a socket address.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.server
            .listen
            .parse()
            .map_err(|e| ConfigError::Invalid {
                key: "server.listen",
                message: format!(
                    "\"{}\" is not an IP address and port ({e}); write e.g. \"127.0.0.1:8750\"",
                    self.server.listen
                ),
            })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                key,
                message: message.into(),
            }
        }
        let listen = self.listen_addr()?;
        match (&self.server.tls_cert, &self.server.tls_key) {
            (Some(_), None) => {
                return Err(invalid(
                    "server.tls_key",
                    "is required when server.tls_cert is set",
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "server.tls_cert",
                    "is required when server.tls_key is set",
                ));
            }
            (None, None) if !listen.ip().is_loopback() && !self.server.allow_plaintext_remote => {
                return Err(invalid(
                    "server.listen",
                    format!(
                        "{listen} is not a loopback address and the API has no TLS: tokens and \
                         keys would cross the network in clear. Set server.tls_cert and \
                         server.tls_key, or server.allow_plaintext_remote = true if a TLS \
                         proxy fronts the daemon"
                    ),
                ));
            }
            _ => {}
        }
        if self.storage.data_dir.as_os_str().is_empty() {
            return Err(invalid("storage.data_dir", "must not be empty"));
        }
        if self.storage.group_commit_linger_us > 100_000 {
            return Err(invalid(
                "storage.group_commit_linger_us",
                "must be at most 100000 (0.1 s)",
            ));
        }
        if self.storage.cache_capacity_mb == 0 {
            return Err(invalid("storage.cache_capacity_mb", "must be at least 1"));
        }
        if self.account.billing_id.is_empty() {
            return Err(invalid("account.billing_id", "must not be empty"));
        }
        // Ten years bounds every duration, so that no timestamp arithmetic overflows.
        const MAX: u64 = 10 * 366 * 24 * 3600;
        for (key, value) in [
            ("keys.rotation", self.keys.rotation),
            ("keys.grace", self.keys.grace),
            ("keys.stream_retention", self.keys.stream_retention),
            ("keys.purge_interval", self.keys.purge_interval),
            ("export.shutdown_timeout", self.export.shutdown_timeout),
        ] {
            if value.0 > MAX {
                return Err(invalid(key, format!("{value} is longer than ten years")));
            }
        }
        if self.keys.rotation.0 == 0 {
            return Err(invalid("keys.rotation", "must be at least 1s"));
        }
        if self.keys.rotation > self.keys.stream_retention {
            return Err(invalid(
                "keys.rotation",
                "must not be longer than keys.stream_retention (keys would leave the key \
                 stream while still in use)",
            ));
        }
        if self.keys.stream_retention.0 == 0 {
            return Err(invalid("keys.stream_retention", "must be at least 1s"));
        }
        if self.keys.purge_interval.0 == 0 {
            return Err(invalid("keys.purge_interval", "must be at least 1s"));
        }
        if self.export.min_interval.0 == 0 || self.export.min_interval.0 > 3600 {
            return Err(invalid(
                "export.min_interval",
                "must be between 1s and 3600s",
            ));
        }
        if self.export.max_keys_per_object == 0 {
            return Err(invalid("export.max_keys_per_object", "must be at least 1"));
        }
        if self.log.level.trim().is_empty() {
            return Err(invalid("log.level", "must not be empty (e.g. \"info\")"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_design() {
        let c = Config::load(None).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:8750");
        assert_eq!(c.storage.data_dir, PathBuf::from("./keyexportd-data"));
        assert_eq!(c.account.billing_id, "default");
        assert!(!c.account.key_export_allowed);
        assert_eq!(c.keys.rotation, Seconds(86_400));
        assert_eq!(c.keys.grace, Seconds(3600));
        assert_eq!(c.keys.stream_retention, Seconds(604_800));
        assert_eq!(c.export.min_interval, Seconds(30));
        assert_eq!(c.export.max_keys_per_object, 100_000);
        assert_eq!(c.export.shutdown_timeout, Seconds(30));
    }

    #[test]
    fn the_documented_example_is_the_defaults() {
        let text = include_str!("../etc/keyexportd.toml");
        let documented = Config::parse(text).unwrap();
        documented.validate().unwrap();
        assert_eq!(
            format!("{documented:?}"),
            format!("{:?}", Config::default()),
            "etc/keyexportd.toml must spell out every default"
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse("[keys]\nrotaton = \"1h\"\n").unwrap_err();
        assert!(err.contains("rotaton"), "{err}");
        let err = Config::parse("[kyes]\n").unwrap_err();
        assert!(err.contains("kyes"), "{err}");
    }

    #[test]
    fn bad_duration_is_named() {
        let err = Config::parse("[keys]\ngrace = \"soon\"\n").unwrap_err();
        assert!(err.contains("grace") && err.contains("soon"), "{err}");
    }

    #[test]
    fn bad_values_fail_validation() {
        let c = Config::parse("[server]\nlisten = \"localhost\"\n").unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("server.listen")
        );
        let c = Config::parse("[keys]\nrotation = 0\n").unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("keys.rotation")
        );
        let c = Config::parse("[server]\nlisten = \"0.0.0.0:8750\"\n").unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("allow_plaintext_remote") && err.contains("tls_cert"),
            "{err}"
        );
        let c =
            Config::parse("[server]\nlisten = \"0.0.0.0:8750\"\nallow_plaintext_remote = true\n")
                .unwrap();
        c.validate().unwrap();
        let c = Config::parse("[server]\ntls_cert = \"/c.pem\"\n").unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("server.tls_key")
        );
        let c = Config::parse("[export]\nmin_interval = \"2h\"\n").unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("export.min_interval")
        );
    }
}
