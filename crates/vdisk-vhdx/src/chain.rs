//! A VHDX differencing chain as one disk ([`Vhdx`]): parent resolution, the flattened read, and
//! the allocation maps.
//!
//! Parents are found from the child's parent locator (relative path first, then volume path,
//! then absolute path, as MS-VHDX recommends), or from an explicit override, and must carry the
//! DataWriteGuid the child recorded (`parent_linkage`): a parent modified after the child was
//! made would silently change what the child shows.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vdisk_core::disk::{check_range, push_extent};
use vdisk_core::{
    DiskFormat, DiskInfo, Error, Extent, ExtentState, Geometry, MapScope, OpenOptions, ReadAt,
    Result, VirtualDisk,
};

use crate::format::*;
use crate::reader::{VhdxFile, Writable};

/// A VHDX file with its parent chain: the top layer first, then its parents.
pub struct Vhdx {
    pub(crate) top: VhdxFile,
    pub(crate) parent: Option<Box<Vhdx>>,
}

fn open_file(path: &Path, writable: bool) -> Result<File> {
    File::options()
        .read(true)
        .write(writable)
        .open(path)
        .map_err(|e| {
            Error::io(
                format!(
                    "cannot open {}{}",
                    path.display(),
                    if writable { " for writing" } else { "" }
                ),
                e,
            )
        })
}

/// Open one layer read-only.
pub(crate) fn open_layer_ro(path: &Path) -> Result<VhdxFile> {
    let f = open_file(path, false)?;
    VhdxFile::parse(Arc::new(f), Some(path), None)
}

/// Open one layer for writing. The caller validates the file (and its chain) read-only first,
/// so that a damaged or hostile file is refused before the writer touches its headers.
pub(crate) fn open_layer_rw(path: &Path) -> Result<VhdxFile> {
    let file = open_file(path, true)?;
    let raw = file
        .try_clone()
        .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
    let (view, state, replayed) = crate::write::open_writable(file, path)?;
    VhdxFile::parse(
        Arc::new(raw),
        Some(path),
        Some(Writable {
            view,
            state,
            replayed,
        }),
    )
}

impl Vhdx {
    /// Open a VHDX file and its parent chain. Parents are always opened read-only; with
    /// `opts.writable` the top layer is opened for writing (a pending log is then replayed on
    /// disk; read-only opens replay it in memory and never modify the file).
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Vhdx> {
        let ro = Vhdx::with_parents(open_layer_ro(path)?, path, opts)?;
        if !opts.writable {
            return Ok(ro);
        }
        // Everything (the file and its whole chain) checked read-only: only now may the
        // writer renew headers or replay the log.
        let Vhdx { top, parent } = ro;
        drop(top);
        Ok(Vhdx {
            top: open_layer_rw(path)?,
            parent,
        })
    }

    /// Parse a single layer from any bytes (fuzzers, hostile-input tests). No parent is
    /// resolved: a differencing layer opened this way reads its inherited ranges as zeros and
    /// maps them as `Unallocated` in the view (`Inherited` in the layer map).
    pub fn open_backing(backing: Arc<dyn ReadAt>) -> Result<Vhdx> {
        Ok(Vhdx {
            top: VhdxFile::parse(backing, None, None)?,
            parent: None,
        })
    }

    /// Attach the parent chain of an opened top layer (also used by the writer after it
    /// opened or created a child).
    pub(crate) fn with_parents(top: VhdxFile, path: &Path, opts: &OpenOptions) -> Result<Vhdx> {
        let max = opts.max_chain_depth.max(1);
        let mut seen = HashSet::new();
        seen.insert(canonical(path));
        let mut layers: Vec<(PathBuf, VhdxFile)> = vec![(path.to_path_buf(), top)];
        loop {
            let (child_path, child) = layers.last().expect("at least the top layer");
            if !child.has_parent() {
                break;
            }
            if layers.len() >= max {
                return Err(Error::Parent(format!(
                    "the parent chain of {} is deeper than {max} layers; refusing to open it \
                     (a chain this deep is a loop or a damaged file)",
                    path.display()
                )));
            }
            let over = if layers.len() == 1 {
                opts.parent_override.as_deref()
            } else {
                None
            };
            let (ppath, parent) = find_parent(child_path, child, over)?;
            let canon = canonical(&ppath);
            if !seen.insert(canon) {
                let chain: Vec<String> = layers
                    .iter()
                    .map(|(p, _)| p.display().to_string())
                    .chain([ppath.display().to_string()])
                    .collect();
                return Err(Error::Parent(format!(
                    "the parent chain of {} loops: {} appears twice ({}); the parent locators \
                     are damaged; give the right parent with --parent",
                    path.display(),
                    ppath.display(),
                    chain.join(" -> ")
                )));
            }
            layers.push((ppath, parent));
        }
        let mut disk: Option<Box<Vhdx>> = None;
        while let Some((_, layer)) = layers.pop() {
            disk = Some(Box::new(Vhdx {
                top: layer,
                parent: disk,
            }));
        }
        Ok(*disk.expect("at least the top layer"))
    }

