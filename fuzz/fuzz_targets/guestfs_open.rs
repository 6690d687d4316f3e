//! The fuzz input (see the crate docs for the encoding) as a bare volume without a partition
//! table: probe and open its filesystem (NTFS, exFAT, FAT, ext) and walk it with bounded work.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let disk = Arc::new(hyperkeep_fuzz::guest::SparseDisk::decode(data));
    let volume = guestfs::volume::Volume::whole(disk);
    let _ = hyperkeep_fuzz::guest::exercise_volume(
        volume,
        &mut hyperkeep_fuzz::guest::FsBudget::default(),
    );
});
