//! The same-host communicator: ranks on one host meet in a shared-memory segment instead of
//! sending their partials through TCP sockets (as vLLM's and SGLang's CPU backends do). A TCP
//! message costs system calls, copies through the kernel and a wake-up per peer; here each rank
//! copies its partials into its own slot once and reads every rank's slot in place.
//!
//! [`ShmCommunicator`] wraps an authenticated [`TcpCommunicator`] and keeps it: the mesh is
//! the control channel (attaching, noticing a dead peer) and the fallback, used for everything
//! when any rank cannot attach (other hosts, other containers, `HELIOS_COMM=tcp`).
//!
//! **Attaching.** Over the TCP mesh every rank offers its boot id and whether it wants shared
//! memory; rank 0's offer also names a segment it has just created (in /dev/shm, else the temp
//! dir): a file with a random 128-bit name, mode 0600, whose header holds the world, the slot
//! size and a random 32-byte nonce. If every rank wants it, the known boot ids agree and rank 0
//! has a segment, each rank opens and maps it and checks the header (magic, world, nonce, size
//! against the file's length: a short or foreign file is an error, never a panic), then every
//! rank votes over TCP. Shared memory is used only if all attached; otherwise everything stays
//! on TCP (logged at info). All ranks decide from the same gathered bytes, so they agree.
//! Rank 0 unlinks the file once every rank has voted: nobody can attach later, and only a crash
//! within those few milliseconds leaves a file behind; the next segment made in that folder
//! removes such leftovers of the same user (older than [`STALE_SEGMENT`]: a segment lives for
//! milliseconds before it is unlinked).
//!
//! **Security.** The name travels only over the mesh, whose handshake proved the cluster secret
//! (docs/architecture.md, "Security"); the file is private to the workers' user and is gone
//! after attaching. So the ranks that may attach are exactly the mesh's ranks; the nonce makes
//! a stale or foreign file with the same name (impossible in practice) an error, not a peer.
//! Workers started `--insecure` prove nothing on the mesh; then the file's mode (only the
//! workers' user) is the guard, as it is for their other files.
//!
//! **Protocol.** The segment holds a header, a sequence counter per rank (an `AtomicU64` on a
//! cache line of its own) and, per rank, two slots (buffers 0 and 1), each a length word and
//! `slot_bytes` of data. Every rank numbers its steps k = 1, 2, ... alike (each collective is one
//! step or, when larger than a slot, one step per chunk of whole elements; every rank knows the
//! size, so all chunk alike). Step k of a rank: write the length and bytes into its slot of
//! buffer k % 2; store k in its counter (Release); wait until every counter reads at least k
//! (Acquire, so every slot's bytes are visible); read every rank's slot in rank order.
//!
//! Why two buffers suffice: a rank writes buffer k % 2 at step k only after it returned from step
//! k - 1, that is after seeing every counter at k - 1 or more. A rank stores k - 1 only after it
//! finished step k - 2, including reading every slot of buffer (k - 2) % 2 = k % 2. So nobody
//! still reads a slot when it is overwritten, and nobody reads a slot before its owner
//! published it. It also bounds the counters: while a rank waits in step k every counter is at
//! least k - 1 (as just shown) and at most k + 1 (a rank storing k + 2 would have seen this
//! rank's counter at k + 1); any other value means a corrupt segment and fails the collective.
//!
//! **Sums.** `all_reduce_parts` adds all `P_local · world` slices in global order, starting from
//! the first slice itself, exactly as `TcpCommunicator::all_reduce_parts` does, so the bits are
//! the same as over TCP. Chunks are ranges of elements, and each element is added in the same
//! order whatever the chunking.
//!
//! **Waiting.** A wait spins a few microseconds, then yields the core (ranks may outnumber
//! cores), then sleeps in short naps. It fails when the mesh is aborted ([`MeshAbort`]) and,
//! every 10 ms, when a peer's TCP connection has ended (a crashed peer's kernel closes it), so a
//! rank never hangs on a dead peer. There is no other bound, as on TCP.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use memmap2::{MmapMut, MmapOptions};
use serde::{Deserialize, Serialize};

use super::{Communicator, MeshAbort, TcpCommunicator};

