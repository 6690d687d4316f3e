//! Open a VHD described by the fuzz input (see the crate docs for the encoding) and walk it.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let file: Arc<dyn vdisk_core::ReadAt> = Arc::new(hyperkeep_fuzz::SparseFile::decode(data));
    if let Ok(disk) = vdisk_vhd::Vhd::open_backing(file) {
        hyperkeep_fuzz::exercise(&disk, &hyperkeep_fuzz::Limits::default());
    }
});
