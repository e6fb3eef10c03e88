//! The sealed form of a secret. The domain never sees plaintext: the command handler seals values
//! before they enter a command (AES-256-GCM under a master key, in `zpanel-commands`), and only
//! the worker that needs a secret opens it.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A secret value sealed under a master key.
///
/// `digest` is a keyed hash of the plaintext: it tells whether two sealed values hold the same
/// secret (for "changed / unchanged" in the audit log) without revealing anything else, since each
/// seal uses a fresh nonce and two ciphertexts of one value differ.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedSecret {
    /// Which master key sealed it, so keys can rotate.
    pub key_id: String,
    /// The AES-GCM nonce, base64.
    pub nonce: String,
    /// Ciphertext with its authentication tag, base64.
    pub ciphertext: String,
    /// Keyed hash of the plaintext, base64.
    pub digest: String,
}

impl SealedSecret {
    /// Whether both seal the same plaintext (as far as the digests tell).
    #[must_use]
    pub fn same_secret_as(&self, other: &Self) -> bool {
        self.digest == other.digest
    }
}

// Ciphertext is not secret, but keep it out of logs anyway: it is noise, and noise hides leaks.
impl fmt::Debug for SealedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedSecret").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}