    fn read_parent(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.parent {
            None => buf.fill(0),
            Some(p) => {
                // A child may be larger than its parent (resized after the snapshot): the
                // parent's missing tail reads as zeros.
                let pvs = p.top.virtual_size();
                let n = (buf.len() as u64).min(pvs.saturating_sub(offset)) as usize;
                if n > 0 {
                    p.read_view(&mut buf[..n], offset)?;
                }
                buf[n..].fill(0);
            }
        }
        Ok(())
    }

    /// The flattened read. Runs of adjacent present blocks that are contiguous in the file,
    /// and runs of inherited blocks, are each read with one call.
    fn read_view(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let f = &self.top;
        let bs = f.block_size();
        let lss = f.geo.logical_sector_size as u64;
        let end = offset + buf.len() as u64;
        // (start in file or guest offset, start in buf, length)
        let mut file_run: Option<(u64, usize, usize)> = None;
        let mut parent_run: Option<(u64, usize, usize)> = None;
        let flush_file = |run: &mut Option<(u64, usize, usize)>, buf: &mut [u8]| -> Result<()> {
            if let Some((fo, bo, n)) = run.take() {
                f.read_payload(&mut buf[bo..bo + n], fo)?;
            }
            Ok(())
        };
        let flush_parent = |run: &mut Option<(u64, usize, usize)>, buf: &mut [u8]| -> Result<()> {
            if let Some((go, bo, n)) = run.take() {
                self.read_parent(&mut buf[bo..bo + n], go)?;
            }
            Ok(())
        };
        let mut pos = offset;
        while pos < end {
            let b = pos / bs;
            let in_block = pos % bs;
            let seg = (bs - in_block).min(end - pos) as usize;
            let bo = (pos - offset) as usize;
            let e = f.payload_entry(b);
            match entry_state(e) {
                PAYLOAD_FULLY_PRESENT => {
                    let fo = entry_offset(e) + in_block;
                    match &mut file_run {
                        Some((rfo, rbo, n)) if *rfo + *n as u64 == fo && *rbo + *n == bo => {
                            *n += seg
                        }
                        _ => {
                            flush_file(&mut file_run, buf)?;
                            file_run = Some((fo, bo, seg));
                        }
                    }
                }
                PAYLOAD_NOT_PRESENT if f.has_parent() => match &mut parent_run {
                    Some((_, rbo, n)) if *rbo + *n == bo => *n += seg,
                    _ => {
                        flush_parent(&mut parent_run, buf)?;
                        parent_run = Some((pos, bo, seg));
                    }
                },
                PAYLOAD_PARTIALLY_PRESENT => {
                    let block_start = b * bs;
                    let first = in_block / lss;
                    let last = (in_block + seg as u64).div_ceil(lss);
                    let bits = f.sector_bits(b, first, last - first)?;
                    let mut k = 0usize;
                    while k < bits.len() {
                        let bit = bits[k];
                        let mut j = k;
                        while j < bits.len() && bits[j] == bit {
                            j += 1;
                        }
                        let s0 = (block_start + (first + k as u64) * lss).max(pos);
                        let s1 = (block_start + (first + j as u64) * lss).min(pos + seg as u64);
                        let dst = &mut buf[(s0 - offset) as usize..(s1 - offset) as usize];
                        if bit {
                            f.read_payload(dst, entry_offset(e) + (s0 - block_start))?;
                        } else {
                            self.read_parent(dst, s0)?;
                        }
                        k = j;
                    }
                }
                _ => buf[bo..bo + seg].fill(0),
            }
            pos += seg as u64;
        }
        flush_file(&mut file_run, buf)?;
        flush_parent(&mut parent_run, buf)?;
        Ok(())
    }

