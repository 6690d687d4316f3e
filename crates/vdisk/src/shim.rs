//! TEMPORARY stand-ins for the format crates while they are being written: same API, every call
//! says the format is not built yet. Removed as soon as each crate compiles.
#![allow(dead_code)]

macro_rules! shim {
    ($modname:ident, $ty:ident, $opts:ident, $fmt:literal) => {
        pub mod $modname {
            use std::path::Path;
            use std::sync::Arc;
            use vdisk_core::*;

            pub enum $ty {}

            pub use super::$opts as CreateOptions;

            fn not_yet<T>() -> Result<T> {
                Err(Error::unsupported($fmt, "support for this format is not built yet"))
            }

            impl $ty {
                pub fn open(_: &Path, _: &OpenOptions) -> Result<$ty> {
                    not_yet()
                }
                pub fn open_backing(_: Arc<dyn ReadAt>) -> Result<$ty> {
                    not_yet()
                }
                pub fn create(_: &Path, _: &CreateOptions) -> Result<$ty> {
                    not_yet()
                }
                pub fn create_child(_: &Path, _: &Path) -> Result<$ty> {
                    not_yet()
                }
            }

            pub fn check(_: &Path) -> Result<Vec<String>> {
                not_yet()
            }

            impl VirtualDisk for $ty {
                fn geometry(&self) -> Geometry {
                    match *self {}
                }
                fn read_at(&self, _: &mut [u8], _: u64) -> Result<()> {
                    match *self {}
                }
                fn map(&self, _: u64, _: u64, _: MapScope) -> Result<Vec<Extent>> {
                    match *self {}
                }
                fn info(&self) -> DiskInfo {
                    match *self {}
                }
            }
            impl VirtualDiskMut for $ty {
                fn write_at(&mut self, _: &[u8], _: u64) -> Result<()> {
                    match *self {}
                }
                fn flush(&mut self) -> Result<()> {
                    match *self {}
                }
            }
        }
    };
}

pub struct VhdxCreateOptions {
    pub virtual_size: u64,
    pub block_size: Option<u32>,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    pub fixed: bool,
}

shim!(vdisk_vhdx, Vhdx, VhdxCreateOptions, "vhdx");