/// Bytes of one rank's slot in each buffer; larger messages go in chunks.
pub const SLOT_BYTES: usize = 1 << 20;
const MAGIC: &[u8; 8] = b"HELIOSHM";
/// A cache line: the header takes two, each counter and each slot's length word one.
const LINE: usize = 64;
const HEADER: usize = 2 * LINE;
const NONCE: usize = 32;
/// A wait spins this long, then yields until `YIELD`, then naps `NAP` at a time.
const SPIN: Duration = Duration::from_micros(5);
const YIELD: Duration = Duration::from_millis(1);
const NAP: Duration = Duration::from_micros(20);
/// How often a long wait asks the TCP mesh whether a peer's connection has ended.
const PEER_CHECK: Duration = Duration::from_millis(10);

/// How to attach; [`ShmOptions::from_env`] is the worker's.
#[derive(Clone, Debug)]
pub struct ShmOptions {
    /// Whether to try shared memory at all; every rank must want it.
    pub enabled: bool,
    /// Bytes per rank in each of the two buffers (a multiple of 64).
    pub slot_bytes: usize,
    /// Where rank 0 creates the segment and every rank looks for it.
    pub dir: PathBuf,
}

impl ShmOptions {
    /// Shared memory unless `HELIOS_COMM=tcp`; the segment in /dev/shm, else the temp dir.
    pub fn from_env() -> Self {
        let shm = Path::new("/dev/shm");
        Self {
            enabled: std::env::var("HELIOS_COMM").map_or(true, |v| !v.eq_ignore_ascii_case("tcp")),
            slot_bytes: SLOT_BYTES,
            dir: if shm.is_dir() {
                shm.into()
            } else {
                std::env::temp_dir()
            },
        }
    }
}

/// The CPU communicator: shared memory between ranks of one host, else the TCP mesh it wraps.
pub struct ShmCommunicator {
    tcp: TcpCommunicator,
    abort: Arc<MeshAbort>,
    /// `None`: every collective goes over `tcp`.
    seg: Option<Segment>,
}

impl ShmCommunicator {
    /// [`ShmCommunicator::attach_with`] the worker's options.
    pub fn attach(tcp: TcpCommunicator) -> Result<Self> {
        Self::attach_with(tcp, &ShmOptions::from_env())
    }

    /// Moves the mesh onto shared memory if every rank can attach (see the module docs), else
    /// keeps it on TCP. Errs only if the TCP mesh itself fails meanwhile.
    pub fn attach_with(mut tcp: TcpCommunicator, opts: &ShmOptions) -> Result<Self> {
        let (rank, world) = (tcp.rank(), tcp.world_size());
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        let mut offer = Offer {
            wants: opts.enabled,
            boot: boot
                .chars()
                .filter(|c| c.is_ascii_hexdigit() || *c == '-')
                .take(64)
                .collect(),
            name: String::new(),
            nonce: [0; NONCE],
        };
        let created = match (rank, opts.enabled) {
            (0, true) => match Created::new(&opts.dir, world, opts.slot_bytes) {
                Ok(c) => {
                    (offer.name, offer.nonce) = (c.name.clone(), c.nonce);
                    Some(c)
                }
                Err(e) => {
                    tracing::info!("communicator: no shared-memory segment: {e:#}");
                    None
                }
            },
            _ => None,
        };
        let offers = tcp
            .all_gather(&offer.encode()?, &Device::Cpu)
            .context("exchanging shared-memory offers")?;
        // Every rank decides from the same gathered bytes: all vote, or none.
        let seg = match agree(&offers, world) {
            Err(why) => Err(why),
            Ok(first) => {
                let seg = Segment::open(&opts.dir.join(&first.name), &first.nonce, world, rank);
                let votes = tcp
                    .all_gather(&[seg.is_ok() as u8], &Device::Cpu)
                    .context("voting on shared memory")?;
                drop(created); // every rank attached or failed: unlink
                let failed: Vec<_> = (0..world).filter(|&r| votes.get(r) != Some(&1)).collect();
                match seg {
                    Ok(seg) if failed.is_empty() => Ok(seg),
                    Ok(_) => Err(anyhow!("ranks {failed:?} could not attach")),
                    Err(e) => Err(e.context(format!("rank {rank} could not attach"))),
                }
            }
        };
        match &seg {
            Ok(_) => tracing::info!(rank, world, "communicator on shared memory"),
            Err(why) => tracing::info!(rank, world, "communicator on TCP: {why:#}"),
        }
        let seg = seg.ok();
        let abort = tcp.abort_handle();
        Ok(Self { tcp, abort, seg })
    }

