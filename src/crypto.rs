//! Everything that touches Tink: data keys (AES-256-SIV keysets), deterministic
//! encryption, the cleartext keyset JSON that exports carry, the master key (AES-256-GCM)
//! that wraps every keyset at rest, and the keyed hash of `keyField` values.
//!
//! No other module names a Tink type. Keysets travel outside this module as serialized
//! `Keyset` protos in [`KeysetBytes`] (zeroized on drop), so the store keeps opaque bytes
//! and the API keeps plain JSON.
//!
//! tink-rust primitives are neither `Send` nor `Sync`, so they are built lazily and cached
//! per thread: one master-key AEAD per thread, and a bounded LRU of deterministic-AEAD
//! primitives per thread keyed by keyLink. A cache hit costs no store read and no unwrap.

use std::cell::RefCell;
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use tink_core::keyset::{Handle, JsonReader, JsonWriter, insecure};
use tink_proto::prost::Message;
use zeroize::Zeroizing;

/// Associated data that ties a wrapped secret to its purpose.
pub const AD_HMAC_SECRET: &[u8] = b"keyexportd/hmac-secret/v1";

/// How many deterministic-AEAD primitives each thread keeps.
const DAEAD_CACHE_PER_THREAD: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The master key could not decrypt a wrapped secret: wrong key or corrupt data.
    #[error("the master key cannot unwrap this data (wrong master key, or corrupt data)")]
    Unwrap,
    #[error("ciphertext is not valid for this key")]
    Decrypt,
    #[error("invalid master key: {0}")]
    MasterKey(String),
    #[error("invalid keyset: {0}")]
    Keyset(String),
    #[error("tink: {0}")]
    Tink(String),
}

type Result<T> = std::result::Result<T, CryptoError>;

/// A serialized Tink `Keyset` proto holding secret key material; zeroized on drop.
pub type KeysetBytes = Zeroizing<Vec<u8>>;

fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        tink_daead::init();
        tink_aead::init();
    });
}

fn tink_err(e: tink_core::TinkError) -> CryptoError {
    CryptoError::Tink(e.to_string())
}

/// `n` bytes from the operating system's CSPRNG.
pub fn random_bytes(n: usize) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(tink_core::subtle::random::get_random_bytes(n))
}

