//! Converting any disk into a new file of any format.
//!
//! The copy is a pipeline, because reading (waiting for the disk, walking BATs) and writing
//! (allocating blocks, updating the BAT, waiting for the disk again) each take about as long as
//! the other, and doing them in turn would add the two:
//!
//! ```text
//! planner ──jobs──► reader × READERS ──(one slot per piece)──► writer (this thread, in order)
//!    └──────────────────── steps, in offset order ─────────────────┘
//! ```
//!
//! - The planner walks the source's allocation map window by window (memory proportional to the
//!   window, not the disk) and cuts `Data` extents into aligned pieces.
//! - Readers fill pieces from a fixed pool of buffers and find their non-zero 4 KiB runs.
//! - The writer takes the pieces in ascending offset order, so the output file grows
//!   sequentially, writes only the non-zero runs (a new disk reads as zeros: writing zeros would
//!   only allocate space), and returns each buffer to the pool.
//!
//! Fixed outputs are not filled with zeros either: their space is reserved when they are
//! created, and the content is the same.
//!
//! Memory is bounded by the pool: `BUFFERS × PIECE` bytes whatever the disk size. A reader takes
//! its buffer and its job in one critical section, so the lowest outstanding piece always has a
//! buffer and the pipeline cannot stall.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use crate::create::refuse_existing;
use crate::{
    create, io::is_zero, ConvertOptions, ConvertReport, CreateOptions, DiskFormat, Error,
    ExtentState, MapScope, Progress, Result, VirtualDisk, VirtualDiskMut,
};

/// Allocation-map window: a 1 GiB window of a 32 MiB-block VHDX is 32 BAT entries.
const WINDOW: u64 = 1 << 30;
/// Unit of reading and writing: large enough that per-call overhead vanishes, aligned so that it
/// covers whole VHDX/VHD blocks of every common size.
const PIECE: u64 = 4 << 20;
const READERS: usize = 2;
/// Buffers in flight: readers' work plus what waits for the writer.
const BUFFERS: usize = 8;

struct Piece {
    offset: u64,
    buf: Vec<u8>,
    /// Ranges of `buf` that hold non-zero data; everything else is zeros and is not written.
    runs: Vec<(usize, usize)>,
}

/// Zero detection granularity, as file systems allocate: an all-zero 4 KiB stays a hole in a
/// raw output, and a dynamic block that only receives zeros is never allocated.
const ZERO_GRAIN: u64 = 4096;

/// The non-zero ranges of `buf` (which holds the disk at `offset`), at `ZERO_GRAIN` granularity
/// aligned to the disk, adjacent ranges merged.
fn nonzero_runs(buf: &[u8], offset: u64) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut pos = 0usize;
    while pos < buf.len() {
        let abs = offset + pos as u64;
        let end = (((abs / ZERO_GRAIN) + 1) * ZERO_GRAIN - offset).min(buf.len() as u64) as usize;
        if !is_zero(&buf[pos..end]) {
            match runs.last_mut() {
                Some(last) if last.1 == pos => last.1 = end,
                _ => runs.push((pos, end)),
            }
        }
        pos = end;
    }
    runs
}

enum Step {
    /// A piece of data, read by some reader; the writer waits for it in order.
    Piece(u64, Receiver<Result<Piece>>),
    /// Everything below this offset is done (progress through unallocated ranges).
    Reached(u64),
}

struct Job {
    offset: u64,
    len: usize,
    reply: SyncSender<Result<Piece>>,
}

