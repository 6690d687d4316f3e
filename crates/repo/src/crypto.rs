//! Keys and sealing. (Contract; bodies to be written.)
//!
//! - Master key: 32-byte encryption key + 32-byte id key, random, never leaves memory except
//!   wrapped in a key slot.
//! - Chunk ids: keyed BLAKE3 (id key) of the plaintext, so ids reveal nothing without the key.
//! - Objects: XChaCha20-Poly1305 with a random 24-byte nonce: `nonce || ciphertext || tag`.
//! - Key slots (`keys/<id>`): JSON with argon2id parameters, salt, and the master key sealed
//!   with the password-derived key. Several slots wrap the same master key.

/// A chunk or object id: 32 bytes, shown as 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Id(pub [u8; 32]);

impl Id {
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl std::fmt::Debug for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex()[..16])
    }
}

impl std::fmt::Display for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}
