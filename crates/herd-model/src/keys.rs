//! Quote-signing private keys, kept in files and never in etcd.
//!
//! etcd's `keys` section holds each key's id, its Ed25519 **public** key and which one is active:
//! enough for any instance to verify a quote, and for rotation to be one shared write. The private
//! keys are files in a folder given to the instances that sign (the gateway's `--secrets DIR`, a
//! mounted Kubernetes Secret): `<id>.pem`, PKCS#8 PEM as `openssl genpkey -algorithm ed25519`
//! writes it (or `herdctl keys new`). The folder is read again every second, off the request path,
//! so a key added or removed there is taken up without a restart. A private key is used only for
//! the id whose public key it matches.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use tonic::Status;

use crate::sections::KeyRing;

/// The file name suffix of a private key: `<id>.pem`.
const SUFFIX: &str = ".pem";

/// One private key and the seal key derived from it.
pub struct SecretKey {
    signing: SigningKey,
    seal: [u8; 32],
}

impl SecretKey {
    fn new(signing: SigningKey) -> Self {
        let seal = crate::seal::derive_key(&signing);
        Self { signing, seal }
    }

    /// The Ed25519 key that signs.
    pub fn signing(&self) -> &SigningKey {
        &self.signing
    }

    /// The key of the gateway's context seals made under this key's id.
    pub fn seal_key(&self) -> &[u8; 32] {
        &self.seal
    }
}

/// Why a folder of private keys could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The folder or a file in it could not be read.
    #[error("{path}: {source}")]
    Read {
        /// What could not be read.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file that is not an Ed25519 private key in PKCS#8 PEM.
    #[error("{path}: not an Ed25519 private key in PKCS#8 PEM ({reason})")]
    NotAKey {
        /// The file.
        path: PathBuf,
        /// What the decoder said.
        reason: String,
    },
}

/// The private keys an instance holds, by id; kept current from their folder.
#[derive(Clone, Default)]
pub struct SigningSecrets {
    keys: Arc<ArcSwap<HashMap<String, Arc<SecretKey>>>>,
}

impl std::fmt::Debug for SigningSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningSecrets")
            .field("ids", &self.ids())
            .finish()
    }
}

impl SigningSecrets {
    /// Every `<id>.pem` in `dir`; any other file is ignored, a `.pem` that is not a key is an
    /// error.
    pub fn load(dir: &Path) -> Result<Self, KeyFileError> {
        let secrets = Self::default();
        secrets.keys.store(Arc::new(read_dir(dir)?));
        Ok(secrets)
    }

    /// Keys given as `(id, 32-byte secret)`: for tests and tools.
    pub fn from_secrets(keys: &[(&str, [u8; 32])]) -> Self {
        let secrets = Self::default();
        secrets.keys.store(Arc::new(
            keys.iter()
                .map(|(id, secret)| {
                    let key = SecretKey::new(SigningKey::from_bytes(secret));
                    (id.to_string(), Arc::new(key))
                })
                .collect(),
        ));
        secrets
    }

    /// Reads `dir` again every `every`, taking up what changed; a folder that cannot be read
    /// leaves the keys as they were (and says why once). The task ends with the last clone.
    pub fn watch(&self, dir: PathBuf, every: Duration) -> tokio::task::JoinHandle<()> {
        let held = Arc::downgrade(&self.keys);
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                tokio::time::sleep(every).await;
                let Some(keys) = held.upgrade() else { return };
                let read = {
                    let dir = dir.clone();
                    tokio::task::spawn_blocking(move || read_dir(&dir)).await
                };
                match read {
                    Ok(Ok(fresh)) => {
                        failing = false;
                        let same = {
                            let current = keys.load();
                            current.len() == fresh.len()
                                && fresh.iter().all(|(id, key)| {
                                    current.get(id).is_some_and(|k| {
                                        k.signing.to_bytes() == key.signing.to_bytes()
                                    })
                                })
                        };
                        if !same {
                            let mut ids: Vec<&String> = fresh.keys().collect();
                            ids.sort();
                            tracing::info!(?ids, "signing keys read again");
                            keys.store(Arc::new(fresh));
                        }
                    }
                    Ok(Err(e)) if !failing => {
                        failing = true;
                        tracing::warn!(error = %e, "signing keys not read again; keeping the last");
                    }
                    _ => {}
                }
            }
        })
    }

    /// The private key of `id`, if this instance holds it.
    pub fn get(&self, id: &str) -> Option<Arc<SecretKey>> {
        self.keys.load().get(id).cloned()
    }

    /// The ids held, sorted.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.keys.load().keys().cloned().collect();
        ids.sort();
        ids
    }

    /// The private key of `id`, if held and if it is the one whose public key `ring` has.
    pub fn matching(&self, ring: &KeyRing, id: &str) -> Option<Arc<SecretKey>> {
        let public = ring.get(id)?;
        self.get(id)
            .filter(|key| key.signing.verifying_key() == *public)
    }

    /// The active key of `ring`, ready to sign; `FAILED_PRECONDITION` saying what is missing
    /// when this instance does not hold its private key.
    pub fn active(&self, ring: &KeyRing) -> Result<ActiveKey, Status> {
        let id = ring.active_id();
        match self.matching(ring, id) {
            Some(secret) => Ok(ActiveKey {
                id: id.to_string(),
                secret,
            }),
            None if self.get(id).is_some() => Err(Status::failed_precondition(format!(
                "keys: this instance's private key {id}{SUFFIX} does not match the public key of \
                 {id} in the keys section"
            ))),
            None => Err(Status::failed_precondition(format!(
                "keys: {id} is the active signing key, but this instance holds no {id}{SUFFIX} \
                 among its secrets (it holds: {})",
                self.ids().join(", ")
            ))),
        }
    }
}

