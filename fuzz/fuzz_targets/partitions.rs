//! The fuzz input (see the crate docs for the encoding) as a whole disk: read its partition
//! table (MBR, GPT, or none) and open and walk the filesystem of each partition.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let disk = Arc::new(hyperkeep_fuzz::guest::SparseDisk::decode(data));
    let _ = hyperkeep_fuzz::guest::exercise_partitions(
        disk,
        &mut hyperkeep_fuzz::guest::FsBudget::default(),
    );
});