pub(crate) fn convert(
    src: &dyn VirtualDisk,
    dst: &Path,
    opts: &ConvertOptions,
    progress: Option<Progress<'_>>,
) -> Result<ConvertReport> {
    let geo = src.geometry();
    if opts.format == DiskFormat::Vhd && geo.logical_sector_size != 512 {
        return Err(Error::InvalidArgument(format!(
            "the source has {}-byte logical sectors, but VHD only has 512-byte sectors; \
             convert to vhdx instead (--to vhdx), which keeps the sector size",
            geo.logical_sector_size
        )));
    }
    let sector = u64::from(geo.logical_sector_size.max(1));
    if opts.format != DiskFormat::Raw && !geo.virtual_size.is_multiple_of(sector) {
        let padded = geo.virtual_size.div_ceil(sector) * sector;
        return Err(Error::InvalidArgument(format!(
            "the source is {} bytes, not a whole number of {sector}-byte sectors, and {} stores \
             whole sectors; pad a copy of the source to {padded} bytes \
             (truncate -s {padded} COPY) and convert that",
            geo.virtual_size, opts.format
        )));
    }
    refuse_existing(dst)?;
    let mut copts = CreateOptions::new(opts.format, geo.virtual_size);
    copts.fixed = opts.fixed;
    copts.block_size = opts.block_size;
    copts.logical_sector_size = geo.logical_sector_size;
    copts.physical_sector_size = match geo.physical_sector_size {
        512 | 4096 => geo.physical_sector_size,
        _ => 4096,
    };
    if opts.format == DiskFormat::Raw {
        // A raw file records no sector sizes; accept whatever the source has.
        copts.logical_sector_size = 512;
        copts.physical_sector_size = 512;
    }
    let mut out = create::create(dst, &copts)?;
    let result = copy(src, &mut *out, progress).and_then(|r| {
        out.flush()?;
        Ok(r)
    });
    drop(out);
    match result {
        Ok((bytes_read, bytes_written)) => Ok(ConvertReport {
            output: dst.to_path_buf(),
            virtual_size: geo.virtual_size,
            bytes_read,
            bytes_written,
        }),
        Err(e) => {
            // A half-written disk looks valid and holds the wrong data: never leave one behind.
            let _ = std::fs::remove_file(dst);
            Err(e)
        }
    }
}

/// Copy every non-zero byte of `src` into the empty disk `out`. Returns (bytes read, bytes
/// written).
pub(crate) fn copy(
    src: &dyn VirtualDisk,
    out: &mut dyn VirtualDiskMut,
    progress: Option<Progress<'_>>,
) -> Result<(u64, u64)> {
    let size = src.geometry().virtual_size;
    if out.geometry().virtual_size < size {
        return Err(Error::InvalidArgument(format!(
            "the output ({} bytes) is smaller than the source ({size} bytes)",
            out.geometry().virtual_size
        )));
    }
    let (job_tx, job_rx) = sync_channel::<Job>(BUFFERS);
    let (pool_tx, pool_rx) = sync_channel::<Vec<u8>>(BUFFERS);
    for _ in 0..BUFFERS {
        pool_tx
            .send(vec![0u8; PIECE as usize])
            .expect("the pool has room for every buffer");
    }
    // Buffer and job are taken together (see the module doc); the Arc makes the receivers go away
    // when the last reader stops, which unblocks a planner waiting to hand out more work.
    let intake = Arc::new(Mutex::new((pool_rx, job_rx)));
    let (step_tx, step_rx) = sync_channel::<Step>(BUFFERS);
    let cancel = AtomicBool::new(false);

    std::thread::scope(|s| {
        let cancel = &cancel;
        let planner = s.spawn(move || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                plan(src, size, job_tx, step_tx, cancel)
            }))
            .unwrap_or_else(|_| {
                Err(Error::InvalidArgument(
                    "the source disk's allocation map failed (panicked); this is a bug".into(),
                ))
            })
        });
        for _ in 0..READERS {
            let intake = Arc::clone(&intake);
            s.spawn(move || read_loop(src, intake));
        }
        drop(intake);
        let written = write_loop(out, step_rx, pool_tx, progress, size);
        if written.is_err() {
            cancel.store(true, Ordering::Relaxed);
        }
        let planned = planner
            .join()
            .unwrap_or_else(|_| Err(Error::InvalidArgument("convert planner panicked".into())));
        let written = written?;
        let bytes_read = planned?;
        Ok((bytes_read, written))
    })
}

