//! Turn disk images into fuzz inputs and back.
//!
//! ```text
//! encode_corpus encode IMAGE OUT   # a real image (<= 64 MiB) -> compact fuzz input
//! encode_corpus decode INPUT OUT   # a fuzz input (e.g. a crash artifact) -> the file it describes
//! ```
//!
//! `decode` is how a crash is inspected with other tools (`qemu-img info`, a hex dump).

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (mode, src, dst) = match args.as_slice() {
        [_, m, s, d] if m == "encode" || m == "decode" => (m.as_str(), s, d),
        _ => {
            eprintln!("usage: encode_corpus encode IMAGE OUT | encode_corpus decode INPUT OUT");
            return ExitCode::from(2);
        }
    };
    let bytes = match std::fs::read(src) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("cannot read {src}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let out = if mode == "encode" {
        match hyperkeep_fuzz::encode(&bytes) {
            Some(v) => v,
            None => {
                eprintln!(
                    "{src} is {} bytes; fuzz inputs describe files of at most {} bytes: make a smaller image",
                    bytes.len(),
                    hyperkeep_fuzz::MAX_FILE_SIZE
                );
                return ExitCode::FAILURE;
            }
        }
    } else {
        hyperkeep_fuzz::SparseFile::decode(&bytes).to_vec()
    };
    if let Err(e) = std::fs::write(dst, &out) {
        eprintln!("cannot write {dst}: {e}");
        return ExitCode::FAILURE;
    }
    eprintln!("{src} ({} bytes) -> {dst} ({} bytes)", bytes.len(), out.len());
    ExitCode::SUCCESS
}
