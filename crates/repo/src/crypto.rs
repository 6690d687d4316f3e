//! Keys and sealing.
//!
//! - Master key: 32-byte encryption key + 32-byte id key, random, never leaves memory except
//!   wrapped in a key slot. Its `Debug` prints nothing secret and it is zeroed on drop.
//! - Chunk ids: keyed BLAKE3 (id key) of the plaintext, so ids reveal nothing without the key
//!   (an unkeyed hash would let anyone holding the repository test whether it contains a known
//!   file).
//! - Objects: `nonce(24) || ciphertext || tag(16)` with a random 24-byte nonce, under the
//!   repository's [`Cipher`]: XAES-256-GCM (format version 2, the default) or
//!   XChaCha20-Poly1305 (version 1). Both are extended-nonce AEADs: a 192-bit random nonce is
//!   safe for any number of objects, so no nonce state has to be kept or coordinated between
//!   concurrent writers (plain AES-GCM's 96-bit random nonces would cap a key at ~2^32 objects).
//! - Key slots (`keys/<id>`): JSON with argon2id parameters, salt, and the master key sealed
//!   (always XChaCha20-Poly1305) with the password-derived key. Several slots wrap the same
//!   master key, so a password can be added or removed without re-encrypting anything.
//!
//! Both ciphers are an extended-nonce construction around a standard AEAD: a per-object subkey is
//! derived from the key and the first part of the nonce (HChaCha20, or XAES-256-GCM's CMAC-style
//! derivation with two AES-256 blocks), then ChaCha20-Poly1305 or AES-256-GCM seals with the rest
//! of the nonce. The bulk AEAD is `ring`'s (BoringSSL's assembly). Encryption was the largest
//! cost of a backup beyond reading, hashing and compressing: on the benchmark machine
//! (`bench/seal.sh`) XAES-256-GCM seals ~6.1 GiB/s per core and XChaCha20-Poly1305 ~1.9 GiB/s,
//! against ~1.3 GiB/s for RustCrypto's `chacha20poly1305`. The subkey derivations use
//! RustCrypto's `chacha20` (`hchacha`) and `aes` block cipher. Only per-object subkeys ever enter
//! `ring` (whose key schedules are not zeroed on drop); the master key lives in our zeroed
//! buffers and the `aes` crate's zeroing key schedule. The tests check both constructions byte
//! for byte against RustCrypto's complete `chacha20poly1305` and `xaes-256-gcm` AEADs and the
//! C2SP XAES-256-GCM vectors. argon2id is RustCrypto's `argon2` and hashing the reference
//! `blake3`: cryptographic primitives are the one place where we do not write our own.

use aes::cipher::{BlockEncrypt, KeyInit as _};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, CHACHA20_POLY1305};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use crate::{Error, Result};

/// Bytes a sealed object is longer than its plaintext: 24-byte nonce + 16-byte tag.
pub const SEAL_OVERHEAD: usize = 40;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;

/// The authenticated cipher a repository's objects are sealed with (`config.encryption`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Cipher {
    /// C2SP XAES-256-GCM: AES-256-GCM under a per-object key derived from the nonce's first 12
    /// bytes. Fastest wherever the CPU has AES instructions (x86-64 AES-NI, ARMv8 AES).
    #[default]
    Xaes256Gcm,
    /// XChaCha20-Poly1305: for CPUs without AES instructions, and format version 1.
    XChaCha20Poly1305,
}

impl Cipher {
    /// The name in `config.encryption`.
    pub fn name(self) -> &'static str {
        match self {
            Cipher::Xaes256Gcm => "xaes-256-gcm",
            Cipher::XChaCha20Poly1305 => "xchacha20poly1305",
        }
    }

    /// The cipher named `name`, if this build knows it.
    pub fn from_name(name: &str) -> Option<Cipher> {
        [Cipher::Xaes256Gcm, Cipher::XChaCha20Poly1305]
            .into_iter()
            .find(|c| c.name() == name)
    }
}

/// A chunk or object id: 32 bytes, shown as 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Id(pub [u8; 32]);