/// Walk the map and hand out the work. Returns the bytes of data extents (what is read).
fn plan(
    src: &dyn VirtualDisk,
    size: u64,
    jobs: SyncSender<Job>,
    steps: SyncSender<Step>,
    cancel: &AtomicBool,
) -> Result<u64> {
    let mut data_bytes = 0u64;
    let mut window = 0u64;
    while window < size {
        let len = WINDOW.min(size - window);
        let map = src.map(window, len, MapScope::View)?;
        let mut expected = window;
        for e in map {
            if e.offset != expected || e.length == 0 || e.end() > window + len {
                return Err(Error::InvalidArgument(format!(
                    "the source's allocation map is inconsistent near offset {expected} \
                     (extent {}+{}); this is a bug in the source disk's reader",
                    e.offset, e.length
                )));
            }
            expected = e.end();
            if e.state != ExtentState::Data {
                if steps.send(Step::Reached(e.end())).is_err() {
                    return Ok(data_bytes);
                }
                continue;
            }
            let mut pos = e.offset;
            while pos < e.end() {
                if cancel.load(Ordering::Relaxed) {
                    return Ok(data_bytes);
                }
                let next = ((pos / PIECE + 1) * PIECE).min(e.end());
                let (reply, result) = sync_channel(1);
                // The step goes first, so the writer always knows about every queued job.
                if steps.send(Step::Piece(next, result)).is_err() {
                    return Ok(data_bytes);
                }
                let job = Job {
                    offset: pos,
                    len: (next - pos) as usize,
                    reply,
                };
                if jobs.send(job).is_err() {
                    return Ok(data_bytes);
                }
                data_bytes += next - pos;
                pos = next;
            }
        }
        if expected != window + len {
            return Err(Error::InvalidArgument(format!(
                "the source's allocation map of {window}+{len} stops at {expected}; \
                 this is a bug in the source disk's reader"
            )));
        }
        window += len;
    }
    Ok(data_bytes)
}

type Intake = Arc<Mutex<(Receiver<Vec<u8>>, Receiver<Job>)>>;

fn read_loop(src: &dyn VirtualDisk, intake: Intake) {
    loop {
        let (mut buf, job) = {
            let guard = match intake.lock() {
                Ok(g) => g,
                Err(_) => return,
            };
            let Ok(buf) = guard.0.recv() else { return };
            let Ok(job) = guard.1.recv() else { return };
            (buf, job)
        };
        // A bug in a format reader must fail this conversion, not abort the program.
        let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            src.read_at(&mut buf[..job.len], job.offset)
        }))
        .unwrap_or_else(|_| {
            Err(Error::InvalidArgument(format!(
                "the source disk's reader failed (panicked) at offset {}; this is a bug",
                job.offset
            )))
        });
        let result = read.map(|()| {
            let runs = nonzero_runs(&buf[..job.len], job.offset);
            Piece {
                offset: job.offset,
                buf,
                runs,
            }
        });
        // The writer may have stopped (error); then nobody wants the piece.
        let _ = job.reply.send(result);
    }
}

