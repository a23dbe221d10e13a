//! API tokens: who may call the admin API, and with which scopes.
//!
//! A token is `kxd_` followed by 43 base64url characters (32 random bytes). Only its
//! SHA-256 is stored (tree `tokens`, keyed by token name); the secret is shown once, when
//! it is created, and the bootstrap admin token is written to `<data_dir>/admin.token`
//! (mode 0600). Lookups go through an in-memory map from hash to token, and the stored
//! hash is compared in constant time.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, RwLock};

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::crypto;
use crate::duration::now_millis;
use crate::store::{Store, StoreError, Table};

/// The name of the bootstrap token with every scope.
pub const ADMIN_TOKEN_NAME: &str = "admin";
const TOKEN_PREFIX: &str = "kxd_";

/// What a token may do; each route needs one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Admin,
    Keys,
    Decrypt,
    Export,
    Metrics,
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Scope, String> {
        Scope::ALL
            .into_iter()
            .find(|scope| scope.as_str() == s)
            .ok_or_else(|| {
                format!("'{s}' is not a scope; scopes are admin, keys, decrypt, export, metrics")
            })
    }
}

impl Scope {
    pub const ALL: [Scope; 5] = [
        Scope::Admin,
        Scope::Keys,
        Scope::Decrypt,
        Scope::Export,
        Scope::Metrics,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::Keys => "keys",
            Scope::Decrypt => "decrypt",
            Scope::Export => "export",
            Scope::Metrics => "metrics",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenRecord {
    pub name: String,
    pub scopes: Vec<Scope>,
    /// SHA-256 of the secret, hex.
    pub hash: String,
    pub created_at: u64,
}

/// The caller a request was authenticated as.
#[derive(Clone, Debug)]
pub struct Caller {
    pub token_name: String,
    pub scopes: Vec<Scope>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token: send 'Authorization: Bearer <token>'")]
    Missing,
    #[error("unknown or revoked token")]
    Unknown,
    #[error("this token lacks the '{}' scope that the route needs", .0.as_str())]
    MissingScope(Scope),
    #[error("{0}")]
    Invalid(String),
    #[error("token '{0}' already exists")]
    Exists(String),
    #[error("token '{0}' not found")]
    NotFound(String),
    #[error(
        "the admin token cannot be deleted; rotate it by deleting admin.token in the data \
         directory and restarting the daemon"
    )]
    Protected,
    #[error("token '{0}' is defined in security.tokens_file; remove it there and send SIGHUP")]
    InFile(String),
    #[error("security.tokens_file {path}: {message}")]
    TokensFile { path: String, message: String },
    #[error("cannot write {path}: {source}")]
    TokenFile {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct Auth {
    store: Arc<Store>,
    /// Token hash -> caller, rebuilt from the store and the tokens file on every change.
    by_hash: RwLock<HashMap<[u8; 32], Caller>>,
    /// Tokens provisioned in `security.tokens_file` (hashes only), re-read on SIGHUP.
    file_tokens: RwLock<Vec<TokenRecord>>,
}

/// `security.tokens_file`: tokens provisioned by the operator, as SHA-256 hashes.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    tokens: Vec<FileToken>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileToken {
    name: String,
    scopes: Vec<Scope>,
    /// Hex SHA-256 of the token (`keyexportd hash-token` prints it).
    sha256: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return None;
    }
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Auth {
    /// Loads the tokens; creates the admin token (and its file) when the token file is
    /// missing, so deleting `admin.token` and restarting rotates the admin token.
    pub fn open(store: Arc<Store>, admin_token_file: &Path) -> Result<Auth, AuthError> {
        let auth = Auth {
            store,
            by_hash: RwLock::new(HashMap::new()),
            file_tokens: RwLock::new(Vec::new()),
        };
        if !admin_token_file.exists() {
            let secret = auth.put_token(ADMIN_TOKEN_NAME, &Scope::ALL)?;
            write_secret_file(admin_token_file, secret.as_bytes()).map_err(|source| {
                AuthError::TokenFile {
                    path: admin_token_file.display().to_string(),
                    source,
                }
            })?;
            log::info!(
                "wrote a new admin token (every scope) to {}",
                admin_token_file.display()
            );
        }
        auth.reload()?;
        Ok(auth)
    }

    /// Re-reads the tokens from the store.
    pub fn reload(&self) -> Result<(), AuthError> {
        let mut map = HashMap::new();
        let stored: Vec<TokenRecord> = self
            .store
            .list::<TokenRecord>(Table::Tokens, "")?
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        let from_file = self
            .file_tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for t in stored.into_iter().chain(from_file) {
            let Some(hash) = unhex(&t.hash) else {
                log::warn!(
                    "token '{}' has a malformed hash in the store; ignoring it",
                    t.name
                );
                continue;
            };
            map.insert(
                hash,
                Caller {
                    token_name: t.name,
                    scopes: t.scopes,
                },
            );
        }
        *self.by_hash.write().unwrap_or_else(|e| e.into_inner()) = map;
        Ok(())
    }

    /// Reads `security.tokens_file` and applies it at once; returns what changed, by
    /// token name (never a secret). On error nothing changes.
    pub fn load_tokens_file(&self, path: &Path) -> Result<Vec<String>, AuthError> {
        let bad = |message: String| AuthError::TokensFile {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let file: TokensFile = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let stored: Vec<String> = self.tokens()?.into_iter().map(|t| t.name).collect();
        let mut records = Vec::new();
        for t in file.tokens {
            crate::names::validate("token", &t.name).map_err(bad)?;
            if unhex(&t.sha256.to_ascii_lowercase()).is_none() {
                return Err(bad(format!(
                    "token '{}': sha256 must be 64 hex digits",
                    t.name
                )));
            }
            if stored.contains(&t.name) || records.iter().any(|r: &TokenRecord| r.name == t.name) {
                return Err(bad(format!("token name '{}' is used twice", t.name)));
            }
            if t.scopes.is_empty() {
                return Err(bad(format!("token '{}' has no scope", t.name)));
            }
            records.push(TokenRecord {
                name: t.name,
                scopes: t.scopes,
                hash: t.sha256.to_ascii_lowercase(),
                created_at: 0,
            });
        }
        let mut changes = Vec::new();
        {
            let mut current = self.file_tokens.write().unwrap_or_else(|e| e.into_inner());
            for r in &records {
                match current.iter().find(|c| c.name == r.name) {
                    None => changes.push(format!("added token '{}'", r.name)),
                    Some(c) if c.hash != r.hash || c.scopes != r.scopes => {
                        changes.push(format!("changed token '{}'", r.name))
                    }
                    Some(_) => {}
                }
            }
            for c in current.iter() {
                if !records.iter().any(|r| r.name == c.name) {
                    changes.push(format!("removed token '{}'", c.name));
                }
            }
            *current = records;
        }
        self.reload()?;
        Ok(changes)
    }

    /// Creates the token `name` with `scopes`; returns its secret, shown only now.
    pub fn create_token(
        &self,
        name: &str,
        scopes: &[Scope],
    ) -> Result<(TokenRecord, String), AuthError> {
        crate::names::validate("token", name).map_err(AuthError::Invalid)?;
        if self.file_tokens().iter().any(|t| t.name == name) {
            return Err(AuthError::Exists(name.to_string()));
        }
        if scopes.is_empty() {
            return Err(AuthError::Invalid(
                "scopes must name at least one of admin, keys, decrypt, export, metrics".into(),
            ));
        }
        if self
            .store
            .get::<TokenRecord>(Table::Tokens, name)?
            .is_some()
        {
            return Err(AuthError::Exists(name.to_string()));
        }
        let secret = self.put_token(name, scopes)?;
        let record = self
            .store
            .get::<TokenRecord>(Table::Tokens, name)?
            .ok_or_else(|| AuthError::NotFound(name.to_string()))?;
        Ok((record, secret))
    }

    /// Every token (never a secret).
    pub fn tokens(&self) -> Result<Vec<TokenRecord>, AuthError> {
        Ok(self
            .store
            .list::<TokenRecord>(Table::Tokens, "")?
            .into_iter()
            .map(|(_, t)| t)
            .collect())
    }

    /// Tokens of the tokens file (never a secret).
    pub fn file_tokens(&self) -> Vec<TokenRecord> {
        self.file_tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Revokes a token at once. The bootstrap admin token is rotated instead, by
    /// deleting its file and restarting, so that an operator cannot lock themselves out.
    pub fn revoke(&self, name: &str) -> Result<(), AuthError> {
        if name == ADMIN_TOKEN_NAME {
            return Err(AuthError::Protected);
        }
        if self.file_tokens().iter().any(|t| t.name == name) {
            return Err(AuthError::InFile(name.to_string()));
        }
        if !self.store.remove(Table::Tokens, name)? {
            return Err(AuthError::NotFound(name.to_string()));
        }
        self.reload()
    }

    /// Creates or replaces the token `name`; returns its secret.
    fn put_token(&self, name: &str, scopes: &[Scope]) -> Result<String, AuthError> {
        let secret = format!(
            "{TOKEN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&*crypto::random_bytes(32))
        );
        let mut scopes = scopes.to_vec();
        scopes.sort();
        scopes.dedup();
        let record = TokenRecord {
            name: name.to_string(),
            scopes,
            hash: hex(&crypto::sha256(secret.as_bytes())),
            created_at: now_millis(),
        };
        self.store.put(Table::Tokens, name, &record)?;
        self.reload()?;
        Ok(secret)
    }

    /// Authenticates the `Authorization` header value and checks every scope.
    pub fn check(
        &self,
        authorization: Option<&str>,
        scopes: &[Scope],
    ) -> Result<Caller, AuthError> {
        let caller = self.authenticate(authorization)?;
        match scopes.iter().find(|s| !caller.scopes.contains(s)) {
            Some(missing) => Err(AuthError::MissingScope(*missing)),
            None => Ok(caller),
        }
    }

    /// Authenticates without a scope check.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Caller, AuthError> {
        let header = authorization.ok_or(AuthError::Missing)?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or(AuthError::Missing)?
            .trim();
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let hash = crypto::sha256(token.as_bytes());
        let map = self.by_hash.read().unwrap_or_else(|e| e.into_inner());
        match map.get_key_value(&hash) {
            Some((stored, caller)) if crypto::ct_eq(stored, &hash) => Ok(caller.clone()),
            _ => Err(AuthError::Unknown),
        }
    }
}

/// The hex SHA-256 of a token, as `security.tokens_file` wants it.
pub fn token_hash(secret: &str) -> String {
    hex(&crypto::sha256(secret.trim().as_bytes()))
}

/// Writes a secret to a new file readable only by its owner.
pub fn write_secret_file(path: &Path, secret: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(secret)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn bootstrap_token_checks_and_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("db"), 8 << 20, 0).unwrap());
        let file = dir.path().join("admin.token");
        let auth = Auth::open(store.clone(), &file).unwrap();
        let secret = std::fs::read_to_string(&file).unwrap();
        assert!(secret.starts_with("kxd_"));
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let bearer = format!("Bearer {secret}");
        assert_eq!(
            auth.check(Some(&bearer), &[Scope::Admin, Scope::Export])
                .unwrap()
                .token_name,
            "admin"
        );
        assert!(matches!(
            auth.check(None, &[Scope::Admin]),
            Err(AuthError::Missing)
        ));
        assert!(matches!(
            auth.check(Some("Bearer kxd_nope"), &[Scope::Admin]),
            Err(AuthError::Unknown)
        ));
        assert!(matches!(
            auth.check(Some(&secret), &[Scope::Admin]),
            Err(AuthError::Missing)
        ));
        let (record, reader) = auth.create_token("reader", &[Scope::Metrics]).unwrap();
        assert_eq!(record.scopes, vec![Scope::Metrics]);
        assert!(matches!(
            auth.create_token("reader", &[Scope::Keys]),
            Err(AuthError::Exists(_))
        ));
        assert!(matches!(
            auth.create_token("x", &[]),
            Err(AuthError::Invalid(_))
        ));
        let reader_bearer = format!("Bearer {reader}");
        let err = auth
            .check(Some(&reader_bearer), &[Scope::Keys])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "this token lacks the 'keys' scope that the route needs"
        );
        auth.revoke("reader").unwrap();
        assert!(matches!(
            auth.check(Some(&reader_bearer), &[Scope::Metrics]),
            Err(AuthError::Unknown)
        ));
        assert!(matches!(auth.revoke("admin"), Err(AuthError::Protected)));
        assert!(matches!(auth.revoke("reader"), Err(AuthError::NotFound(_))));
        assert_eq!("decrypt".parse::<Scope>().unwrap(), Scope::Decrypt);
        assert!("root".parse::<Scope>().is_err());
        // Same file, same token after a restart; a deleted file rotates the token.
        drop(auth);
        let auth = Auth::open(store.clone(), &file).unwrap();
        assert!(auth.check(Some(&bearer), &[Scope::Admin]).is_ok());
        std::fs::remove_file(&file).unwrap();
        let auth = Auth::open(store, &file).unwrap();
        assert!(matches!(
            auth.check(Some(&bearer), &[Scope::Admin]),
            Err(AuthError::Unknown)
        ));
    }
}
