//! Sealing throughput on one core (used by `bench/seal.sh`): how fast each repository cipher
//! seals and opens 1 MiB objects (a chunk's size), against RustCrypto's complete AEADs of the
//! same constructions (the `chacha20poly1305` crate was hyperkeep's sealing before it moved the
//! bulk AEAD to `ring`). The crypto unit tests check that their outputs and ours are identical.
//!
//! Usage: cargo run --release -p repo --example bench_seal -- [MIB]
//! Prints a markdown table: implementation, seal MiB/s, open MiB/s.

use std::time::Instant;

use repo::crypto::{Cipher, MasterKey};

const OBJECT: usize = 1 << 20;

/// MiB/s of `f` run over `mib` objects of 1 MiB.
fn rate(mib: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm up: key schedules, page faults of the buffers
    let start = Instant::now();
    for _ in 0..mib {
        f();
    }
    mib as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1024);
    let mut plain = vec![0u8; OBJECT];
    repo::crypto::random_bytes(&mut plain);

    println!("| implementation | seal, MiB/s | open, MiB/s |");
    println!("|---|---:|---:|");
    for cipher in [Cipher::Xaes256Gcm, Cipher::XChaCha20Poly1305] {
        let key = MasterKey::generate(cipher);
        let mut out = Vec::with_capacity(OBJECT + 64);
        let seal = rate(mib, || {
            out.clear();
            key.seal_append(&mut out, &plain);
        });
        let sealed = key.seal(&plain);
        let open = rate(mib, || {
            std::hint::black_box(key.open(&sealed).expect("opens"));
        });
        println!(
            "| hyperkeep {} (ring) | {seal:.0} | {open:.0} |",
            cipher.name()
        );
    }

    // The same constructions, complete, from RustCrypto.
    let mut k = [0u8; 32];
    repo::crypto::random_bytes(&mut k);
    let nonce = [7u8; 24];
    {
        use chacha20poly1305::aead::{AeadInPlace, KeyInit};
        let aead = chacha20poly1305::XChaCha20Poly1305::new(&k.into());
        let mut buf = plain.clone();
        let seal = rate(mib, || {
            let tag = aead
                .encrypt_in_place_detached(&nonce.into(), b"", &mut buf)
                .expect("seals");
            std::hint::black_box(tag);
        });
        println!("| RustCrypto chacha20poly1305 XChaCha20Poly1305 | {seal:.0} | - |");
    }
    {
        use xaes_256_gcm::aead::{AeadInOut, KeyInit};
        let aead = xaes_256_gcm::Xaes256Gcm::new(&k.into());
        let mut buf = plain.clone();
        let seal = rate(mib, || {
            let tag = aead
                .encrypt_inout_detached(&nonce.into(), b"", buf.as_mut_slice().into())
                .expect("seals");
            std::hint::black_box(tag);
        });
        println!("| RustCrypto xaes-256-gcm | {seal:.0} | - |");
    }
}