fn write_loop(
    out: &mut dyn VirtualDiskMut,
    steps: Receiver<Step>,
    pool: SyncSender<Vec<u8>>,
    progress: Option<Progress<'_>>,
    size: u64,
) -> Result<u64> {
    let mut written = 0u64;
    let report = |done: u64| {
        if let Some(p) = progress {
            p(done, size)
        }
    };
    report(0);
    // Ends when the planner is done (or failed: its error is reported by the caller).
    for step in steps {
        match step {
            Step::Reached(at) => report(at),
            Step::Piece(end, result) => {
                let piece = result.recv().map_err(|_| {
                    Error::InvalidArgument("a convert reader thread stopped unexpectedly".into())
                })??;
                // A new disk reads as zeros: writing zeros would only allocate space.
                for &(start, end) in &piece.runs {
                    out.write_at(&piece.buf[start..end], piece.offset + start as u64)?;
                    written += (end - start) as u64;
                }
                report(end);
                // The pool has room for every buffer, so this never blocks.
                let _ = pool.send(piece.buf);
            }
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonzero_runs_at_grain_granularity() {
        let mut b = vec![0u8; 5 * 4096];
        assert!(nonzero_runs(&b, 0).is_empty());
        b[10] = 1;
        b[4096 * 2 + 5] = 1;
        b[4096 * 3] = 1;
        assert_eq!(nonzero_runs(&b, 0), vec![(0, 4096), (8192, 16384)]);
        // A piece that starts mid-grain is cut at the disk's grain boundaries.
        assert_eq!(nonzero_runs(&b[100..], 100), vec![(8092, 16284)]);
        assert_eq!(
            nonzero_runs(&b[..10000], 4096 * 7),
            vec![(0, 4096), (8192, 10000)]
        );
    }
    use crate::raw::RawDisk;
    use crate::{DiskInfo, Extent, Geometry, OpenOptions};
    use rand::{Rng, SeedableRng};

    fn fill_random(d: &mut dyn VirtualDiskMut, seed: u64, writes: usize) {
        let size = d.geometry().virtual_size;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for _ in 0..writes {
            let len = rng.gen_range(1..300_000u64);
            let off = rng.gen_range(0..size - len);
            let buf: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            d.write_at(&buf, off).unwrap();
        }
    }

    fn read_all(d: &dyn VirtualDisk) -> Vec<u8> {
        let mut v = vec![0u8; d.geometry().virtual_size as usize];
        d.read_at(&mut v, 0).unwrap();
        v
    }

    #[test]
    fn raw_to_raw_is_identical_sparse_and_reports_progress() {
        let dir = tempfile::tempdir().unwrap();
        let src_path = dir.path().join("src.raw");
        let size = 40 << 20;
        let mut src = RawDisk::create(&src_path, size).unwrap();
        fill_random(&mut src, 1, 40);
        // Stored zeros: allocated in the source, must not be written to the output.
        src.write_at(&vec![0u8; 8 << 20], 24 << 20).unwrap();
        src.write_at(&[9u8; 513], (32 << 20) - 1).unwrap();
        src.flush().unwrap();
        let src = crate::open(&src_path, &OpenOptions::default()).unwrap();

        let dst = dir.path().join("dst.raw");
        let calls = Mutex::new(Vec::new());
        let cb = |done: u64, total: u64| calls.lock().unwrap().push((done, total));
        let opts = ConvertOptions {
            format: DiskFormat::Raw,
            fixed: false,
            block_size: None,
        };
        let r = crate::convert(&*src, &dst, &opts, Some(&cb)).unwrap();
        assert_eq!(r.virtual_size, size);
        assert!(r.bytes_written <= r.bytes_read);
        let out = crate::open(&dst, &OpenOptions::default()).unwrap();
        assert_eq!(read_all(&*out), read_all(&*src));
        // The 8 MiB of stored zeros (minus what random writes hit) stay a hole.
        let holes: u64 = out
            .map(24 << 20, 8 << 20, MapScope::View)
            .unwrap()
            .iter()
            .filter(|e| e.state == ExtentState::Unallocated)
            .map(|e| e.length)
            .sum();
        assert!(holes > 0, "zeros were written into the raw output");
        let calls = calls.into_inner().unwrap();
        assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0), "{calls:?}");
        assert_eq!(*calls.last().unwrap(), (size, size));

        let e = crate::convert(&*src, &dst, &opts, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("already exists"), "{e}");
    }

    /// A disk whose reads fail past some offset: a conversion must fail and leave no file.
    struct Failing {
        size: u64,
        fail_from: u64,
        sector: u32,
    }

    impl VirtualDisk for Failing {
        fn geometry(&self) -> Geometry {
            Geometry {
                virtual_size: self.size,
                logical_sector_size: self.sector,
                physical_sector_size: self.sector,
            }
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            if offset + buf.len() as u64 > self.fail_from {
                return Err(Error::io("test read", std::io::ErrorKind::Other.into()));
            }
            buf.fill(0x5a);
            Ok(())
        }
        fn map(&self, offset: u64, length: u64, _: MapScope) -> Result<Vec<Extent>> {
            let end = (offset + length).min(self.size);
            Ok(vec![Extent {
                offset,
                length: end - offset,
                state: ExtentState::Data,
            }])
        }
        fn info(&self) -> DiskInfo {
            unimplemented!("not used by convert")
        }
    }

    #[test]
    fn failed_conversion_leaves_no_output() {
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("out.raw");
        let src = Failing {
            size: 64 << 20,
            fail_from: 50 << 20,
            sector: 512,
        };
        let opts = ConvertOptions {
            format: DiskFormat::Raw,
            fixed: false,
            block_size: None,
        };
        let e = crate::convert(&src, &dst, &opts, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("test read"), "{e}");
        assert!(!dst.exists(), "partial output left behind");

        // And a source that reads fine converts completely.
        let ok = Failing {
            size: 64 << 20,
            fail_from: u64::MAX,
            sector: 512,
        };
        let r = crate::convert(&ok, &dst, &opts, None).unwrap();
        assert_eq!((r.bytes_read, r.bytes_written), (64 << 20, 64 << 20));
        let out = RawDisk::open(&dst, false).unwrap();
        assert!(read_all(&out).iter().all(|&b| b == 0x5a));
    }

    #[test]
    fn vhd_refuses_4k_sectors_with_a_clear_message() {
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("out.vhd");
        let src = Failing {
            size: 8 << 20,
            fail_from: u64::MAX,
            sector: 4096,
        };
        let opts = ConvertOptions {
            format: DiskFormat::Vhd,
            fixed: false,
            block_size: None,
        };
        let e = crate::convert(&src, &dst, &opts, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("4096-byte logical sectors") && e.contains("vhdx"),
            "{e}"
        );
        assert!(!dst.exists());
    }
}

