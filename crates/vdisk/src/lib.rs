//! Virtual disks of every format behind one interface. (Under construction.)
pub use vdisk_core::*;
