//! Merging a differencing child into its parent.
//!
//! Only what the child itself holds is copied (its `MapScope::Layer` map): `Data` ranges are
//! read through the chain (where the child holds data, the chain shows exactly the child's
//! bytes) and written into the parent; `Zero` ranges, which hide the parent's data, become
//! zeroes in the parent; `Inherited` ranges already show the parent. Afterwards the parent
//! shows what the chain showed, and the child is deleted: writing the parent changed its
//! identity (VHDX DataWriteGuid, VHD timestamps), so the child could no longer be opened.

use std::path::Path;

use crate::{
    detect, io::is_zero, DiskFormat, Error, ExtentState, MapScope, MergeOptions, MergeReport,
    OpenOptions, Result, VirtualDisk, VirtualDiskMut,
};

const WINDOW: u64 = 1 << 30;
const PIECE: u64 = 4 << 20;

pub(crate) fn merge(child: &Path, opts: &OpenOptions) -> Result<MergeReport> {
    merge_with(child, opts, &MergeOptions::default())
}

pub(crate) fn merge_with(
    child: &Path,
    opts: &OpenOptions,
    mopts: &MergeOptions,
) -> Result<MergeReport> {
    let ro = OpenOptions {
        writable: false,
        ..opts.clone()
    };
    let chain = detect::open(child, &ro)?;
    let info = chain.info();
    let Some(parent_info) = info.parent else {
        return Err(Error::InvalidArgument(format!(
            "{} is not a differencing disk (it has no parent), so there is nothing to merge",
            child.display()
        )));
    };
    let Some(parent_path) = parent_info.path.clone() else {
        return Err(Error::Parent(format!(
            "the parent of {} has no file path, so it cannot be opened for writing",
            child.display()
        )));
    };
    // The parent keeps its own parent as its locator says; only the top layer was overridden.
    let parent_opts = OpenOptions {
        writable: true,
        parent_override: None,
        max_chain_depth: opts.max_chain_depth,
    };
    let mut parent: Box<dyn VirtualDiskMut> = match mopts.parent_identity {
        Some(g) if detect::detect(&parent_path)? == DiskFormat::Vhdx => {
            let mut p = vdisk_vhdx::Vhdx::open(&parent_path, &parent_opts)?;
            p.set_next_data_write_guid(g)?;
            Box::new(p)
        }
        _ => detect::open_mut(&parent_path, &parent_opts)?,
    };
    let (cg, pg) = (chain.geometry(), parent.geometry());
    if cg.virtual_size != pg.virtual_size || cg.logical_sector_size != pg.logical_sector_size {
        return Err(Error::Parent(format!(
            "{} ({} bytes, {}-byte sectors) does not match its parent {} ({} bytes, {}-byte \
             sectors); refusing to merge",
            child.display(),
            cg.virtual_size,
            cg.logical_sector_size,
            parent_path.display(),
            pg.virtual_size,
            pg.logical_sector_size
        )));
    }

    let bytes_merged = copy_layer(&*chain, &mut *parent)?;
    parent.flush()?;
    drop(parent);
    drop(chain);
    if mopts.keep_child {
        return Ok(MergeReport {
            child: child.to_path_buf(),
            parent: parent_path,
            bytes_merged,
        });
    }
    std::fs::remove_file(child).map_err(|e| {
        Error::io(
            format!(
                "merged into {}, but cannot delete {} (it is no longer valid; delete it by hand)",
                parent_path.display(),
                child.display()
            ),
            e,
        )
    })?;
    Ok(MergeReport {
        child: child.to_path_buf(),
        parent: parent_path,
        bytes_merged,
    })
}

/// Write what the top layer of `chain` holds into `parent`. Returns the guest bytes written.
fn copy_layer(chain: &dyn VirtualDisk, parent: &mut dyn VirtualDiskMut) -> Result<u64> {
    let size = chain.geometry().virtual_size;
    let mut buf = vec![0u8; PIECE as usize];
    let mut merged = 0u64;
    let mut window = 0u64;
    while window < size {
        let len = WINDOW.min(size - window);
        for e in chain.map(window, len, MapScope::Layer)? {
            match e.state {
                ExtentState::Data => {
                    let mut pos = e.offset;
                    while pos < e.end() {
                        let n = ((pos / PIECE + 1) * PIECE).min(e.end()) - pos;
                        let b = &mut buf[..n as usize];
                        chain.read_at(b, pos)?;
                        if is_zero(b) {
                            // Lets block formats record whole zero blocks without storing them.
                            parent.write_zeroes(pos, n)?;
                        } else {
                            parent.write_at(b, pos)?;
                        }
                        pos += n;
                    }
                    merged += e.length;
                }
                ExtentState::Zero => {
                    parent.write_zeroes(e.offset, e.length)?;
                    merged += e.length;
                }
                // The parent already shows these ranges.
                ExtentState::Inherited | ExtentState::Unallocated => {}
            }
        }
        window += len;
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CreateOptions;
    use rand::{Rng, SeedableRng};

    fn view(p: &Path) -> Vec<u8> {
        let d = crate::open(p, &OpenOptions::default()).unwrap();
        let mut v = vec![0u8; d.geometry().virtual_size as usize];
        d.read_at(&mut v, 0).unwrap();
        v
    }

    fn scribble(p: &Path, seed: u64) {
        let mut d = crate::open_mut(p, &OpenOptions::default()).unwrap();
        let size = d.geometry().virtual_size;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for _ in 0..12 {
            // Sector-granular writes at odd sector offsets, some spanning blocks.
            let sectors = rng.gen_range(1..2000u64);
            let off = rng.gen_range(0..size / 512 - sectors) * 512;
            let b: Vec<u8> = (0..sectors * 512).map(|_| rng.gen()).collect();
            d.write_at(&b, off).unwrap();
        }
        let zoff = rng.gen_range(0..size / 512 - 5000) * 512;
        d.write_zeroes(zoff, 5000 * 512).unwrap();
        d.flush().unwrap();
    }

    /// base <- mid <- top: merging top into mid makes mid's chain show what top's chain showed,
    /// and base is untouched.
    fn three_level_merge(format: DiskFormat, ext: &str) {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join(format!("base.{ext}"));
        let mid = dir.path().join(format!("mid.{ext}"));
        let top = dir.path().join(format!("top.{ext}"));
        drop(crate::create(&base, &CreateOptions::new(format, 24 << 20)).unwrap());
        scribble(&base, 1);
        drop(crate::create_child(&base, &mid).unwrap());
        scribble(&mid, 2);
        drop(crate::create_child(&mid, &top).unwrap());
        scribble(&top, 3);
        let base_before = view(&base);
        let chain_before = view(&top);

        let r = merge(&top, &OpenOptions::default()).unwrap();
        assert!(r.bytes_merged > 0);
        assert!(!top.exists());
        assert_eq!(
            r.parent.canonicalize().unwrap(),
            mid.canonicalize().unwrap()
        );
        assert!(view(&mid) == chain_before, "{ext}: merged chain differs");
        assert!(view(&base) == base_before, "{ext}: the grandparent changed");
        let c = crate::check(&mid, &OpenOptions::default()).unwrap();
        assert!(c.problems.is_empty(), "{:?}", c.problems);

        let e = merge(&base, &OpenOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a differencing disk"), "{e}");
    }

    #[test]
    fn vhd_three_level_merge() {
        three_level_merge(DiskFormat::Vhd, "vhd");
    }

    #[test]
    fn vhdx_three_level_merge() {
        three_level_merge(DiskFormat::Vhdx, "vhdx");
    }
}
