//! Sealing secrets: AES-256-GCM under a master key, with the key's id stored beside the
//! ciphertext so keys can rotate (new seals use the newest key; old seals still open).
//!
//! The keyring comes from `ZPANEL_MASTER_KEY` (comma-separated base64 keys, newest first) or from
//! `master.key` in the data directory (one base64 key per line, newest first), created with mode
//! 0600 on first start.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::fmt;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use zpanel_domain::secret::SealedSecret;

/// The name of the key file in the data directory.
pub const KEY_FILE: &str = "master.key";

/// A plaintext secret. Its `Debug` and `Display` never show the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Plaintext(String);

impl Plaintext {
    /// Wraps a secret value.
    #[must_use]
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself: call only where it is used.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Plaintext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Plaintext([redacted])")
    }
}

/// A 32-byte master key.
#[derive(Clone)]
struct MasterKey {
    id: String,
    cipher: Aes256Gcm,
    mac_key: [u8; 32],
}

impl MasterKey {
    fn from_bytes(bytes: &[u8]) -> anyhow::Result<Self> {
        anyhow::ensure!(bytes.len() == 32, "a master key must be 32 bytes, this one is {}", bytes.len());
        let id = hex::encode(&Sha256::digest(bytes)[..8]);
        let cipher = Aes256Gcm::new_from_slice(bytes).context("building the cipher")?;
        // A separate key for digests, derived so that a digest reveals nothing about the key.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(bytes).context("building the digest key")?;
        mac.update(b"zpanel secret digest v1");
        let mac_key = mac.finalize().into_bytes().into();
        Ok(Self { id, cipher, mac_key })
    }
}

/// Why a sealed value could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The key that sealed it is not in the keyring.
    #[error("the secret was sealed with key {0}, which is not configured")]
    UnknownKey(String),
    /// The ciphertext was altered, or sealed for something else.
    #[error("the secret could not be opened: it was altered or the key is wrong")]
    Corrupt,
}

/// The master keys: the newest seals, all open.
#[derive(Clone)]
pub struct Keyring {
    keys: Vec<MasterKey>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring").field("key_ids", &self.keys.iter().map(|k| &k.id).collect::<Vec<_>>()).finish()
    }
}

impl Keyring {
    /// A keyring from base64 keys, newest first.
    ///
    /// # Errors
    /// When there is no key or a key is not 32 bytes of base64.
    pub fn from_base64<'a>(keys: impl IntoIterator<Item = &'a str>) -> anyhow::Result<Self> {
        let keys = keys
            .into_iter()
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .enumerate()
            .map(|(i, k)| {
                let bytes = B64.decode(k).with_context(|| format!("master key #{} is not valid base64", i + 1))?;
                MasterKey::from_bytes(&bytes).with_context(|| format!("master key #{}", i + 1))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        anyhow::ensure!(!keys.is_empty(), "no master key given");
        Ok(Self { keys })
    }

    /// A keyring with one fresh random key (tests, benchmarks).
    #[must_use]
    pub fn generate() -> Self {
        let key = new_key_base64();
        Self::from_base64([key.as_str()]).unwrap_or_else(|_| unreachable!("a generated key is valid"))
    }

    /// The keyring from `ZPANEL_MASTER_KEY` when given, else from the data directory's key file,
    /// which is created (mode 0600, one fresh key) when missing.
    ///
    /// # Errors
    /// When a key is malformed or the key file cannot be read or created.
    pub fn load(from_env: Option<&str>, data_dir: &Path) -> anyhow::Result<Self> {
        if let Some(keys) = from_env {
            return Self::from_base64(keys.split(',')).context("reading ZPANEL_MASTER_KEY");
        }
        let path = data_dir.join(KEY_FILE);
        if !path.exists() {
            std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
            // Written aside, then linked into place: another process starting at the same moment
            // either wins the link or reads a complete file, never an empty one.
            let tmp = data_dir.join(format!("{KEY_FILE}.{}", uuid::Uuid::now_v7().simple()));
            write_new_key_file(&tmp, &new_key_base64())?;
            let linked = std::fs::hard_link(&tmp, &path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
            }
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_base64(text.lines()).with_context(|| format!("reading {}", path.display()))
    }

    /// Puts a new key in front of the key file: it seals from now on, the others still open.
    ///
    /// # Errors
    /// When the key file cannot be read or written.
    pub fn rotate_file(data_dir: &Path) -> anyhow::Result<String> {
        let path = data_dir.join(KEY_FILE);
        let old = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let key = new_key_base64();
        let tmp = data_dir.join(format!("{KEY_FILE}.{}", uuid::Uuid::now_v7().simple()));
        write_new_key_file(&tmp, &format!("{key}\n{old}"))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("replacing {}", path.display()))?;
        Self::from_base64([key.as_str()]).map(|k| k.current_key_id().to_owned())
    }

    /// The id of the key that seals.
    #[must_use]
    pub fn current_key_id(&self) -> &str {
        &self.keys[0].id
    }

    /// Seals a secret under the newest key.
    #[must_use]
    pub fn seal(&self, plaintext: &Plaintext) -> SealedSecret {
        let key = &self.keys[0];
        let mut nonce = [0u8; 12];
        rand::thread_rng().fill_bytes(&mut nonce);
        // The key id is authenticated too, so a ciphertext cannot be relabelled.
        let ciphertext = key
            .cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plaintext.expose().as_bytes(), aad: key.id.as_bytes() })
            .unwrap_or_else(|_| unreachable!("AES-GCM encryption of an in-memory buffer cannot fail"));
        SealedSecret {
            key_id: key.id.clone(),
            nonce: B64.encode(nonce),
            ciphertext: B64.encode(ciphertext),
            digest: self.digest(plaintext),
        }
    }

    /// Opens a sealed secret with whichever key sealed it.
    ///
    /// # Errors
    /// When the key is unknown or the ciphertext does not authenticate.
    pub fn open(&self, sealed: &SealedSecret) -> Result<Plaintext, OpenError> {
        let key = self
            .keys
            .iter()
            .find(|k| k.id == sealed.key_id)
            .ok_or_else(|| OpenError::UnknownKey(sealed.key_id.clone()))?;
        let nonce = B64.decode(&sealed.nonce).map_err(|_| OpenError::Corrupt)?;
        let ciphertext = B64.decode(&sealed.ciphertext).map_err(|_| OpenError::Corrupt)?;
        if nonce.len() != 12 {
            return Err(OpenError::Corrupt);
        }
        let plaintext = key
            .cipher
            .decrypt(Nonce::from_slice(&nonce), Payload { msg: &ciphertext, aad: key.id.as_bytes() })
            .map_err(|_| OpenError::Corrupt)?;
        String::from_utf8(plaintext).map(Plaintext).map_err(|_| OpenError::Corrupt)
    }

    /// A keyed digest of a secret: equal for equal secrets under the newest key, meaningless
    /// without the key.
    #[must_use]
    pub fn digest(&self, plaintext: &Plaintext) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.keys[0].mac_key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(plaintext.expose().as_bytes());
        B64.encode(&mac.finalize().into_bytes()[..16])
    }
}