impl Id {
    /// The all-zero id (used by chunk tables for "reads as zeros").
    pub const ZERO: Id = Id([0u8; 32]);

    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(hex_digit(b >> 4));
            s.push(hex_digit(b & 15));
        }
        s
    }

    /// Parse exactly 64 hex digits (either case).
    pub fn from_hex(s: &str) -> Result<Id> {
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return Err(Error::InvalidArgument(format!(
                "{s:?} is not an id (expected 64 hex digits, got {})",
                bytes.len()
            )));
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            match (hex_value(pair[0]), hex_value(pair[1])) {
                (Some(h), Some(l)) => out[i] = (h << 4) | l,
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "{s:?} is not an id (not hexadecimal)"
                    )))
                }
            }
        }
        Ok(Id(out))
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0u8; 32]
    }
}

fn hex_digit(v: u8) -> char {
    char::from(b"0123456789abcdef"[usize::from(v & 15)])
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Lower-case hex of any bytes (salts, sealed keys).
pub fn to_hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(hex_digit(b >> 4));
        s.push(hex_digit(b & 15));
    }
    s
}

/// Parse hex of any even length; `None` if malformed.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    b.chunks_exact(2)
        .map(|p| Some((hex_value(p[0])? << 4) | hex_value(p[1])?))
        .collect()
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

impl std::str::FromStr for Id {
    type Err = Error;
    fn from_str(s: &str) -> Result<Id> {
        Id::from_hex(s)
    }
}

impl Serialize for Id {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Id, D::Error> {
        // A visitor instead of `String::deserialize`: index files hold millions of ids, and
        // borrowing the string avoids one allocation per id.
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Id;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an id of 64 hex digits")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Id, E> {
                Id::from_hex(v)
                    .map_err(|_| E::custom(format!("{v:?} is not an id of 64 hex digits")))
            }
        }
        d.deserialize_str(V)
    }
}

/// Unkeyed BLAKE3, for object names (verifiable without the key).
pub fn hash(data: &[u8]) -> Id {
    Id(*blake3::hash(data).as_bytes())
}

/// Fill `buf` from the operating system's random number generator.
pub fn random_bytes(buf: &mut [u8]) {
    // The OS generator failing is not something a caller can handle or retry sensibly, and
    // continuing with predictable keys or nonces would be far worse than stopping.
    getrandom::getrandom(buf).expect("the operating system's random number generator failed");
}

/// Authentication failed: the sealed bytes were damaged, truncated, or sealed with another key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("authentication failed (the data is damaged or was sealed with another key)")]
pub struct CryptoError;

/// The repository's master key: encryption key and chunk-id key, with the cipher it seals with.
#[derive(Clone)]
pub struct MasterKey {
    enc: [u8; 32],
    id: [u8; 32],
    sealer: SealingKey,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl Drop for MasterKey {
    fn drop(&mut self) {
        self.enc.zeroize();
        self.id.zeroize();
    }
}

impl MasterKey {
    /// A fresh random key sealing with `cipher`.
    pub fn generate(cipher: Cipher) -> MasterKey {
        let mut b = Zeroizing::new([0u8; 64]);
        random_bytes(b.as_mut());
        MasterKey::from_bytes(b.as_ref(), cipher).expect("64 bytes")
    }

    /// The cipher [`MasterKey::seal`] uses.
    pub fn cipher(&self) -> Cipher {
        self.sealer.cipher()
    }

    /// Keyed BLAKE3 of a chunk's plaintext.
    pub fn chunk_id(&self, data: &[u8]) -> Id {
        Id(*blake3::keyed_hash(&self.id, data).as_bytes())
    }

    /// Encrypt and authenticate: `nonce(24) || ciphertext || tag(16)`.
    pub fn seal(&self, plaintext: &[u8]) -> Vec<u8> {
        self.sealer.seal(plaintext)
    }

    /// Like [`MasterKey::seal`], appending the sealed object to `out`: a pack writer seals
    /// straight into the pack buffer, so the ciphertext is written once instead of being built
    /// in a buffer of its own and then copied into the pack.
    pub fn seal_append(&self, out: &mut Vec<u8>, plaintext: &[u8]) {
        self.sealer.seal_append(out, plaintext)
    }

    /// Check and decrypt what [`MasterKey::seal`] produced.
    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.sealer.open(sealed)
    }