    /// Whether collectives go through shared memory (else TCP).
    pub fn is_shared_memory(&self) -> bool {
        self.seg.is_some()
    }

    /// Frees a rank blocked in a collective, on either path (see [`MeshAbort`]).
    pub fn abort_handle(&self) -> Arc<MeshAbort> {
        self.abort.clone()
    }
}

impl Communicator for ShmCommunicator {
    fn rank(&self) -> usize {
        self.tcp.rank()
    }
    fn world_size(&self) -> usize {
        self.tcp.world_size()
    }

    fn all_reduce_sum(&mut self, x: &Tensor) -> Result<Tensor> {
        self.all_reduce_parts(&x.unsqueeze(0)?)
    }

    fn all_reduce_parts(&mut self, parts: &Tensor) -> Result<Tensor> {
        let Some(seg) = &mut self.seg else {
            return self.tcp.all_reduce_parts(parts);
        };
        let p = parts.dim(0)?;
        // Every rank takes the same branch: TCP sums what a slot cannot hold one element of,
        // and refuses what it refuses, on every rank alike.
        if parts.dtype() != DType::F32 || p == 0 || p * 4 > seg.layout.slot {
            return self.tcp.all_reduce_parts(parts);
        }
        let shape = parts.get(0)?.shape().clone();
        let local = parts.flatten_all()?.to_vec1::<f32>()?;
        let sum = seg.reduce(&local, p, shape.elem_count(), &self.tcp, &self.abort)?;
        Ok(Tensor::from_vec(sum, shape, parts.device())?)
    }

    fn barrier(&mut self) -> Result<()> {
        match &mut self.seg {
            None => self.tcp.barrier(),
            Some(seg) => seg.step(0, &self.tcp, &self.abort, |_| Ok(()), |_, _| Ok(())),
        }
    }

    fn all_gather(&mut self, mine: &[u8], device: &Device) -> Result<Vec<u8>> {
        match &mut self.seg {
            None => self.tcp.all_gather(mine, device),
            Some(seg) => seg.gather(mine, &self.tcp, &self.abort),
        }
    }
}

/// What each rank says over TCP before attaching; rank 0's names its segment. Sent as JSON
/// padded with spaces to `OFFER_LEN` bytes (a gather takes equal lengths).
#[derive(Serialize, Deserialize)]
struct Offer {
    wants: bool,
    boot: String,
    name: String,
    nonce: [u8; NONCE],
}

const OFFER_LEN: usize = 512;

impl Offer {
    fn encode(&self) -> Result<Vec<u8>> {
        let mut b = serde_json::to_vec(self)?;
        ensure!(b.len() <= OFFER_LEN, "an offer of {} bytes", b.len());
        b.resize(OFFER_LEN, b' ');
        Ok(b)
    }
}

/// Rank 0's offer if every rank may take it up, else why not.
fn agree(all: &[u8], world: usize) -> Result<Offer> {
    ensure!(
        all.len() == world * OFFER_LEN,
        "offers of {} bytes",
        all.len()
    );
    let mut offers = all
        .chunks_exact(OFFER_LEN)
        .map(serde_json::from_slice)
        .collect::<Result<Vec<Offer>, _>>()?;
    if let Some(r) = offers.iter().position(|o| !o.wants) {
        bail!("rank {r} asked for TCP (HELIOS_COMM=tcp)");
    }
    let mut boots = offers.iter().map(|o| &o.boot).filter(|b| !b.is_empty());
    if let Some(first) = boots.next() {
        ensure!(
            boots.all(|b| b == first),
            "the ranks run on different hosts"
        );
    }
    let first = offers.swap_remove(0);
    ensure!(!first.name.is_empty(), "rank 0 has no segment");
    let plain = first
        .name
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || c == b'-');
    ensure!(plain, "rank 0 named its segment {:?}", first.name);
    Ok(first)
}

/// Where things lie in a segment: the header, a counter per rank, then per rank two slots (one
/// per buffer), each a length word on a line of its own and `slot` bytes.
#[derive(Clone, Copy)]
struct Layout {
    world: usize,
    slot: usize,
    size: usize,
}

