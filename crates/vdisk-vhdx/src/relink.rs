//! Changing where a differencing VHDX finds its parent, and choosing the identity a write gives
//! a layer: what replication needs to merge the oldest layer of a chain away while every other
//! layer stays readable at every moment.
//!
//! A parent's identity is its DataWriteGuid; a child records it as `parent_linkage`, and MS-VHDX
//! lets it record a second accepted value, `parent_linkage2`, which the reader honours. Merging
//! child `c` into parent `p` while `c` (and what hangs below it) must stay readable therefore
//! goes: choose `p`'s next DataWriteGuid `g`; record `g` as `c`'s `parent_linkage2`; merge with
//! [`Vhdx::set_next_data_write_guid`]`(g)`, so `p`'s header changes to `g` before any data; then
//! [`Vhdx::reparent`] `c`'s own child onto `p`. `c` accepts `p` before, during and after.
//!
//! Locator changes are metadata: the changed pages of the metadata region go through the log
//! like every other metadata update of the writer (one log entry, so a crash leaves the old or
//! the new locator, never a mix), and they do not change the layer's DataWriteGuid: what the
//! layer shows is unchanged, so its own children stay linked.

use std::path::Path;

use vdisk_core::{Error, Guid, Result};

use crate::chain::{open_layer_ro, open_layer_rw};
use crate::create::parent_link;
use crate::format::*;
use crate::reader::read_exact;
use crate::Vhdx;

impl Vhdx {
    /// This layer's DataWriteGuid: the identity its children record as `parent_linkage`.
    pub fn data_write_guid(&self) -> Guid {
        self.top.header.data_write_guid
    }

    /// For a differencing layer: the `parent_linkage` and `parent_linkage2` it accepts.
    pub fn parent_linkage(&self) -> Result<Option<(Guid, Option<Guid>)>> {
        let Some(loc) = self.top.metadata.parent_locator.as_ref() else {
            return Ok(None);
        };
        let Some(l1) = loc.get_guid("parent_linkage")? else {
            return Ok(None);
        };
        Ok(Some((l1, loc.get_guid("parent_linkage2")?)))
    }

    /// Writable opens only: the first guest-visible change of this session gives the layer
    /// DataWriteGuid `g` instead of a random one (see the module documentation).
    pub fn set_next_data_write_guid(&mut self, g: Guid) -> Result<()> {
        match self.top.writer.as_mut() {
            Some(w) => {
                w.set_next_data_write_guid(g);
                Ok(())
            }
            None => Err(Error::ReadOnly(format!(
                "{} is open read-only; its DataWriteGuid can only be chosen for a write",
                self.top.display_name()
            ))),
        }
    }

    /// Make differencing disk `child` also accept a parent whose DataWriteGuid is `g`
    /// (`parent_linkage2`); everything else in its locator stays. The parent is not opened.
    pub fn set_parent_linkage2(child: &Path, g: Guid) -> Result<()> {
        rewrite_locator(child, |loc| {
            set_entry(loc, "parent_linkage2", format!("{g:?}"));
            Ok(())
        })
    }

    /// Point differencing disk `child` at `parent`: its relative and absolute paths, and
    /// `parent_linkage` = the parent's current DataWriteGuid (`parent_linkage2` is dropped).
    /// The child's own DataWriteGuid does not change, so its children stay linked. The parent
    /// must have the child's size and sector sizes; its content is the caller's business (this
    /// is for a parent that shows what the old parent showed, e.g. after a merge).
    pub fn reparent(child: &Path, parent: &Path) -> Result<()> {
        let p = open_layer_ro(parent)?;
        let c = open_layer_ro(child)?;
        let (pm, cm) = (&p.metadata, &c.metadata);
        if pm.virtual_size != cm.virtual_size || pm.logical_sector_size != cm.logical_sector_size {
            return Err(Error::Parent(format!(
                "{} ({} bytes, {}-byte sectors) cannot become the parent of {} ({} bytes, \
                 {}-byte sectors): a differencing chain needs one size and sector size",
                parent.display(),
                pm.virtual_size,
                pm.logical_sector_size,
                child.display(),
                cm.virtual_size,
                cm.logical_sector_size
            )));
        }
        let link = parent_link(parent, child, p.header.data_write_guid, pm.page83)?;
        drop((p, c));
        rewrite_locator(child, |loc| {
            loc.entries.retain(|(k, _)| k != "parent_linkage2");
            set_entry(loc, "parent_linkage", format!("{:?}", link.data_write_guid));
            set_entry(loc, "relative_path", link.relative_path.clone());
            set_entry(loc, "absolute_win32_path", link.absolute_path.clone());
            // A volume path would name the old parent's volume and file; it cannot be made
            // here, and a stale one would be tried before the absolute path.
            loc.entries.retain(|(k, _)| k != "volume_path");
            Ok(())
        })
    }
}

fn set_entry(loc: &mut ParentLocator, key: &str, value: String) {
    match loc.entries.iter_mut().find(|(k, _)| k == key) {
        Some(e) => e.1 = value,
        None => loc.entries.push((key.to_string(), value)),
    }
}

/// Rewrite the parent locator of `child` through the log. Only files whose metadata holds
/// nothing but the items MS-VHDX defines are rewritten: the region is regenerated from the
/// parsed items, and an item we do not know would be lost.
fn rewrite_locator(
    child: &Path,
    change: impl FnOnce(&mut ParentLocator) -> Result<()>,
) -> Result<()> {
    rewrite_locator_inner(child, change, false)
}