    fn to_bytes(&self) -> Zeroizing<[u8; 64]> {
        let mut b = Zeroizing::new([0u8; 64]);
        b[..32].copy_from_slice(&self.enc);
        b[32..].copy_from_slice(&self.id);
        b
    }

    fn from_bytes(b: &[u8], cipher: Cipher) -> Option<MasterKey> {
        if b.len() != 64 {
            return None;
        }
        let mut enc = [0u8; 32];
        let mut id = [0u8; 32];
        enc.copy_from_slice(&b[..32]);
        id.copy_from_slice(&b[32..]);
        let sealer = SealingKey::new(cipher, &enc);
        Some(MasterKey { enc, id, sealer })
    }
}

/// An encryption key prepared for one cipher: for XAES-256-GCM the AES-256 key schedule and
/// the derivation constant K1, computed once instead of per object.
#[derive(Clone)]
enum SealingKey {
    XChaCha20Poly1305(Zeroizing<[u8; 32]>),
    Xaes256Gcm {
        aes: Box<aes::Aes256>,
        k1: Zeroizing<[u8; 16]>,
    },
}

impl SealingKey {
    fn new(cipher: Cipher, key: &[u8; 32]) -> SealingKey {
        match cipher {
            Cipher::XChaCha20Poly1305 => SealingKey::XChaCha20Poly1305(Zeroizing::new(*key)),
            Cipher::Xaes256Gcm => {
                let aes = Box::new(aes::Aes256::new(key.into()));
                // K1 = L·x in GF(2^128) with L = AES-256(key, 0^128), as CMAC's first subkey.
                let mut l = Zeroizing::new([0u8; 16]);
                aes.encrypt_block(l.as_mut().into());
                let mut k1 = Zeroizing::new([0u8; 16]);
                for i in 0..16 {
                    k1[i] = l[i] << 1 | l.get(i + 1).map_or(0, |next| next >> 7);
                }
                if l[0] & 0x80 != 0 {
                    k1[15] ^= 0x87;
                }
                SealingKey::Xaes256Gcm { aes, k1 }
            }
        }
    }

    fn cipher(&self) -> Cipher {
        match self {
            SealingKey::XChaCha20Poly1305(_) => Cipher::XChaCha20Poly1305,
            SealingKey::Xaes256Gcm { .. } => Cipher::Xaes256Gcm,
        }
    }

    /// The per-object AEAD key and its 96-bit nonce for the object's 192-bit nonce.
    fn object_key(&self, nonce: &[u8; NONCE_LEN]) -> (LessSafeKey, Nonce) {
        let mut subkey = Zeroizing::new([0u8; 32]);
        let mut short = [0u8; 12];
        let algorithm = match self {
            SealingKey::XChaCha20Poly1305(key) => {
                // draft-irtf-cfrg-xchacha: subkey = HChaCha20(key, nonce[..16]), nonce 0^4 ‖ nonce[16..].
                let mut derived = chacha20::hchacha::<chacha20::cipher::consts::U10>(
                    key.as_ref().into(),
                    nonce[..16].into(),
                );
                subkey.copy_from_slice(&derived);
                derived.as_mut_slice().zeroize();
                short[4..].copy_from_slice(&nonce[16..]);
                &CHACHA20_POLY1305
            }
            SealingKey::Xaes256Gcm { aes, k1 } => {
                // C2SP XAES-256-GCM: subkey = AES(K, M1 ^ K1) ‖ AES(K, M2 ^ K1) with
                // Mi = 0x00 ‖ i ‖ "X" ‖ 0x00 ‖ nonce[..12]; nonce[12..] is the GCM nonce.
                for (half, counter) in subkey.chunks_exact_mut(16).zip([1u8, 2]) {
                    half[1] = counter;
                    half[2] = b'X';
                    half[4..].copy_from_slice(&nonce[..12]);
                    for (b, k) in half.iter_mut().zip(k1.iter()) {
                        *b ^= k;
                    }
                    aes.encrypt_block(half.into());
                }
                short.copy_from_slice(&nonce[12..]);
                &AES_256_GCM
            }
        };
        let key = UnboundKey::new(algorithm, subkey.as_ref()).expect("32-byte AEAD key");
        (LessSafeKey::new(key), Nonce::assume_unique_for_key(short))
    }