impl Layout {
    fn new(world: usize, slot: usize) -> Result<Self> {
        // Bounds that keep every offset below from overflowing (the product is checked).
        ensure!((1..=4096).contains(&world), "a world of {world}");
        let whole_lines = slot.is_multiple_of(LINE) && (LINE..=1 << 30).contains(&slot);
        ensure!(whole_lines, "slots of {slot} bytes");
        let size = (2 * world)
            .checked_mul(LINE + slot)
            .and_then(|s| s.checked_add(HEADER + world * LINE))
            .ok_or_else(|| anyhow!("{world} slots of {slot} bytes are too many"))?;
        Ok(Self { world, slot, size })
    }
    fn counter(&self, r: usize) -> usize {
        HEADER + r * LINE
    }
    fn slot(&self, r: usize, buffer: usize) -> usize {
        HEADER + self.world * LINE + (2 * r + buffer) * (LINE + self.slot)
    }
}

/// How old a segment file must be to count as left behind by a crash.
pub const STALE_SEGMENT: Duration = Duration::from_secs(60);
/// Segment file names start so.
const SEGMENT_PREFIX: &str = "helios-comm-";

/// Removes the segment files in `dir` that `uid` owns and nobody touched for [`STALE_SEGMENT`]:
/// a rank 0 killed between creating and unlinking one leaves it, and /dev/shm is memory.
/// Returns how many went. A mapped file keeps its memory for whoever mapped it.
fn sweep_stale(dir: &Path, uid: u32) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let stale = |e: &std::fs::DirEntry| {
        let named = e.file_name().to_string_lossy().starts_with(SEGMENT_PREFIX);
        let meta = e.metadata().ok();
        let old = meta
            .as_ref()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_SEGMENT);
        named && old && meta.is_some_and(|m| m.is_file() && m.uid() == uid)
    };
    entries
        .filter_map(Result::ok)
        .filter(stale)
        .filter(|e| std::fs::remove_file(e.path()).is_ok())
        .count()
}

/// Rank 0's new segment file, unlinked when dropped.
struct Created {
    path: PathBuf,
    name: String,
    nonce: [u8; NONCE],
}

impl Created {
    fn new(dir: &Path, world: usize, slot: usize) -> Result<Self> {
        let layout = Layout::new(world, slot)?;
        let (mut id, mut nonce) = ([0u8; 16], [0u8; NONCE]);
        getrandom::fill(&mut id).map_err(|e| anyhow!("no randomness: {e}"))?;
        getrandom::fill(&mut nonce).map_err(|e| anyhow!("no randomness: {e}"))?;
        let name = format!(
            "{SEGMENT_PREFIX}{}",
            id.map(|b| format!("{b:02x}")).concat()
        );
        let path = dir.join(&name);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        let created = Self { path, name, nonce };
        let swept = sweep_stale(dir, file.metadata()?.uid());
        if swept > 0 {
            tracing::info!(
                "communicator: removed {swept} shared-memory segments a crashed rank 0 left in {}",
                dir.display()
            );
        }
        let mut header = [0u8; HEADER];
        header[..8].copy_from_slice(MAGIC);
        header[8..16].copy_from_slice(&(world as u64).to_le_bytes());
        header[16..24].copy_from_slice(&(slot as u64).to_le_bytes());
        header[32..64].copy_from_slice(&nonce);
        // Written out, not sparse: a /dev/shm too small for the segment fails here (no space)
        // instead of with SIGBUS when a rank first touches a page.
        file.write_all(&header)?;
        let zeros = vec![0u8; 1 << 16];
        let mut rest = layout.size - HEADER;
        while rest > 0 {
            let n = rest.min(zeros.len());
            file.write_all(&zeros[..n])
                .with_context(|| format!("filling {}", created.path.display()))?;
            rest -= n;
        }
        Ok(created)
    }
}