    /// The flattened map of `[offset, end)` (inside this layer's virtual size).
    fn view_map(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<()> {
        let mut layer = Vec::new();
        self.top.layer_map(offset, len, &mut layer)?;
        for x in layer {
            if x.state != ExtentState::Inherited {
                push_extent(out, x.offset, x.length, x.state);
                continue;
            }
            match &self.parent {
                None => push_extent(out, x.offset, x.length, ExtentState::Unallocated),
                Some(p) => {
                    let pvs = p.top.virtual_size();
                    let inside = x.length.min(pvs.saturating_sub(x.offset));
                    if inside > 0 {
                        p.view_map(x.offset, inside, out)?;
                    }
                    push_extent(
                        out,
                        x.offset + inside,
                        x.length - inside,
                        ExtentState::Unallocated,
                    );
                }
            }
        }
        Ok(())
    }

    fn layer_info(&self) -> DiskInfo {
        let f = &self.top;
        let mut details = vec![
            ("log".to_string(), f.log_state.as_str().to_string()),
            ("creator".to_string(), f.file_id.creator.clone()),
            (
                "file_write_guid".to_string(),
                f.header.file_write_guid.to_string(),
            ),
            ("virtual_disk_id".to_string(), f.metadata.page83.to_string()),
        ];
        if let Some(pl) = &f.metadata.parent_locator {
            for (k, v) in &pl.entries {
                details.push((format!("parent_locator.{k}"), v.clone()));
            }
        }
        DiskInfo {
            path: f.path.clone(),
            format: DiskFormat::Vhdx,
            subformat: f.subformat(),
            virtual_size: f.virtual_size(),
            block_size: Some(f.geo.block_size),
            logical_sector_size: f.metadata.logical_sector_size,
            physical_sector_size: f.metadata.physical_sector_size,
            file_size: f.raw.size().unwrap_or(f.file_size),
            allocated_bytes: f.allocated_bytes(),
            identifier: Some(f.header.data_write_guid.to_string()),
            details,
            parent: self.parent.as_ref().map(|p| Box::new(p.layer_info())),
        }
    }
}

impl VirtualDisk for Vhdx {
    fn geometry(&self) -> Geometry {
        Geometry {
            virtual_size: self.top.virtual_size(),
            logical_sector_size: self.top.metadata.logical_sector_size,
            physical_sector_size: self.top.metadata.physical_sector_size,
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.top.virtual_size())?;
        self.read_view(buf, offset)
    }

    fn map(&self, offset: u64, length: u64, scope: MapScope) -> Result<Vec<Extent>> {
        let vs = self.top.virtual_size();
        let offset = offset.min(vs);
        let length = length.min(vs - offset);
        let mut out = Vec::new();
        match scope {
            MapScope::View => self.view_map(offset, length, &mut out)?,
            MapScope::Layer => self.top.layer_map(offset, length, &mut out)?,
        }
        Ok(out)
    }

    fn info(&self) -> DiskInfo {
        self.layer_info()
    }
}

/// The canonical form of a path, for loop detection (the path itself if it cannot be
/// canonicalized; it is then compared as given).
fn canonical(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| p.to_path_buf())
}

/// A Windows path from a locator in the form this OS understands: backslashes become slashes,
/// `.\` prefixes disappear.
fn windows_to_local(p: &str) -> String {
    let mut s = p.replace('\\', "/");
    while let Some(rest) = s.strip_prefix("./") {
        s = rest.to_string();
    }
    s
}

/// Candidate parent paths from a child's locator, in the order MS-VHDX recommends.
fn candidates(child: &Path, loc: &ParentLocator) -> Vec<PathBuf> {
    let dir = child
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut out = Vec::new();
    if let Some(rel) = loc.get("relative_path") {
        let r = windows_to_local(rel);
        if !r.is_empty() {
            out.push(dir.join(r));
        }
    }
    if let Some(vol) = loc.get("volume_path") {
        // \\?\Volume{GUID}\dir\file: the volume cannot be resolved here; the path inside it
        // is tried from the root, which finds it when the volume is mounted at /.
        let v = windows_to_local(vol);
        if let Some(rest) = v.strip_prefix("//?/") {
            if let Some(i) = rest.find('/') {
                let inner = &rest[i..];
                if inner.len() > 1 {
                    out.push(PathBuf::from(inner));
                }
            }
        }
    }
    if let Some(abs) = loc.get("absolute_win32_path") {
        let a = windows_to_local(abs);
        let a = a.strip_prefix("//?/").unwrap_or(&a).to_string();
        if !a.is_empty() {
            out.push(PathBuf::from(&a));
            // C:/dir/file -> /dir/file
            let b = a.as_bytes();
            if b.len() > 2 && b[0].is_ascii_alphabetic() && b[1] == b':' {
                let stripped = &a[2..];
                if stripped.starts_with('/') {
                    out.push(PathBuf::from(stripped));
                }
            }
        }
    }
    // Last resort, as Hyper-V does after a move: the parent's file name next to the child.
    let names: Vec<PathBuf> = out
        .iter()
        .filter_map(|p| p.file_name().map(|n| dir.join(n)))
        .collect();
    out.extend(names);
    let mut unique: Vec<PathBuf> = Vec::new();
    for p in out {
        if !unique.contains(&p) {
            unique.push(p);
        }
    }
    unique
}