    fn seal(&self, plaintext: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(SEAL_OVERHEAD + plaintext.len());
        self.seal_append(&mut out, plaintext);
        out
    }

    fn seal_append(&self, out: &mut Vec<u8>, plaintext: &[u8]) {
        let start = out.len();
        out.reserve(SEAL_OVERHEAD + plaintext.len());
        out.resize(start + NONCE_LEN, 0);
        random_bytes(&mut out[start..]);
        out.extend_from_slice(plaintext);
        // In place: chunks are a MiB each, and a second buffer per chunk would cost a copy.
        let (nonce, body) = out[start..].split_at_mut(NONCE_LEN);
        let (key, nonce) = self.object_key((&*nonce).try_into().expect("nonce length"));
        // Sealing only fails for plaintexts beyond 64 GiB (GCM) or 256 GiB (ChaCha20), which no
        // caller produces: objects are at most a pack's trailer or a chunk.
        let tag = key
            .seal_in_place_separate_tag(nonce, Aad::empty(), body)
            .expect("AEAD plaintext too long");
        out.extend_from_slice(tag.as_ref());
    }

    fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(CryptoError);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let (key, nonce) = self.object_key(nonce.try_into().expect("nonce length"));
        let mut buf = body.to_vec();
        let len = key
            .open_in_place(nonce, Aad::empty(), &mut buf)
            .map_err(|_| CryptoError)?
            .len();
        buf.truncate(len);
        debug_assert_eq!(len + TAG_LEN, body.len());
        Ok(buf)
    }
}

/// argon2id cost parameters of a key slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KdfParams {
    pub m_cost_kib: u32,
    pub t_cost: u32,
    pub p_cost: u32,
}

/// Largest parameters a key slot may ask for: a slot is untrusted input, and a damaged or
/// hostile one must not make `open` allocate gigabytes or spin for hours.
const MAX_M_COST_KIB: u32 = 4 * 1024 * 1024;
const MAX_T_COST: u32 = 64;
const MAX_P_COST: u32 = 64;

impl Default for KdfParams {
    /// 64 MiB, 3 passes, 1 lane: OWASP's recommended argon2id range, about 0.2-0.5 s.
    fn default() -> Self {
        KdfParams {
            m_cost_kib: 64 * 1024,
            t_cost: 3,
            p_cost: 1,
        }
    }
}

impl KdfParams {
    /// Deliberately weak parameters (1 MiB, 1 pass), for tests only.
    pub const FAST_FOR_TESTS: KdfParams = KdfParams {
        m_cost_kib: 1024,
        t_cost: 1,
        p_cost: 1,
    };

    /// The defaults, or [`KdfParams::FAST_FOR_TESTS`] when `HYPERKEEP_TEST_FAST_KDF=1` is set.
    /// The variable exists only so test suites do not spend seconds in argon2; never set it for
    /// a real repository, since it makes passwords far cheaper to guess.
    pub fn from_env() -> KdfParams {
        if std::env::var("HYPERKEEP_TEST_FAST_KDF").as_deref() == Ok("1") {
            KdfParams::FAST_FOR_TESTS
        } else {
            KdfParams::default()
        }
    }

    fn derive(&self, password: &str, salt: &[u8]) -> Result<Zeroizing<[u8; 32]>> {
        let params = argon2::Params::new(self.m_cost_kib, self.t_cost, self.p_cost, Some(32))
            .map_err(|e| Error::InvalidArgument(format!("invalid argon2id parameters: {e}")))?;
        let argon =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut out = Zeroizing::new([0u8; 32]);
        argon
            .hash_password_into(password.as_bytes(), salt, out.as_mut())
            .map_err(|e| Error::InvalidArgument(format!("argon2id failed: {e}")))?;
        Ok(out)
    }
}

