//! exFAT (in progress).
use crate::volume::Volume;
use crate::{Error, Result};
pub fn probe(boot: &[u8]) -> bool { boot.len() >= 11 && &boot[3..11] == b"EXFAT   " }
pub fn open(_vol: Volume) -> Result<crate::fat::FatFs> { Err(Error::unsupported("exFAT", "not yet")) }
