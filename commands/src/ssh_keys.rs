//! SSH private keys at the boundary: parse one a user gives (OpenSSH format), or generate an
//! Ed25519 key; derive the public half and its fingerprint. The private half leaves here only as
//! [`Plaintext`], to be sealed at once.
//!
//! Opening a key is CPU work whose cost the key file chooses (its KDF's rounds): the rounds
//! are capped ([`MAX_KDF_ROUNDS`]), and async callers use [`open`], which does the work on
//! the blocking pool, never on a runtime thread.

use crate::Plaintext;
use ssh_key::rand_core::OsRng;
use ssh_key::{Algorithm, HashAlg, LineEnding};

/// A private key taken apart for the `PrivateKey` aggregate.
#[derive(Debug)]
pub struct KeyMaterial {
    /// The public half, OpenSSH one-line form (`ssh-ed25519 AAAA…`).
    pub public_key: String,
    /// `SHA256:…`, as `ssh-keygen -l` prints it.
    pub fingerprint: String,
    /// The private half, OpenSSH PEM.
    pub private_key: Plaintext,
}

/// Why a key was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Not an OpenSSH private key.
    #[error("must be an OpenSSH private key (-----BEGIN OPENSSH PRIVATE KEY-----)")]
    Malformed,
    /// Protected by a passphrase, and none was given.
    #[error("is required: the key is protected by a passphrase")]
    PassphraseRequired,
    /// The passphrase given does not open the key.
    #[error("does not open the key")]
    WrongPassphrase,
    /// The key asks its KDF for more rounds than Zpanel will spend opening it.
    #[error("asks for {rounds} bcrypt rounds to open; at most {MAX_KDF_ROUNDS} are accepted (ssh-keygen uses 16)")]
    TooManyRounds {
        /// The rounds the key asks for.
        rounds: u32,
    },
}

/// The most bcrypt-pbkdf rounds spent opening a key: ssh-keygen's default is 16, and a few
/// hundred already take seconds of one core. Past this, a key file is a way to make the
/// server work for minutes (2^32 rounds: for ever).
pub const MAX_KDF_ROUNDS: u32 = 256;

impl KeyError {
    /// The input field the error is about: `passphrase` or `privateKey`.
    #[must_use]
    pub const fn field(&self) -> &'static str {
        match self {
            Self::Malformed | Self::TooManyRounds { .. } => "privateKey",
            Self::PassphraseRequired | Self::WrongPassphrase => "passphrase",
        }
    }
}

/// Parses a private key in OpenSSH format, opening it with `passphrase` when it is protected
/// by one. The key leaves here unprotected — to be sealed under the master key, which is what
/// protects it at rest; the passphrase is used once and kept nowhere.
///
/// # Errors
/// When it is not an OpenSSH private key, or is protected and `passphrase` is missing or does
/// not open it. The error never quotes the key or the passphrase.
pub fn parse(pem: &Plaintext, passphrase: Option<&Plaintext>) -> Result<KeyMaterial, KeyError> {
    let key = ssh_key::PrivateKey::from_openssh(pem.expose().trim()).map_err(|_| KeyError::Malformed)?;
    if !key.is_encrypted() {
        return material(&key);
    }
    if let ssh_key::Kdf::Bcrypt { rounds, .. } = key.kdf()
        && *rounds > MAX_KDF_ROUNDS
    {
        return Err(KeyError::TooManyRounds { rounds: *rounds });
    }
    let passphrase = passphrase.ok_or(KeyError::PassphraseRequired)?;
    let opened = key.decrypt(passphrase.expose().as_bytes()).map_err(|_| KeyError::WrongPassphrase)?;
    material(&opened)
}

/// [`parse`] on the blocking pool, for async callers: opening a protected key runs its KDF.
///
/// # Errors
/// As [`parse`].
pub async fn open(pem: Plaintext, passphrase: Option<Plaintext>) -> Result<KeyMaterial, KeyError> {
    tokio::task::spawn_blocking(move || parse(&pem, passphrase.as_ref())).await.unwrap_or(Err(KeyError::Malformed))
}

/// Generates an Ed25519 key.
///
/// # Errors
/// Only if the system's random source fails.
pub fn generate_ed25519() -> Result<KeyMaterial, KeyError> {
    let key = ssh_key::PrivateKey::random(&mut OsRng, Algorithm::Ed25519).map_err(|_| KeyError::Malformed)?;
    material(&key)
}

fn material(key: &ssh_key::PrivateKey) -> Result<KeyMaterial, KeyError> {
    let public_key = key.public_key().to_openssh().map_err(|_| KeyError::Malformed)?;
    let fingerprint = key.public_key().fingerprint(HashAlg::Sha256).to_string();
    let private_key = key.to_openssh(LineEnding::LF).map_err(|_| KeyError::Malformed)?;
    Ok(KeyMaterial { public_key, fingerprint, private_key: Plaintext::new(private_key.to_string()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_parses_back_to_the_same_public_half() {
        let generated = generate_ed25519().expect("generates");
        assert!(generated.public_key.starts_with("ssh-ed25519 "));
        assert!(generated.fingerprint.starts_with("SHA256:"));
        let parsed = parse(&generated.private_key, None).expect("parses");
        assert_eq!(parsed.public_key, generated.public_key);
        assert_eq!(parsed.fingerprint, generated.fingerprint);
    }

    #[test]
    fn garbage_is_refused_without_being_quoted() {
        let err =
            parse(&Plaintext::new("-----BEGIN OPENSSH PRIVATE KEY-----\nsecretgarbage\n"), None).expect_err("refused");
        assert!(!err.to_string().contains("secretgarbage"));
    }

    #[test]
    fn a_key_asking_for_too_many_kdf_rounds_is_refused_before_any_are_spent() {
        let pem = crate::testing::protected_key_with_rounds(u32::MAX);
        let started = std::time::Instant::now();
        let refused = parse(&Plaintext::new(pem), Some(&Plaintext::new("correct horse"))).expect_err("refused");
        assert!(matches!(refused, KeyError::TooManyRounds { rounds: u32::MAX }), "{refused}");
        assert_eq!(refused.field(), "privateKey");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        // At the cap it still opens.
        let pem = crate::testing::protected_key_with_rounds(MAX_KDF_ROUNDS);
        assert!(matches!(parse(&Plaintext::new(pem), None), Err(KeyError::PassphraseRequired)));
    }

    #[test]
    fn a_protected_key_opens_only_with_its_passphrase_and_is_kept_unprotected() {
        let key = ssh_key::PrivateKey::random(&mut OsRng, Algorithm::Ed25519).expect("a key");
        let protected = key.encrypt(&mut OsRng, "correct horse").expect("encrypted");
        let pem = Plaintext::new(protected.to_openssh(LineEnding::LF).expect("pem").to_string());
        let missing = parse(&pem, None).expect_err("refused");
        assert!(matches!(missing, KeyError::PassphraseRequired) && missing.field() == "passphrase");
        let wrong = parse(&pem, Some(&Plaintext::new("battery staple"))).expect_err("refused");
        assert!(matches!(wrong, KeyError::WrongPassphrase), "{wrong}");
        assert!(!wrong.to_string().contains("battery"));
        let opened = parse(&pem, Some(&Plaintext::new("correct horse"))).expect("opens");
        assert_eq!(opened.fingerprint, key.public_key().fingerprint(HashAlg::Sha256).to_string());
        let kept = ssh_key::PrivateKey::from_openssh(opened.private_key.expose()).expect("parses");
        assert!(!kept.is_encrypted());
    }
}