/// SHA-256, for fingerprints of secrets (token lookup); never for key material.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// HMAC-SHA-256 of `parts`, each length-prefixed so that no two inputs collide.
pub fn keyed_hash(secret: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    for part in parts {
        mac.update(&(part.len() as u64).to_be_bytes());
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// Constant-time equality for secrets of equal length.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

// ---------------------------------------------------------------------------------------
// Master key
// ---------------------------------------------------------------------------------------

/// The AES-256-GCM Tink keyset that wraps every stored secret.
pub struct MasterKey {
    handle: Handle,
    /// Distinguishes master keys in the per-thread primitive cache (tests load several).
    instance: u64,
}

static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

thread_local! {
    static MASTER_AEADS: RefCell<HashMap<u64, Box<dyn tink_core::Aead>>> = RefCell::new(HashMap::new());
    static DAEADS: RefCell<lru::LruCache<[u8; 16], Box<dyn tink_core::DeterministicAead>>> =
        RefCell::new(lru::LruCache::new(NonZeroUsize::new(DAEAD_CACHE_PER_THREAD).unwrap()));
}

impl MasterKey {
    /// A fresh random master key.
    pub fn generate() -> Result<MasterKey> {
        init();
        let handle = Handle::new(&tink_aead::aes256_gcm_key_template()).map_err(tink_err)?;
        MasterKey::from_handle(handle)
    }

    /// Reads a cleartext Tink JSON keyset holding an AES-GCM key.
    pub fn from_json(text: &[u8]) -> Result<MasterKey> {
        init();
        let handle = insecure::read(&mut JsonReader::new(text)).map_err(|_| {
            CryptoError::MasterKey("not a Tink JSON keyset (expected an AES256_GCM keyset)".into())
        })?;
        MasterKey::from_handle(handle)
    }

    fn from_handle(handle: Handle) -> Result<MasterKey> {
        // Building the primitive once proves that the keyset is an AEAD keyset.
        tink_aead::new(&handle).map_err(|_| {
            CryptoError::MasterKey("the keyset does not hold an AEAD key such as AES256_GCM".into())
        })?;
        Ok(MasterKey {
            handle,
            instance: NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// The cleartext Tink JSON keyset, for writing the key file.
    pub fn to_json(&self) -> Result<Zeroizing<Vec<u8>>> {
        let mut out = Zeroizing::new(Vec::new());
        insecure::write(&self.handle, &mut JsonWriter::new(&mut *out)).map_err(tink_err)?;
        Ok(out)
    }

    /// The primary key id, safe to log: it tells two master keys apart.
    pub fn key_id(&self) -> u32 {
        self.handle.keyset_info().primary_key_id
    }

    fn with_aead<T>(&self, f: impl FnOnce(&dyn tink_core::Aead) -> Result<T>) -> Result<T> {
        MASTER_AEADS.with(|cell| {
            let mut map = cell.borrow_mut();
            let aead = match map.entry(self.instance) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(tink_aead::new(&self.handle).map_err(tink_err)?)
                }
            };
            f(aead.as_ref())
        })
    }

    /// Encrypts `plaintext`, binding it to `ad` (e.g. the keyLink it belongs to).
    pub fn wrap(&self, plaintext: &[u8], ad: &[u8]) -> Result<Vec<u8>> {
        self.with_aead(|a| a.encrypt(plaintext, ad).map_err(tink_err))
    }

    /// Decrypts what [`MasterKey::wrap`] produced with the same `ad`.
    pub fn unwrap(&self, wrapped: &[u8], ad: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        self.with_aead(|a| {
            a.decrypt(wrapped, ad)
                .map(Zeroizing::new)
                .map_err(|_| CryptoError::Unwrap)
        })
    }
}

impl Drop for MasterKey {
    fn drop(&mut self) {
        let instance = self.instance;
        let _ = MASTER_AEADS.try_with(|cell| cell.borrow_mut().remove(&instance));
    }
}

// ---------------------------------------------------------------------------------------
// Data keys
// ---------------------------------------------------------------------------------------

/// A new AES256_SIV keyset (64-byte key, TINK output prefix), serialized.
pub fn new_data_key() -> Result<KeysetBytes> {
    init();
    let handle = Handle::new(&tink_daead::aes_siv_key_template()).map_err(tink_err)?;
    let keyset = insecure::keyset_material(&handle);
    Ok(Zeroizing::new(keyset.encode_to_vec()))
}

fn decode_keyset(bytes: &[u8]) -> Result<tink_proto::Keyset> {
    tink_proto::Keyset::decode(bytes).map_err(|e| CryptoError::Keyset(e.to_string()))
}

/// The cleartext keyset as Tink's JSON keyset format, a nested JSON object.
pub fn keyset_json(bytes: &[u8]) -> Result<serde_json::Value> {
    let keyset = decode_keyset(bytes)?;
    serde_json::to_value(&keyset).map_err(|e| CryptoError::Keyset(e.to_string()))
}

/// Appends the cleartext keyset as Tink JSON text to `out`, written straight from the
/// proto fields (the exporters' hot path); the same text as [`keyset_json`] gives.
pub fn write_keyset_json(bytes: &[u8], out: &mut Vec<u8>) -> Result<()> {
    use base64::Engine;
    use tink_proto::{KeyStatusType, OutputPrefixType, key_data::KeyMaterialType};
    let keyset = decode_keyset(bytes)?;
    let text = |out: &mut Vec<u8>, s: &str| serde_json::to_writer(out, s).expect("to memory");
    out.extend_from_slice(b"{\"primaryKeyId\":");
    out.extend_from_slice(keyset.primary_key_id.to_string().as_bytes());
    out.extend_from_slice(b",\"key\":[");
    for (i, key) in keyset.key.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"keyData\":");
        match &key.key_data {
            None => out.extend_from_slice(b"null"),
            Some(data) => {
                out.extend_from_slice(b"{\"typeUrl\":");
                text(out, &data.type_url);
                out.extend_from_slice(b",\"value\":\"");
                let at = out.len();
                out.resize(at + data.value.len().div_ceil(3) * 4, 0);
                let n = base64::engine::general_purpose::STANDARD
                    .encode_slice(&data.value, &mut out[at..])
                    .expect("sized for base64");
                out.truncate(at + n);
                out.extend_from_slice(b"\",\"keyMaterialType\":\"");
                out.extend_from_slice(match KeyMaterialType::try_from(data.key_material_type) {
                    Ok(KeyMaterialType::Symmetric) => b"SYMMETRIC".as_slice(),
                    Ok(KeyMaterialType::AsymmetricPrivate) => b"ASYMMETRIC_PRIVATE",
                    Ok(KeyMaterialType::AsymmetricPublic) => b"ASYMMETRIC_PUBLIC",
                    Ok(KeyMaterialType::Remote) => b"REMOTE",
                    _ => b"UNKNOWN",
                });
                out.extend_from_slice(b"\"}");
            }
        }
        out.extend_from_slice(b",\"status\":\"");
        out.extend_from_slice(match KeyStatusType::try_from(key.status) {
            Ok(KeyStatusType::Enabled) => b"ENABLED".as_slice(),
            Ok(KeyStatusType::Disabled) => b"DISABLED",
            Ok(KeyStatusType::Destroyed) => b"DESTROYED",
            _ => b"UNKNOWN",
        });
        out.extend_from_slice(b"\",\"keyId\":");
        out.extend_from_slice(key.key_id.to_string().as_bytes());
        out.extend_from_slice(b",\"outputPrefixType\":\"");
        out.extend_from_slice(match OutputPrefixType::try_from(key.output_prefix_type) {
            Ok(OutputPrefixType::Tink) => b"TINK".as_slice(),
            Ok(OutputPrefixType::Legacy) => b"LEGACY",
            Ok(OutputPrefixType::Raw) => b"RAW",
            Ok(OutputPrefixType::Crunchy) => b"CRUNCHY",
            _ => b"UNKNOWN",
        });
        out.extend_from_slice(b"\"}");
    }
    out.extend_from_slice(b"]}");
    Ok(())
}

/// Parses a Tink JSON keyset (as exported) back into bytes, checking it is a
/// deterministic-AEAD keyset.
pub fn keyset_from_json(value: &serde_json::Value) -> Result<KeysetBytes> {
    init();
    let text = serde_json::to_vec(value).map_err(|e| CryptoError::Keyset(e.to_string()))?;
    let handle = insecure::read(&mut JsonReader::new(text.as_slice()))
        .map_err(|e| CryptoError::Keyset(e.to_string()))?;
    tink_daead::new(&handle)
        .map_err(|_| CryptoError::Keyset("not a deterministic-AEAD keyset".into()))?;
    Ok(Zeroizing::new(
        insecure::keyset_material(&handle).encode_to_vec(),
    ))
}

/// The raw AES-SIV key bytes inside a keyset: only for tests that search files for leaks.
pub fn raw_key_material(bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
    let keyset = decode_keyset(bytes)?;
    keyset
        .key
        .iter()
        .map(|k| {
            let data = k
                .key_data
                .as_ref()
                .ok_or_else(|| CryptoError::Keyset("key without key data".into()))?;
            let siv = tink_proto::AesSivKey::decode(data.value.as_slice())
                .map_err(|e| CryptoError::Keyset(e.to_string()))?;
            Ok(siv.key_value)
        })
        .collect()
}

/// Runs `f` with the deterministic-AEAD primitive of key `id`, building it from the
/// keyset that `load` returns when this thread has not cached it yet.
pub fn with_daead<T>(
    id: [u8; 16],
    load: impl FnOnce() -> std::result::Result<KeysetBytes, CryptoError>,
    f: impl FnOnce(&dyn tink_core::DeterministicAead) -> T,
) -> Result<T> {
    DAEADS.with(|cell| {
        let mut cache = cell.borrow_mut();
        if let Some(p) = cache.get(&id) {
            return Ok(f(p.as_ref()));
        }
        init();
        let keyset = decode_keyset(&load()?)?;
        let handle = insecure::new_handle(keyset).map_err(tink_err)?;
        let primitive = tink_daead::new(&handle).map_err(tink_err)?;
        let out = f(primitive.as_ref());
        cache.put(id, primitive);
        Ok(out)
    })
}

/// Deterministic encryption with empty associated data, as exporters promise.
pub fn encrypt(p: &dyn tink_core::DeterministicAead, plaintext: &[u8]) -> Result<Vec<u8>> {
    p.encrypt_deterministically(plaintext, b"")
        .map_err(tink_err)
}

pub fn decrypt(p: &dyn tink_core::DeterministicAead, ciphertext: &[u8]) -> Result<Vec<u8>> {
    p.decrypt_deterministically(ciphertext, b"")
        .map_err(|_| CryptoError::Decrypt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_key_round_trip_and_wrong_key() {
        let mk = MasterKey::generate().unwrap();
        let wrapped = mk.wrap(b"secret", b"ad").unwrap();
        assert_eq!(&mk.unwrap(&wrapped, b"ad").unwrap()[..], b"secret");
        assert!(matches!(
            mk.unwrap(&wrapped, b"other"),
            Err(CryptoError::Unwrap)
        ));
        let again = MasterKey::from_json(&mk.to_json().unwrap()).unwrap();
        assert_eq!(&again.unwrap(&wrapped, b"ad").unwrap()[..], b"secret");
        let other = MasterKey::generate().unwrap();
        assert!(matches!(
            other.unwrap(&wrapped, b"ad"),
            Err(CryptoError::Unwrap)
        ));
        assert!(MasterKey::from_json(b"{}").is_err());
        assert!(MasterKey::from_json(b"not json").is_err());
    }

    #[test]
    fn a_daead_keyset_is_not_a_master_key() {
        let ks = new_data_key().unwrap();
        let json = serde_json::to_vec(&keyset_json(&ks).unwrap()).unwrap();
        let err = MasterKey::from_json(&json).err().unwrap();
        assert!(err.to_string().contains("AEAD"), "{err}");
    }

    #[test]
    fn data_key_json_has_the_exported_shape() {
        let ks = new_data_key().unwrap();
        let json = keyset_json(&ks).unwrap();
        let key = &json["key"][0];
        assert_eq!(json["primaryKeyId"], key["keyId"]);
        assert_eq!(
            key["keyData"]["typeUrl"],
            "type.googleapis.com/google.crypto.tink.AesSivKey"
        );
        assert_eq!(key["keyData"]["keyMaterialType"], "SYMMETRIC");
        assert_eq!(key["status"], "ENABLED");
        assert_eq!(key["outputPrefixType"], "TINK");
        assert_eq!(raw_key_material(&ks).unwrap()[0].len(), 64);
        let back = keyset_from_json(&json).unwrap();
        assert_eq!(&back[..], &ks[..]);
        let mut direct = b"x".to_vec();
        write_keyset_json(&ks, &mut direct).unwrap();
        assert_eq!(
            &direct[1..],
            &serde_json::to_vec(&json).unwrap()[..],
            "byte-identical to serde's"
        );
    }

    #[test]
    fn deterministic_encryption() {
        let ks = new_data_key().unwrap();
        let id = [7u8; 16];
        let load = || Ok(Zeroizing::new(ks.to_vec()));
        let a = with_daead(id, load, |p| encrypt(p, b"hello").unwrap()).unwrap();
        let b = with_daead(
            id,
            || unreachable!("cached"),
            |p| encrypt(p, b"hello").unwrap(),
        )
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(a[0], 1, "TINK output prefix");
        let pt = with_daead(id, || unreachable!(), |p| decrypt(p, &a))
            .unwrap()
            .unwrap();
        assert_eq!(pt, b"hello");
        let bad = with_daead(id, || unreachable!(), |p| decrypt(p, b"garbage")).unwrap();
        assert!(matches!(bad, Err(CryptoError::Decrypt)));
    }

    #[test]
    fn keyed_hash_separates_parts() {
        let k = b"k";
        assert_ne!(keyed_hash(k, &[b"ab", b"c"]), keyed_hash(k, &[b"a", b"bc"]));
        assert_eq!(keyed_hash(k, &[b"x"]), keyed_hash(k, &[b"x"]));
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }
}
