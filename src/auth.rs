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
    /// Token hash -> caller, rebuilt from the store on every change.
    by_hash: RwLock<HashMap<[u8; 32], Caller>>,
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
        for (_, t) in self.store.list::<TokenRecord>(Table::Tokens, "")? {
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

    /// Creates or replaces the token `name`; returns its secret.
    pub fn put_token(&self, name: &str, scopes: &[Scope]) -> Result<String, AuthError> {
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

    /// Authenticates the `Authorization` header value and checks the scope.
    pub fn check(&self, authorization: Option<&str>, scope: Scope) -> Result<Caller, AuthError> {
        let caller = self.authenticate(authorization)?;
        if caller.scopes.contains(&scope) {
            Ok(caller)
        } else {
            Err(AuthError::MissingScope(scope))
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
        let store = Arc::new(Store::open(&dir.path().join("db"), 8 << 20).unwrap());
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
            auth.check(Some(&bearer), Scope::Export).unwrap().token_name,
            "admin"
        );
        assert!(matches!(
            auth.check(None, Scope::Admin),
            Err(AuthError::Missing)
        ));
        assert!(matches!(
            auth.check(Some("Bearer kxd_nope"), Scope::Admin),
            Err(AuthError::Unknown)
        ));
        assert!(matches!(
            auth.check(Some(&secret), Scope::Admin),
            Err(AuthError::Missing)
        ));
        let reader = auth.put_token("reader", &[Scope::Metrics]).unwrap();
        let err = auth
            .check(Some(&format!("Bearer {reader}")), Scope::Keys)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "this token lacks the 'keys' scope that the route needs"
        );
        // Same file, same token after a restart; a deleted file rotates the token.
        drop(auth);
        let auth = Auth::open(store.clone(), &file).unwrap();
        assert!(auth.check(Some(&bearer), Scope::Admin).is_ok());
        std::fs::remove_file(&file).unwrap();
        let auth = Auth::open(store, &file).unwrap();
        assert!(matches!(
            auth.check(Some(&bearer), Scope::Admin),
            Err(AuthError::Unknown)
        ));
    }
}