/// `crash_after_log`: test hook, stop after the log entry is written (see the writer).
fn rewrite_locator_inner(
    child: &Path,
    change: impl FnOnce(&mut ParentLocator) -> Result<()>,
    crash_after_log: bool,
) -> Result<()> {
    let ro = open_layer_ro(child)?;
    let Some(mut loc) = ro
        .metadata
        .parent_locator
        .clone()
        .filter(|_| ro.has_parent())
    else {
        return Err(Error::InvalidArgument(format!(
            "{} is not a differencing disk, so it has no parent locator to change",
            child.display()
        )));
    };
    let regions = ro.regions;
    let mut table_bytes = vec![0u8; METADATA_TABLE_SIZE];
    read_exact(
        &*ro.backing,
        &mut table_bytes,
        regions.metadata_offset,
        "metadata table",
    )?;
    let table = MetadataTable::parse(&table_bytes, regions.metadata_length)?;
    let known = KNOWN_METADATA;
    if let Some(e) = table
        .entries
        .iter()
        .find(|e| e.is_user || !known.contains(&e.item_id))
    {
        return Err(Error::unsupported(
            "vhdx",
            format!(
                "{} has metadata item {} that this program does not rewrite; its parent \
                 locator cannot be changed safely here",
                child.display(),
                e.item_id
            ),
        ));
    }
    change(&mut loc)?;
    let mut meta = ro.metadata.clone();
    meta.parent_locator = Some(loc);
    let new_region = meta.to_region_bytes(regions.metadata_length)?;
    drop(ro);

    let mut rw = open_layer_rw(child)?;
    let mut old_region = vec![0u8; regions.metadata_length as usize];
    read_exact(
        &*rw.backing,
        &mut old_region,
        regions.metadata_offset,
        "metadata region",
    )?;
    let writer = rw.writer.as_mut().ok_or_else(|| {
        Error::InvalidArgument(format!(
            "internal: {} was not opened for writing",
            child.display()
        ))
    })?;
    writer.set_crash_after_log_write(crash_after_log);
    const PAGE: usize = 4096;
    for (i, (new, old)) in new_region
        .chunks(PAGE)
        .zip(old_region.chunks(PAGE))
        .enumerate()
    {
        if new != old {
            writer.stage_page(regions.metadata_offset + (i * PAGE) as u64, new)?;
        }
    }
    writer.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::create::CreateOptions;
    use vdisk_core::{OpenOptions, VirtualDisk, VirtualDiskMut};

    fn view(p: &Path) -> Vec<u8> {
        let d = Vhdx::open(p, &OpenOptions::default()).unwrap();
        let mut v = vec![0u8; d.geometry().virtual_size as usize];
        d.read_at(&mut v, 0).unwrap();
        v
    }

    /// A locator rewrite interrupted after its log entry (as by a crash) leaves the old or the
    /// new locator, never a mix: read-only opens replay the entry in memory and find the new
    /// parent; a writable open replays it on disk and the file checks clean.
    #[test]
    fn interrupted_locator_rewrite_is_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.vhdx");
        let opts = CreateOptions {
            virtual_size: 8 << 20,
            block_size: 1 << 20,
            ..Default::default()
        };
        let mut b = Vhdx::create(&base, &opts).unwrap();
        b.write_at(&[7u8; 4096], 1 << 20).unwrap();
        b.flush().unwrap();
        drop(b);
        let child = dir.path().join("child.vhdx");
        let mut c = Vhdx::create_child(&base, &child).unwrap();
        c.write_at(&[9u8; 512], 0).unwrap();
        c.flush().unwrap();
        let child_guid = c.data_write_guid();
        drop(c);
        let want = view(&child);
        // A copy keeps the DataWriteGuid: the same parent under another name.
        let moved = dir.path().join("moved-base.vhdx");
        std::fs::copy(&base, &moved).unwrap();
        let g = Guid::new_random();
        let err = rewrite_locator_inner(
            &child,
            |loc| {
                set_entry(loc, "relative_path", "moved-base.vhdx".into());
                set_entry(loc, "absolute_win32_path", moved.display().to_string());
                set_entry(loc, "parent_linkage2", format!("{g:?}"));
                Ok(())
            },
            true,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("simulated crash"), "{err}");
        std::fs::remove_file(&base).unwrap();
        // Read-only: the log is replayed in memory, the new locator finds the moved parent.
        assert!(view(&child) == want);
        let d = Vhdx::open(&child, &OpenOptions::default()).unwrap();
        assert_eq!(d.parent_linkage().unwrap().unwrap().1, Some(g));
        assert!(
            !crate::check(&child).unwrap().is_empty(),
            "the log is pending"
        );
        drop(d);
        // A writable open replays on disk; identity and content stay.
        let mut w = Vhdx::open(
            &child,
            &OpenOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap();
        w.flush().unwrap();
        drop(w);
        assert!(crate::check(&child).unwrap().is_empty());
        let d = Vhdx::open(&child, &OpenOptions::default()).unwrap();
        assert_eq!(d.data_write_guid(), child_guid);
        drop(d);
        assert!(view(&child) == want);
        // Reparenting onto a different disk of another size is refused before anything changes.
        let other = dir.path().join("other.vhdx");
        drop(
            Vhdx::create(
                &other,
                &CreateOptions {
                    virtual_size: 16 << 20,
                    ..opts.clone()
                },
            )
            .unwrap(),
        );
        let e = Vhdx::reparent(&child, &other).unwrap_err().to_string();
        assert!(e.contains("one size"), "{e}");
        assert!(view(&child) == want);
    }
}