/// Find and open the parent of `child`, checking linkage and sector size.
fn find_parent(
    child_path: &Path,
    child: &VhdxFile,
    over: Option<&Path>,
) -> Result<(PathBuf, VhdxFile)> {
    let loc = child
        .metadata
        .parent_locator
        .as_ref()
        .ok_or_else(|| corrupt_in(child_path, "differencing disk without a parent locator"))?;
    let linkage = loc
        .get_guid("parent_linkage")
        .map_err(|e| e.with_path(child_path))?
        .ok_or_else(|| corrupt_in(child_path, "the parent locator has no parent_linkage entry"))?;
    let linkage2 = loc
        .get_guid("parent_linkage2")
        .map_err(|e| e.with_path(child_path))?;
    let tried: Vec<PathBuf> = match over {
        Some(p) => vec![p.to_path_buf()],
        None => candidates(child_path, loc),
    };
    let mut mismatch: Option<Error> = None;
    for cand in &tried {
        if !cand.is_file() {
            continue;
        }
        let parent = open_layer_ro(cand).map_err(|e| {
            Error::Parent(format!(
                "cannot open {}, the parent of {}: {e}",
                cand.display(),
                child_path.display()
            ))
        })?;
        let got = parent.header.data_write_guid;
        if got != linkage && Some(got) != linkage2 {
            let err = Error::Parent(format!(
                "{} is not the parent {} expects: the child records parent DataWriteGuid {} \
                 (parent_linkage{}) but {} has DataWriteGuid {got}; the parent was modified \
                 after the child was made, or it is a different file. Give the right parent \
                 with --parent",
                cand.display(),
                child_path.display(),
                linkage,
                linkage2
                    .map(|g| format!(", or {g} in parent_linkage2"))
                    .unwrap_or_default(),
                cand.display()
            ));
            if over.is_some() {
                return Err(err);
            }
            mismatch.get_or_insert(err);
            continue;
        }
        if parent.geo.logical_sector_size != child.geo.logical_sector_size {
            return Err(Error::Parent(format!(
                "{} has {}-byte logical sectors but its parent {} has {}-byte sectors; a \
                 differencing chain must use one sector size",
                child_path.display(),
                child.geo.logical_sector_size,
                cand.display(),
                parent.geo.logical_sector_size
            )));
        }
        return Ok((cand.clone(), parent));
    }
    if let Some(e) = mismatch {
        return Err(e);
    }
    let list: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
    Err(Error::Parent(format!(
        "cannot find the parent of {} (tried: {}); if the parent was moved or renamed, give \
         its path with --parent",
        child_path.display(),
        if list.is_empty() {
            "no path in its parent locator".to_string()
        } else {
            list.join(", ")
        }
    )))
}

fn corrupt_in(path: &Path, detail: &str) -> Error {
    Error::corrupt("vhdx", detail).with_path(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locator_candidates() {
        let loc = ParentLocator {
            entries: vec![
                ("relative_path".into(), r".\sub\base.vhdx".into()),
                (
                    "volume_path".into(),
                    r"\\?\Volume{26a21bda-a627-11d7-9931-806e6f6e6963}\vms\base.vhdx".into(),
                ),
                ("absolute_win32_path".into(), r"C:\vms\base.vhdx".into()),
            ],
        };
        let c = candidates(Path::new("/d/child.avhdx"), &loc);
        assert_eq!(
            c,
            vec![
                PathBuf::from("/d/sub/base.vhdx"),
                PathBuf::from("/vms/base.vhdx"),
                PathBuf::from("C:/vms/base.vhdx"),
                PathBuf::from("/d/base.vhdx"),
            ]
        );
    }
}