/// The key that signs now: its id and private key.
#[derive(Clone)]
pub struct ActiveKey {
    /// Its id, written into what it signs.
    pub id: String,
    /// Its private key.
    pub secret: Arc<SecretKey>,
}

/// Every `<id>.pem` in `dir`.
fn read_dir(dir: &Path) -> Result<HashMap<String, Arc<SecretKey>>, KeyFileError> {
    let read_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| KeyFileError::Read { path, source }
    };
    let mut keys = HashMap::new();
    for entry in std::fs::read_dir(dir).map_err(read_error(dir))? {
        let path = entry.map_err(read_error(dir))?.path();
        let Some(id) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(SUFFIX))
            .filter(|id| !id.is_empty() && !id.starts_with('.'))
        else {
            continue;
        };
        let pem = std::fs::read_to_string(&path).map_err(read_error(&path))?;
        let signing = SigningKey::from_pkcs8_pem(&pem).map_err(|e| KeyFileError::NotAKey {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        keys.insert(id.to_string(), Arc::new(SecretKey::new(signing)));
    }
    Ok(keys)
}

/// Writes `secret` as `dir/<id>.pem` (PKCS#8 PEM, readable by its owner only), creating `dir`;
/// returns the file's path.
pub fn write_key(dir: &Path, id: &str, secret: &[u8; 32]) -> std::io::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let pem = SigningKey::from_bytes(secret)
        .to_pkcs8_pem(Default::default())
        .map_err(std::io::Error::other)?;
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{id}{SUFFIX}"));
    // Written whole beside it and renamed: a reader never sees half a key.
    let partial = dir.join(format!(".{id}{SUFFIX}.partial"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)?;
    file.write_all(pem.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&partial, &path)?;
    Ok(path)
}

/// The public key of `secret`, base64, as the keys section holds it.
pub fn public_of(secret: &[u8; 32]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .encode(SigningKey::from_bytes(secret).verifying_key().to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written by `openssl genpkey -algorithm ed25519`; its public key by `openssl pkey -pubout`.
    const OPENSSL_PEM: &str = "-----BEGIN PRIVATE KEY-----\n\
        MC4CAQAwBQYDK2VwBCIEIJGaSKXqLjgzeHI5W49hrBKXMbU82x1Am16scCwYyd7u\n\
        -----END PRIVATE KEY-----\n";
    const OPENSSL_PUBLIC: &str = "BRZAN0OwssqEpPesSPh8KFCtA6lX7dDWFeyspulAEb8=";

    #[test]
    fn keys_are_read_from_their_files_and_used_only_for_their_public_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("ossl.pem"), OPENSSL_PEM).expect("written");
        write_key(dir.path(), "k2", &[2; 32]).expect("written");
        std::fs::write(dir.path().join("README"), "not a key").expect("written");
        let secrets = SigningSecrets::load(dir.path()).expect("loaded");
        assert_eq!(secrets.ids(), ["k2", "ossl"]);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("k2.pem"))
                .expect("k2")
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);

        let ring = |active: &str, keys: &[(&str, String)]| {
            KeyRing::from_public(active, keys).expect("a valid ring")
        };
        let ossl = ring("ossl", &[("ossl", OPENSSL_PUBLIC.to_string())]);
        assert!(secrets.active(&ossl).is_ok(), "openssl's key signs");
        let k2 = ring("k2", &[("k2", public_of(&[2; 32]))]);
        assert_eq!(
            secrets.active(&k2).map(|a| a.id).ok().as_deref(),
            Some("k2")
        );
        // A private key whose public key is not the one in etcd is not used.
        let other = ring("k2", &[("k2", public_of(&[3; 32]))]);
        let refused = secrets
            .active(&other)
            .err()
            .map(|s| s.message().to_string());
        assert!(refused.is_some_and(|m| m.contains("does not match")));
        // An active key this instance does not hold: said, with what it holds.
        let missing = ring("k9", &[("k9", public_of(&[9; 32]))]);
        let refused = secrets
            .active(&missing)
            .err()
            .map(|s| s.message().to_string());
        assert_eq!(
            refused.as_deref(),
            Some(
                "keys: k9 is the active signing key, but this instance holds no k9.pem among \
                 its secrets (it holds: k2, ossl)"
            )
        );
    }

    #[test]
    fn a_file_that_is_not_a_key_is_named() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("bad.pem"), "-----BEGIN NOTHING-----").expect("written");
        let error = SigningSecrets::load(dir.path())
            .err()
            .map(|e| e.to_string());
        assert!(error.is_some_and(|e| e.contains("bad.pem: not an Ed25519 private key")),);
        let missing = SigningSecrets::load(&dir.path().join("absent")).err();
        assert!(matches!(missing, Some(KeyFileError::Read { .. })));
    }

    #[tokio::test]
    async fn a_key_added_to_the_folder_is_taken_up() {
        let dir = tempfile::tempdir().expect("temp dir");
        write_key(dir.path(), "k1", &[1; 32]).expect("written");
        let secrets = SigningSecrets::load(dir.path()).expect("loaded");
        let watch = secrets.watch(dir.path().to_path_buf(), Duration::from_millis(10));
        write_key(dir.path(), "k2", &[2; 32]).expect("written");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while secrets.get("k2").is_none() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(secrets.ids(), ["k1", "k2"]);
        watch.abort();
    }
}