impl Drop for Created {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A rank's mapping of the segment and its place in the step sequence.
struct Segment {
    _map: MmapMut,
    base: *mut u8,
    layout: Layout,
    rank: usize,
    /// The last step this rank published.
    seq: u64,
}

// SAFETY: `base` points into `_map`, which the segment owns; the segment is used by one thread
// at a time (`&mut self`), and what other ranks do to the memory follows the protocol.
unsafe impl Send for Segment {}

impl Segment {
    /// Maps the segment at `path` after checking it is rank 0's for this world.
    fn open(path: &Path, nonce: &[u8; NONCE], world: usize, rank: usize) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        let meta = file.metadata()?;
        ensure!(
            meta.is_file() && meta.mode() & 0o077 == 0,
            "not a private file"
        );
        let len = usize::try_from(meta.len())?;
        ensure!(len >= HEADER, "{len} bytes, too small for a header");
        // SAFETY: a file private to this user, which only this mesh's ranks know and none
        // truncates; the memory is shared as the protocol says.
        let mut map = unsafe { MmapOptions::new().len(len).map_mut(&file)? };
        let h = &map[..HEADER];
        ensure!(&h[..8] == MAGIC, "not a Helios segment");
        ensure!(
            h[32..64] == nonce[..],
            "the segment's nonce is not rank 0's"
        );
        let word = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&h[at..at + 8]);
            usize::try_from(u64::from_le_bytes(w))
        };
        let layout = Layout::new(word(8)?, word(16)?)?;
        ensure!(
            layout.world == world,
            "a segment for {} ranks",
            layout.world
        );
        ensure!(len >= layout.size, "{len} bytes, short of {}", layout.size);
        let base = map.as_mut_ptr();
        Ok(Self {
            _map: map,
            base,
            layout,
            rank,
            seq: 0,
        })
    }

    fn counter(&self, r: usize) -> &AtomicU64 {
        // SAFETY: within the mapping (checked against the layout), 64-byte aligned.
        unsafe { AtomicU64::from_ptr(self.base.add(self.layout.counter(r)).cast()) }
    }

    /// One step (see the module docs): `fill` writes this rank's `len` bytes, then `read` gets
    /// every rank's, in rank order; every rank must pass the same `len`.
    fn step(
        &mut self,
        len: usize,
        tcp: &TcpCommunicator,
        abort: &MeshAbort,
        fill: impl FnOnce(&mut [u8]) -> Result<()>,
        mut read: impl FnMut(usize, &[u8]) -> Result<()>,
    ) -> Result<()> {
        ensure!(
            len <= self.layout.slot,
            "{len} bytes for a slot of {}",
            self.layout.slot
        );
        let k = self.seq + 1;
        let buffer = (k % 2) as usize;
        // SAFETY: this rank's slot of this buffer, which no rank reads until step k is
        // published and every rank finished reading at step k - 2.
        unsafe {
            let at = self.base.add(self.layout.slot(self.rank, buffer));
            at.cast::<u64>().write(len as u64);
            fill(std::slice::from_raw_parts_mut(at.add(LINE), len))?;
        }
        self.counter(self.rank).store(k, Ordering::Release);
        self.seq = k;
        self.wait_all(k, tcp, abort)?;
        for r in 0..self.layout.world {
            // SAFETY: rank r published step k (Acquire in `wait_all`) and writes this slot
            // again only after this rank publishes step k + 1.
            unsafe {
                let at = self.base.add(self.layout.slot(r, buffer));
                let got = at.cast::<u64>().read();
                ensure!(got == len as u64, "rank {r} sent {got} bytes, not {len}");
                read(r, std::slice::from_raw_parts(at.add(LINE), len))?;
            }
        }
        Ok(())
    }

    /// Waits until every rank has published step `k`.
    fn wait_all(&self, k: u64, tcp: &TcpCommunicator, abort: &MeshAbort) -> Result<()> {
        let start = Instant::now();
        let mut check_at = PEER_CHECK;
        for r in 0..self.layout.world {
            loop {
                let v = self.counter(r).load(Ordering::Acquire);
                ensure!(
                    k - 1 <= v && v <= k + 1,
                    "rank {r} is at step {v}, this rank at {k}"
                );
                if v >= k {
                    break;
                }
                ensure!(
                    !abort.is_aborted(),
                    "rank {}: the mesh was aborted",
                    self.rank
                );
                let waited = start.elapsed();
                if waited < SPIN {
                    std::hint::spin_loop();
                } else if waited < YIELD {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(NAP);
                }
                if waited >= check_at {
                    tcp.check_peers()
                        .with_context(|| format!("rank {} waiting for rank {r}", self.rank))?;
                    check_at = waited + PEER_CHECK;
                }
            }
        }
        Ok(())
    }

    /// The sum of every rank's `p` slices of `n` elements (`local` is this rank's), in global
    /// slice order from the first slice itself, chunked by element ranges.
    fn reduce(
        &mut self,
        local: &[f32],
        p: usize,
        n: usize,
        tcp: &TcpCommunicator,
        abort: &MeshAbort,
    ) -> Result<Vec<f32>> {
        let per = self.layout.slot / 4 / p;
        ensure!(per > 0, "{p} parts do not fit a slot");
        let mut acc = vec![0f32; n];
        for e0 in (0..n).step_by(per) {
            let e1 = n.min(e0 + per);
            let c = e1 - e0;
            let out = &mut acc[e0..e1];
            let fill = |dst: &mut [u8]| -> Result<()> {
                let dst = floats_mut(dst)?;
                for j in 0..p {
                    dst[j * c..(j + 1) * c].copy_from_slice(&local[j * n + e0..j * n + e1]);
                }
                Ok(())
            };
            self.step(p * c * 4, tcp, abort, fill, |r, src| {
                for (j, s) in floats(src)?.chunks_exact(c).enumerate() {
                    if r == 0 && j == 0 {
                        out.copy_from_slice(s);
                    } else {
                        out.iter_mut().zip(s).for_each(|(a, v)| *a += v);
                    }
                }
                Ok(())
            })?;
        }
        Ok(acc)
    }

    /// Every rank's `mine` (all of one length) in rank order, chunked by slots.
    fn gather(&mut self, mine: &[u8], tcp: &TcpCommunicator, abort: &MeshAbort) -> Result<Vec<u8>> {
        let n = mine.len();
        let mut all = vec![0u8; n * self.layout.world];
        for o0 in (0..n).step_by(self.layout.slot) {
            let o1 = n.min(o0 + self.layout.slot);
            let fill = |dst: &mut [u8]| -> Result<()> {
                dst.copy_from_slice(&mine[o0..o1]);
                Ok(())
            };
            self.step(o1 - o0, tcp, abort, fill, |r, src| {
                all[r * n + o0..r * n + o1].copy_from_slice(src);
                Ok(())
            })?;
        }
        Ok(all)
    }
}