/// A key slot (`keys/<id>`): the master key wrapped with a password.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySlot {
    /// 16 hex digits; also the object name.
    pub id: String,
    /// RFC 3339, UTC.
    pub created: String,
    pub hostname: String,
    pub username: String,
    /// Always `argon2id`.
    pub kdf: String,
    pub m_cost_kib: u32,
    pub t_cost: u32,
    pub p_cost: u32,
    /// Hex, 16 random bytes.
    pub salt: String,
    /// Hex: the 64-byte master key sealed with the argon2id-derived key.
    pub sealed_master: String,
}

impl std::fmt::Debug for KeySlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The wrapped key is safe to show in principle, but nothing key-shaped goes to logs.
        f.debug_struct("KeySlot")
            .field("id", &self.id)
            .field("created", &self.created)
            .field("hostname", &self.hostname)
            .field("username", &self.username)
            .field("kdf", &self.kdf)
            .finish_non_exhaustive()
    }
}

impl KeySlot {
    /// Wrap `master` with `password`.
    pub fn create(master: &MasterKey, password: &str, params: KdfParams) -> Result<KeySlot> {
        let mut salt = [0u8; 16];
        random_bytes(&mut salt);
        let mut id = [0u8; 8];
        random_bytes(&mut id);
        let wrapping = params.derive(password, &salt)?;
        let sealed =
            SealingKey::new(Cipher::XChaCha20Poly1305, &wrapping).seal(master.to_bytes().as_ref());
        Ok(KeySlot {
            id: to_hex(&id),
            created: crate::repository::now_rfc3339(),
            hostname: crate::repository::local_hostname(),
            username: local_username(),
            kdf: "argon2id".into(),
            m_cost_kib: params.m_cost_kib,
            t_cost: params.t_cost,
            p_cost: params.p_cost,
            salt: to_hex(&salt),
            sealed_master: to_hex(&sealed),
        })
    }

    /// Unwrap the master key, to seal with the repository's `cipher`. `Error::WrongPassword` if
    /// the password does not open this slot, `Error::Corrupt` if the slot itself is malformed.
    pub fn unlock(&self, password: &str, cipher: Cipher) -> Result<MasterKey> {
        let object = format!("keys/{}", self.id);
        if self.kdf != "argon2id" {
            return Err(Error::corrupt(
                object,
                format!("unknown key derivation {:?}", self.kdf),
            ));
        }
        if self.m_cost_kib > MAX_M_COST_KIB || self.t_cost > MAX_T_COST || self.p_cost > MAX_P_COST
        {
            return Err(Error::corrupt(
                object,
                format!(
                    "argon2id parameters out of range (m={} KiB, t={}, p={})",
                    self.m_cost_kib, self.t_cost, self.p_cost
                ),
            ));
        }
        let salt = from_hex(&self.salt)
            .filter(|s| (8..=64).contains(&s.len()))
            .ok_or_else(|| Error::corrupt(&object, "malformed salt"))?;
        let sealed = from_hex(&self.sealed_master)
            .filter(|s| s.len() == 64 + SEAL_OVERHEAD)
            .ok_or_else(|| Error::corrupt(&object, "malformed wrapped key"))?;
        let params = KdfParams {
            m_cost_kib: self.m_cost_kib,
            t_cost: self.t_cost,
            p_cost: self.p_cost,
        };
        let wrapping = params
            .derive(password, &salt)
            .map_err(|e| Error::corrupt(&object, e.to_string()))?;
        let plain = Zeroizing::new(
            SealingKey::new(Cipher::XChaCha20Poly1305, &wrapping)
                .open(&sealed)
                .map_err(|_| Error::WrongPassword)?,
        );
        MasterKey::from_bytes(&plain, cipher)
            .ok_or_else(|| Error::corrupt(&object, "wrapped key has the wrong length"))
    }
}