fn new_key_base64() -> String {
    let mut key = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut key);
    B64.encode(key)
}

fn write_new_key_file(path: &Path, contents: &str) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn a_sealed_secret_opens_to_its_plaintext_and_hides_it() {
        let keyring = Keyring::generate();
        let secret = Plaintext::new("hunter2-postgres://u:p@db/x");
        let sealed = keyring.seal(&secret);
        assert_eq!(keyring.open(&sealed).expect("opens"), secret);
        let json = serde_json::to_string(&sealed).expect("serializes");
        assert!(!json.contains("hunter2"), "{json}");
        assert!(!format!("{sealed:?} {secret:?}").contains("hunter2"));
    }

    #[test]
    fn two_seals_of_one_secret_differ_but_share_a_digest() {
        let keyring = Keyring::generate();
        let a = keyring.seal(&Plaintext::new("same"));
        let b = keyring.seal(&Plaintext::new("same"));
        assert_ne!(a.ciphertext, b.ciphertext);
        assert!(a.same_secret_as(&b));
        assert!(!a.same_secret_as(&keyring.seal(&Plaintext::new("other"))));
    }

    #[test]
    fn after_rotation_new_seals_use_the_new_key_and_old_ones_still_open() {
        let dir = std::env::temp_dir().join(format!("zpanel-keys-{}", uuid::Uuid::now_v7()));
        let before = Keyring::load(None, &dir).expect("creates a key file");
        let mode = std::fs::metadata(dir.join(KEY_FILE)).expect("key file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let old_seal = before.seal(&Plaintext::new("old"));
        let new_id = Keyring::rotate_file(&dir).expect("rotates");
        let after = Keyring::load(None, &dir).expect("reloads");
        assert_eq!(after.current_key_id(), new_id);
        assert_ne!(new_id, before.current_key_id());
        assert_eq!(after.open(&old_seal).expect("old seal opens").expose(), "old");
        assert_eq!(after.seal(&Plaintext::new("new")).key_id, new_id);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_tampered_or_foreign_seal_does_not_open() {
        let keyring = Keyring::generate();
        let mut sealed = keyring.seal(&Plaintext::new("x"));
        assert!(matches!(Keyring::generate().open(&sealed), Err(OpenError::UnknownKey(_))));
        sealed.ciphertext = B64.encode(b"garbage-garbage-garbage");
        assert!(matches!(keyring.open(&sealed), Err(OpenError::Corrupt)));
    }

    #[test]
    fn processes_starting_together_agree_on_one_key_file() {
        let dir = std::env::temp_dir().join(format!("zpanel-keys-{}", uuid::Uuid::now_v7()));
        let loaders: Vec<_> = (0..8)
            .map(|_| {
                let dir = dir.clone();
                std::thread::spawn(move || Keyring::load(None, &dir).map(|k| k.current_key_id().to_owned()))
            })
            .collect();
        let ids: Vec<String> = loaders.into_iter().map(|t| t.join().expect("joins").expect("loads")).collect();
        assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_malformed_key_is_refused_with_a_reason() {
        let err = Keyring::from_base64(["c2hvcnQ="]).expect_err("short key");
        assert!(format!("{err:#}").contains("32 bytes"), "{err:#}");
    }
}
