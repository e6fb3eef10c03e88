//! API tokens: `zp_` followed by 64 hex characters of randomness. Only their SHA-256 is stored;
//! tokens are random enough that a fast hash is the right one (a slow hash protects guessable
//! passwords, not 256-bit secrets), and lookup by hash is a constant-time index probe rather
//! than a comparison of secrets.

use rand::RngCore as _;
use sha2::{Digest as _, Sha256};

/// The prefix every token carries, so leaked tokens are recognizable to secret scanners.
pub const PREFIX: &str = "zp_";

/// A freshly generated token (shown once) and its hash (stored).
#[derive(Clone)]
pub struct GeneratedToken {
    /// The token to give to the user, once.
    pub token: crate::Plaintext,
    /// Hex SHA-256 of the token.
    pub hash: String,
}

impl std::fmt::Debug for GeneratedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeneratedToken").field("hash", &self.hash).finish_non_exhaustive()
    }
}

/// Generates a token.
#[must_use]
pub fn generate() -> GeneratedToken {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    let token = format!("{PREFIX}{}", hex::encode(bytes));
    let hash = hash(&token);
    GeneratedToken { token: crate::Plaintext::new(token), hash }
}

/// The stored form of a token.
#[must_use]
pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Whether `token` has a token's form (`zp_` and 64 lowercase hex digits), before any lookup.
#[must_use]
pub fn looks_like_token(token: &str) -> bool {
    token
        .strip_prefix(PREFIX)
        .is_some_and(|rest| rest.len() == 64 && rest.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_token_has_the_prefix_and_hashes_to_its_stored_hash() {
        let generated = generate();
        assert!(generated.token.expose().starts_with(PREFIX));
        assert_eq!(generated.token.expose().len(), PREFIX.len() + 64);
        assert_eq!(hash(generated.token.expose()), generated.hash);
        assert_ne!(generate().hash, generated.hash);
        assert!(looks_like_token(generated.token.expose()));
        assert!(!looks_like_token("zp_short"));
        assert!(!looks_like_token(&generated.token.expose().to_uppercase()));
    }
}
