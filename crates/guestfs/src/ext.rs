//! ext2/3/4 (in progress).
use crate::volume::Volume;
use crate::{Error, Result};
pub fn probe(sb: &[u8]) -> bool { sb.len() >= 58 && sb[56] == 0x53 && sb[57] == 0xEF }
pub fn open(_vol: Volume) -> Result<crate::fat::FatFs> { Err(Error::unsupported("ext", "not yet")) }
