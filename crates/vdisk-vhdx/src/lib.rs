//! VHDX (MS-VHDX) reader and writer: dynamic, fixed and differencing disks, chains of any depth,
//! log replay.
//!
//! We implement the format ourselves: no crate reads differencing chains, replays the log and
//! validates hostile files strictly enough (see `format.rs`).
//!
//! Map of the crate:
//! - `format`: every on-disk structure, parse (validating) and serialize; BAT arithmetic.
//! - `reader`: one VHDX file (`VhdxFile`): open, validate, read payload, per-layer map.
//! - `chain`: [`Vhdx`], a file with its parent chain; parent resolution; [`VirtualDisk`] impl.
//! - `check`: [`check`], a read-only structural check listing every problem.
//! - `log`: the metadata log: replay (in memory or on disk) and the log writer.
//! - `create`: [`Vhdx::create`] and differencing children.
//! - `write`: writable opens and [`vdisk_core::VirtualDiskMut`] for [`Vhdx`].
//! - `relink`: changing a child's parent locator (`Vhdx::reparent`, `Vhdx::set_parent_linkage2`)
//!   and choosing the DataWriteGuid a write gives a layer, so a chain's oldest layer can be merged
//!   away while every other layer stays readable.
//!
//! [`VirtualDisk`]: vdisk_core::VirtualDisk

mod chain;
mod check;
mod create;
mod format;
mod log;
mod reader;
mod relink;
mod write;

pub use chain::Vhdx;
pub use check::check;
pub use create::CreateOptions;
pub use format::is_vhdx;
