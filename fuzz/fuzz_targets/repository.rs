//! Damage a real repository as the input says, then open, check and read it
//! (`hyperkeep_fuzz::repository`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| hyperkeep_fuzz::repository::run(data));