#[cfg(test)]
mod sparse_tests {
    use super::*;
    use crate::disk::push_extent;
    use crate::{DiskInfo, Extent, Geometry, OpenOptions};

    /// A 1 TiB disk with three small data ranges: a conversion must walk it window by window,
    /// read only the data and produce small outputs.
    struct Sparse {
        ranges: Vec<(u64, u64)>,
    }

    const SIZE: u64 = 1 << 40;

    fn byte_at(off: u64) -> u8 {
        ((off / 512) as u8) ^ 0xa5 ^ (off as u8)
    }

    impl VirtualDisk for Sparse {
        fn geometry(&self) -> Geometry {
            Geometry {
                virtual_size: SIZE,
                logical_sector_size: 512,
                physical_sector_size: 4096,
            }
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            crate::disk::check_range(offset, buf.len() as u64, SIZE)?;
            for (i, b) in buf.iter_mut().enumerate() {
                let o = offset + i as u64;
                let inside = self.ranges.iter().any(|&(s, l)| o >= s && o < s + l);
                *b = if inside { byte_at(o) } else { 0 };
            }
            Ok(())
        }
        fn map(&self, offset: u64, length: u64, _: MapScope) -> Result<Vec<Extent>> {
            let end = (offset + length).min(SIZE);
            let mut out = Vec::new();
            let mut pos = offset;
            for &(s, l) in &self.ranges {
                let (s, e) = (s.max(pos), (s + l).min(end));
                if s < e {
                    push_extent(&mut out, pos, s - pos, ExtentState::Unallocated);
                    push_extent(&mut out, s, e - s, ExtentState::Data);
                    pos = e;
                }
            }
            push_extent(&mut out, pos, end - pos, ExtentState::Unallocated);
            Ok(out)
        }
        fn info(&self) -> DiskInfo {
            unimplemented!("not used by convert")
        }
    }

    #[test]
    fn one_tib_sparse_disk_converts_by_windows() {
        let src = Sparse {
            ranges: vec![
                (0, 1 << 20),
                ((500 << 30) + 123 * 512, 3 << 20),
                (SIZE - (64 << 10), 64 << 10),
            ],
        };
        let dir = tempfile::tempdir().unwrap();
        for (name, format) in [("big.vhdx", DiskFormat::Vhdx), ("big.raw", DiskFormat::Raw)] {
            let dst = dir.path().join(name);
            let opts = ConvertOptions {
                format,
                fixed: false,
                block_size: None,
            };
            let r = crate::convert(&src, &dst, &opts, None).unwrap();
            assert_eq!(r.bytes_read, (1 << 20) + (3 << 20) + (64 << 10), "{name}");
            let out = crate::open(&dst, &OpenOptions::default()).unwrap();
            assert_eq!(out.geometry().virtual_size, SIZE);
            for &(s, l) in &src.ranges {
                // Each data range plus a sector of zeros around it.
                let from = s.saturating_sub(512);
                let to = (s + l + 512).min(SIZE);
                let mut got = vec![0u8; (to - from) as usize];
                out.read_at(&mut got, from).unwrap();
                let mut want = vec![0u8; got.len()];
                src.read_at(&mut want, from).unwrap();
                assert!(got == want, "{name}: range at {s} differs");
            }
            use std::os::unix::fs::MetadataExt;
            let used = std::fs::metadata(&dst).unwrap().blocks() * 512;
            assert!(used < 256 << 20, "{name} uses {used} bytes on disk");
        }
    }
}