fn local_username() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("USERNAME"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_hex_round_trip_and_serde() {
        let id = hash(b"hello");
        assert_eq!(Id::from_hex(&id.to_hex()).unwrap(), id);
        assert_eq!(Id::from_hex(&id.to_hex().to_uppercase()).unwrap(), id);
        assert!(Id::from_hex("abc").is_err());
        assert!(Id::from_hex(&"g".repeat(64)).is_err());
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{}\"", id.to_hex()));
        let back: Id = serde_json::from_str(&json).unwrap();
        assert_eq!(back, id);
        assert!(serde_json::from_str::<Id>("\"00\"").is_err());
        // BLAKE3 test vector for the empty input.
        assert_eq!(
            hash(b"").to_hex(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }

    #[test]
    fn seal_open_round_trip_and_tamper() {
        for cipher in [Cipher::Xaes256Gcm, Cipher::XChaCha20Poly1305] {
            seal_open_round_trip_and_tamper_with(cipher);
        }
    }

    fn seal_open_round_trip_and_tamper_with(cipher: Cipher) {
        let k = MasterKey::generate(cipher);
        for len in [0usize, 1, 100, 70_000] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let sealed = k.seal(&data);
            assert_eq!(sealed.len(), len + SEAL_OVERHEAD);
            assert_eq!(k.open(&sealed).unwrap(), data);
            // Every single-bit flip anywhere is detected.
            for pos in [0, 23, 24, sealed.len() / 2, sealed.len() - 1] {
                let mut bad = sealed.clone();
                bad[pos] ^= 0x10;
                assert_eq!(k.open(&bad), Err(CryptoError));
            }
            assert_eq!(k.open(&sealed[..sealed.len() - 1]), Err(CryptoError));
        }
        // Same plaintext twice: different nonces, different ciphertexts.
        assert_ne!(k.seal(b"x"), k.seal(b"x"));
        // Another key cannot open it.
        assert_eq!(
            MasterKey::generate(cipher).open(&k.seal(b"x")),
            Err(CryptoError)
        );
        assert_eq!(k.open(&[1, 2, 3]), Err(CryptoError));
    }

    /// Seal with a chosen nonce and additional data (objects use a random nonce and none).
    fn seal_with_nonce(
        key: &SealingKey,
        nonce: &[u8; 24],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Vec<u8> {
        let (k, n) = key.object_key(nonce);
        let mut body = plaintext.to_vec();
        let tag = k
            .seal_in_place_separate_tag(n, Aad::from(aad), &mut body)
            .unwrap();
        body.extend_from_slice(tag.as_ref());
        body
    }

    #[test]
    fn xaes_256_gcm_matches_the_c2sp_vectors() {
        // https://c2sp.org/XAES-256-GCM: ciphertext ‖ tag of "XAES-256-GCM".
        let nonce = b"ABCDEFGHIJKLMNOPQRSTUVWX";
        let key = SealingKey::new(Cipher::Xaes256Gcm, &[1; 32]);
        assert_eq!(
            to_hex(&seal_with_nonce(&key, nonce, b"", b"XAES-256-GCM")),
            "ce546ef63c9cc60765923609b33a9a1974e96e52daf2fcf7075e2271"
        );
        let key = SealingKey::new(Cipher::Xaes256Gcm, &[3; 32]);
        assert_eq!(
            to_hex(&seal_with_nonce(
                &key,
                nonce,
                b"c2sp.org/XAES-256-GCM",
                b"XAES-256-GCM"
            )),
            "986ec1832593df5443a179437fd083bf3fdb41abd740a21f71eb769d"
        );
    }

    #[test]
    fn both_ciphers_match_independent_implementations() {
        use chacha20poly1305::aead::{Aead as _, KeyInit as _};
        use xaes_256_gcm::aead::{Aead as _, KeyInit as _};
        for len in [0usize, 1, 15, 16, 17, 4095, 65_537, 1 << 20] {
            let mut key = [0u8; 32];
            random_bytes(&mut key);
            let plain: Vec<u8> = (0..len).map(|i| (i * 31 + len) as u8).collect();

            let ours = SealingKey::new(Cipher::Xaes256Gcm, &key);
            let sealed = ours.seal(&plain);
            let nonce: [u8; NONCE_LEN] = sealed[..NONCE_LEN].try_into().unwrap();
            let theirs = xaes_256_gcm::Xaes256Gcm::new(&key.into());
            let expected = theirs.encrypt(&nonce.into(), plain.as_slice()).unwrap();
            assert_eq!(
                &sealed[NONCE_LEN..],
                expected.as_slice(),
                "xaes, {len} bytes"
            );
            assert_eq!(ours.open(&sealed).unwrap(), plain);

            let ours = SealingKey::new(Cipher::XChaCha20Poly1305, &key);
            let sealed = ours.seal(&plain);
            let theirs = chacha20poly1305::XChaCha20Poly1305::new(&key.into());
            let expected = theirs
                .encrypt(sealed[..NONCE_LEN].into(), plain.as_slice())
                .unwrap();
            assert_eq!(
                &sealed[NONCE_LEN..],
                expected.as_slice(),
                "xchacha, {len} bytes"
            );
            assert_eq!(ours.open(&sealed).unwrap(), plain);
        }
    }

    #[test]
    fn a_key_opens_only_its_own_cipher() {
        let mut b = [0u8; 64];
        random_bytes(&mut b);
        let xaes = MasterKey::from_bytes(&b, Cipher::Xaes256Gcm).unwrap();
        let xchacha = MasterKey::from_bytes(&b, Cipher::XChaCha20Poly1305).unwrap();
        assert_eq!(xaes.cipher(), Cipher::Xaes256Gcm);
        assert_eq!(xchacha.open(&xaes.seal(b"data")), Err(CryptoError));
        assert_eq!(xaes.open(&xchacha.seal(b"data")), Err(CryptoError));
        assert_eq!(xaes.chunk_id(b"data"), xchacha.chunk_id(b"data"));
        for c in [Cipher::Xaes256Gcm, Cipher::XChaCha20Poly1305] {
            assert_eq!(Cipher::from_name(c.name()), Some(c));
        }
        assert_eq!(Cipher::from_name("aes-256-gcm"), None);
    }

    #[test]
    fn chunk_ids_are_keyed() {
        let a = MasterKey::generate(Cipher::default());
        let b = MasterKey::generate(Cipher::default());
        assert_eq!(a.chunk_id(b"data"), a.chunk_id(b"data"));
        assert_ne!(a.chunk_id(b"data"), b.chunk_id(b"data"));
        assert_ne!(a.chunk_id(b"data"), hash(b"data"));
    }

    #[test]
    fn debug_never_shows_keys() {
        let k = MasterKey::generate(Cipher::default());
        assert_eq!(format!("{k:?}"), "MasterKey(..)");
        let slot = KeySlot::create(&k, "pw", KdfParams::FAST_FOR_TESTS).unwrap();
        let dbg = format!("{slot:?}");
        assert!(!dbg.contains(&slot.sealed_master));
        assert!(!dbg.contains(&slot.salt));
    }

    #[test]
    fn key_slot_unlocks_with_right_password_only() {
        let k = MasterKey::generate(Cipher::default());
        let slot = KeySlot::create(&k, "correct horse", KdfParams::FAST_FOR_TESTS).unwrap();
        assert_eq!(slot.id.len(), 16);
        let json = serde_json::to_string(&slot).unwrap();
        let slot: KeySlot = serde_json::from_str(&json).unwrap();
        let k2 = slot.unlock("correct horse", Cipher::default()).unwrap();
        assert_eq!(k2.chunk_id(b"x"), k.chunk_id(b"x"));
        let sealed = k.seal(b"secret");
        assert_eq!(k2.open(&sealed).unwrap(), b"secret");
        assert!(matches!(
            slot.unlock("wrong", Cipher::default()),
            Err(Error::WrongPassword)
        ));

        let mut hostile = slot.clone();
        hostile.m_cost_kib = u32::MAX;
        assert!(matches!(
            hostile.unlock("correct horse", Cipher::default()),
            Err(Error::Corrupt { .. })
        ));
        let mut bad = slot.clone();
        bad.salt = "zz".into();
        assert!(matches!(
            bad.unlock("correct horse", Cipher::default()),
            Err(Error::Corrupt { .. })
        ));
        let mut bad = slot.clone();
        bad.kdf = "scrypt".into();
        assert!(matches!(
            bad.unlock("correct horse", Cipher::default()),
            Err(Error::Corrupt { .. })
        ));
        let mut bad = slot;
        let mut raw = from_hex(&bad.sealed_master).unwrap();
        raw[30] ^= 1;
        bad.sealed_master = to_hex(&raw);
        assert!(matches!(
            bad.unlock("correct horse", Cipher::default()),
            Err(Error::WrongPassword)
        ));
    }
}