/// The f32s of a slot's bytes (slots are 64-byte aligned, lengths whole elements).
fn floats(b: &[u8]) -> Result<&[f32]> {
    // SAFETY: every bit pattern is an f32.
    match unsafe { b.align_to::<f32>() } {
        (&[], f, &[]) => Ok(f),
        _ => bail!("a slot's bytes are not whole aligned f32s"),
    }
}

fn floats_mut(b: &mut [u8]) -> Result<&mut [f32]> {
    // SAFETY: every bit pattern is an f32.
    match unsafe { b.align_to_mut::<f32>() } {
        (&mut [], f, &mut []) => Ok(f),
        _ => bail!("a slot's bytes are not whole aligned f32s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::test_support::on_local_mesh;
    use std::sync::atomic::AtomicBool;
    use std::sync::mpsc;

    #[test]
    fn a_new_segment_sweeps_the_stale_ones_of_its_user_only() {
        let dir = tempfile::tempdir().unwrap();
        let old = std::time::SystemTime::now() - STALE_SEGMENT - Duration::from_secs(5);
        let file = |name: &str, modified: Option<std::time::SystemTime>| {
            let f = std::fs::File::create(dir.path().join(name)).unwrap();
            if let Some(t) = modified {
                f.set_modified(t).unwrap();
            }
        };
        file("helios-comm-left-by-a-crash", Some(old));
        file("helios-comm-attaching-now", None);
        file("someone-elses-file", Some(old));
        let created = Created::new(dir.path(), 2, 64).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mut want = vec![
            "helios-comm-attaching-now".to_string(),
            created.name.clone(),
            "someone-elses-file".to_string(),
        ];
        want.sort();
        assert_eq!(left, want);
        drop(created);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    fn opts(slot_bytes: usize) -> ShmOptions {
        ShmOptions {
            enabled: true,
            slot_bytes,
            ..ShmOptions::from_env()
        }
    }

    /// Runs `f(rank, communicator)` on `world` threads meshed over TCP, rank r attaching with
    /// `opts(r)`; results by rank.
    fn on_ranks<T: Send + 'static>(
        world: usize,
        opts: impl Fn(usize) -> ShmOptions + Send + Clone + 'static,
        f: impl Fn(usize, ShmCommunicator) -> T + Send + Clone + 'static,
    ) -> Vec<T> {
        on_local_mesh(world, move |r, tcp| {
            f(r, ShmCommunicator::attach_with(tcp, &opts(r)).unwrap())
        })
        .unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Values whose sum depends on the order of addition, with negative zeros.
    fn values(seed: usize, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| match i % 7 {
                0 => -0.0,
                _ => ((i * (seed + 1)) as f32).sin() * 10f32.powi((seed % 5) as i32 * 2 - 3),
            })
            .collect()
    }

    #[test]
    fn sums_are_bit_identical_to_tcp() {
        for world in 1..=3 {
            // A slot holds 256 f32s: most cases take several chunks; 300 parts take none (TCP).
            on_ranks(
                world,
                |_| opts(1024),
                move |rank, mut c| {
                    assert!(c.is_shared_memory());
                    for (p, n) in [
                        (1, 1),
                        (1, 256),
                        (2, 100),
                        (1, 1000),
                        (3, 777),
                        (4, 321),
                        (300, 2),
                    ] {
                        let v = (0..p).flat_map(|j| values(rank * p + j, n)).collect();
                        let t = Tensor::from_vec(v, (p, n), &Device::Cpu).unwrap();
                        let shm = c.all_reduce_parts(&t).unwrap();
                        let tcp = c.tcp.all_reduce_parts(&t).unwrap();
                        assert_eq!(
                            bits(&shm),
                            bits(&tcp),
                            "world {world}, rank {rank}, {p} x {n}"
                        );
                    }
                    let x = Tensor::from_vec(values(rank, 600), (20, 30), &Device::Cpu).unwrap();
                    let shm = c.all_reduce_sum(&x).unwrap();
                    assert_eq!(shm.dims(), &[20, 30]);
                    assert_eq!(bits(&shm), bits(&c.tcp.all_reduce_sum(&x).unwrap()));
                },
            );
        }
    }

    #[test]
    fn many_calls_in_a_row_use_both_buffers_in_turn() {
        on_ranks(
            3,
            |_| opts(256),
            |rank, mut c| {
                assert!(c.is_shared_memory());
                for call in 0..300 {
                    // 1 to 3 chunks of 64 f32s; integers, so the expected sum is exact.
                    let n = 1 + call % 150;
                    let x: Vec<f32> = (0..n)
                        .map(|i| (call * 1000 + i * 10 + rank) as f32)
                        .collect();
                    let x = Tensor::from_vec(x, n, &Device::Cpu).unwrap();
                    let got = c.all_reduce_sum(&x).unwrap().to_vec1::<f32>().unwrap();
                    let want: Vec<f32> = (0..n)
                        .map(|i| (3 * (call * 1000 + i * 10) + 3) as f32)
                        .collect();
                    assert_eq!(got, want, "rank {rank}, call {call}");
                    if call % 50 == 0 {
                        c.barrier().unwrap();
                    }
                }
            },
        );
    }

    #[test]
    fn all_gather_and_barrier_over_shared_memory() {
        let rank0_arrived = Arc::new(AtomicBool::new(false));
        on_ranks(
            3,
            |_| opts(64),
            move |rank, mut c| {
                assert!(c.is_shared_memory());
                for n in [0, 1, 64, 200] {
                    let mine: Vec<u8> = (0..n).map(|i| (rank * 100 + i) as u8).collect();
                    let want: Vec<u8> = (0..3)
                        .flat_map(|r| (0..n).map(move |i| (r * 100 + i) as u8))
                        .collect();
                    assert_eq!(
                        c.all_gather(&mine, &Device::Cpu).unwrap(),
                        want,
                        "{n} bytes"
                    );
                }
                if rank == 0 {
                    std::thread::sleep(Duration::from_millis(100));
                    rank0_arrived.store(true, Ordering::SeqCst);
                }
                c.barrier().unwrap();
                assert!(
                    rank0_arrived.load(Ordering::SeqCst),
                    "rank {rank} left the barrier early"
                );
            },
        );
    }

    #[test]
    fn a_rank_that_cannot_open_the_segment_keeps_the_mesh_on_tcp() {
        let (here, elsewhere) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let dirs = [here.path(), here.path(), elsewhere.path()].map(Path::to_owned);
        let dir = move |r: usize| ShmOptions {
            dir: dirs[r].clone(),
            ..opts(1024)
        };
        on_ranks(3, dir, |rank, mut c| {
            assert!(!c.is_shared_memory());
            let x = Tensor::new(&[rank as f32 + 1.0], &Device::Cpu).unwrap();
            assert_eq!(
                c.all_reduce_sum(&x).unwrap().to_vec1::<f32>().unwrap(),
                vec![6.0]
            );
        });
        assert_eq!(
            std::fs::read_dir(here.path()).unwrap().count(),
            0,
            "a segment was left"
        );
    }

    #[test]
    fn a_rank_that_asks_for_tcp_keeps_the_mesh_on_tcp() {
        let tcp_on_1 = |r: usize| ShmOptions {
            enabled: r != 1,
            ..opts(1024)
        };
        on_ranks(2, tcp_on_1, |_, mut c| {
            assert!(!c.is_shared_memory());
            c.barrier().unwrap();
        });
    }

    #[test]
    fn a_wrong_short_or_foreign_segment_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let created = Created::new(dir.path(), 2, 1024).unwrap();
        let (path, nonce) = (dir.path().join(&created.name), created.nonce);
        let open = |nonce: &[u8; NONCE], world| Segment::open(&path, nonce, world, 1).map(|_| ());
        let err = |r: Result<()>| format!("{:#}", r.unwrap_err());
        open(&nonce, 2).unwrap();
        let mut other = nonce;
        other[5] ^= 1;
        assert!(err(open(&other, 2)).contains("nonce"));
        assert!(err(open(&nonce, 3)).contains("for 2 ranks"));
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(HEADER as u64 + 100).unwrap();
        assert!(err(open(&nonce, 2)).contains("short of"));
        file.set_len(10).unwrap();
        assert!(err(open(&nonce, 2)).contains("too small"));
        file.set_len(0).unwrap();
        (&file).write_all(&[0xAB; 4096]).unwrap();
        assert!(err(open(&nonce, 2)).contains("not a Helios segment"));
        // Rank 0's magic and nonce over sizes that would overflow.
        let mut h = [0u8; HEADER];
        h[..8].copy_from_slice(MAGIC);
        h[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        h[32..64].copy_from_slice(&nonce);
        std::os::unix::fs::FileExt::write_all_at(&file, &h, 0).unwrap();
        assert!(err(open(&nonce, 2)).contains("a world of"));
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        assert!(err(open(&nonce, 2)).contains("not a private file"));
        drop(created);
        assert!(!path.exists(), "rank 0's segment outlived it");
        assert!(err(open(&nonce, 2)).contains("opening"));
    }

    /// Rank 0 of a shared-memory mesh of 2, blocked in a barrier on its own thread; the mesh's
    /// abort handle; rank 1.
    fn blocked_rank0() -> (mpsc::Receiver<Result<()>>, Arc<MeshAbort>, ShmCommunicator) {
        let mut comms = on_ranks(2, |_| opts(1024), |_, c| c);
        let (mut rank0, rank1) = (comms.remove(0), comms.remove(0));
        assert!(rank0.is_shared_memory());
        let abort = rank0.abort_handle();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || tx.send(rank0.barrier()));
        (rx, abort, rank1)
    }

    #[test]
    fn abort_frees_a_rank_blocked_on_a_silent_peer() {
        let (rx, abort, _silent) = blocked_rank0();
        std::thread::sleep(Duration::from_millis(100));
        assert!(rx.try_recv().is_err(), "the barrier passed without rank 1");
        abort.abort();
        let got = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("still blocked after abort");
        assert!(format!("{:#}", got.unwrap_err()).contains("aborted"));
    }

    #[test]
    fn a_peer_that_drops_its_connection_fails_the_waiter() {
        let (rx, _abort, rank1) = blocked_rank0();
        std::thread::sleep(Duration::from_millis(50));
        drop(rank1);
        let got = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("still blocked on a gone peer");
        assert!(format!("{:#}", got.unwrap_err()).contains("closed"));
    }
}
