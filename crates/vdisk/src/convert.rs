//! Converting any disk into a new file of any format.
//!
//! The copy is a pipeline, because reading (decompressing nothing, but walking BATs and waiting
//! for the disk) and writing (allocating blocks, updating the BAT) each take about as long as the
//! other, and doing them in turn would add the two:
//!
//! ```text
//! planner ──jobs──► reader × READERS ──(one slot per piece)──► writer (this thread, in order)
//!    └──────────────────── steps, in offset order ─────────────────┘
//! ```
//!
//! - The planner walks the source's allocation map window by window (memory proportional to the
//!   window, not the disk) and cuts `Data` extents into aligned pieces.
//! - Readers fill pieces from a fixed pool of buffers and check them for zeros.
//! - The writer takes the pieces in ascending offset order, so the output file grows
//!   sequentially, and returns each buffer to the pool.
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
    len: usize,
    buf: Vec<u8>,
    zero: bool,
}

enum Step {
    /// A piece of data, read by some reader; the writer waits for it in order.
    Piece(Receiver<Result<Piece>>),
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
        let planner = s.spawn(move || plan(src, size, job_tx, step_tx, cancel));
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
                if steps.send(Step::Piece(result)).is_err() {
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
        let result = src.read_at(&mut buf[..job.len], job.offset).map(|()| {
            let zero = is_zero(&buf[..job.len]);
            Piece {
                offset: job.offset,
                len: job.len,
                buf,
                zero,
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
            Step::Piece(result) => {
                let piece = result.recv().map_err(|_| {
                    Error::InvalidArgument("a convert reader thread stopped unexpectedly".into())
                })??;
                // A new disk reads as zeros: writing zeros would only allocate space.
                if !piece.zero {
                    out.write_at(&piece.buf[..piece.len], piece.offset)?;
                    written += piece.len as u64;
                }
                report(piece.offset + piece.len as u64);
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

        let e = crate::convert(&*src, &dst, &opts, None).unwrap_err().to_string();
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
        let e = crate::convert(&src, &dst, &opts, None).unwrap_err().to_string();
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
        let e = crate::convert(&src, &dst, &opts, None).unwrap_err().to_string();
        assert!(e.contains("4096-byte logical sectors") && e.contains("vhdx"), "{e}");
        assert!(!dst.exists());
    }
}
