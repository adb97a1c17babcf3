//! The CPU communicator: a full mesh of TCP connections between the worker processes.
//!
//! Each rank sends its partial tensor to every other rank and receives theirs, then sums all
//! contributions in rank order, so every rank computes the same floating-point sum. Sends run
//! on one long-lived thread per peer so that two ranks sending large tensors to each other never
//! deadlock on full socket buffers. For the tp degrees of one host (2 to 8) a mesh moves as many
//! bytes per rank as a ring, in one hop instead of 2(tp-1).
//!
//! Rendezvous: each worker binds its listener at start-up ([`TcpListenerSlot`]) and reports the
//! address; at Init every rank gets all addresses, dials the lower ranks and accepts the higher.
//! The listener lives as long as the worker: a replica that lost a rank builds a new mesh over
//! the same listeners, under a new **generation** number. A rank that is asked for a newer
//! generation gives up on the older one at once ([`MeshCall`]). [`MeshAbort`] closes a mesh's
//! sockets from outside, which frees a rank blocked in a collective on a peer that stopped
//! answering.
//!
//! Every connection opens with a handshake that authenticates both ends under the cluster
//! secret and binds the generation (see [`handshake`]): a process without the secret, a peer of
//! another generation, or a replayed handshake is dropped as it connects, whether or not a mesh
//! is being built (a thread accepts all the time), and never reaches a collective. It costs one
//! round trip and two HMACs per connection, nothing per all-reduce.

use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Tensor};
use helios_proto::auth::ClusterSecret;

use super::handshake::{self, Hello, MeshKey, ANSWER_LEN, HELLO_LEN};
use super::Communicator;

/// How long ranks wait for each other to join a mesh.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a peer may take over its part of the handshake.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes under way at once; connections beyond are closed at once (a flood of them ties
/// up no more than this many threads).
const MAX_PENDING_HANDSHAKES: usize = 16;

/// The listener a worker binds before it knows its rank; every generation's mesh accepts on it.
/// A thread accepts all the time and runs each connection's handshake: only peers that pass it
/// (the cluster secret, the generation and a rank the mesh being built waits for) reach
/// [`TcpCommunicator::connect`]; others are closed at once.
pub struct TcpListenerSlot {
    addr: SocketAddr,
    key: Arc<MeshKey>,
    expecting: Arc<Mutex<Option<Expecting>>>,
}

/// The mesh being built, as the accepting thread checks a hello against it.
struct Expecting {
    generation: u64,
    rank: usize,
    world: usize,
    joined: mpsc::Sender<(usize, TcpStream)>,
}

impl TcpListenerSlot {
    /// Binds `addr`; peers must prove `secret` (none: `--insecure`, nothing is proved).
    pub fn bind(addr: &str, secret: Option<ClusterSecret>) -> Result<Self> {
        let listener = TcpListener::bind(addr)
            .with_context(|| format!("binding the communicator to {addr}"))?;
        let slot = Self {
            addr: listener.local_addr()?,
            key: Arc::new(MeshKey::new(secret)?),
            expecting: Arc::new(Mutex::new(None)),
        };
        let (key, expecting) = (slot.key.clone(), slot.expecting.clone());
        std::thread::Builder::new()
            .name("comm-accept".into())
            .spawn(move || accept_loop(listener, key, expecting))?;
        Ok(slot)
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.addr)
    }
}

fn accept_loop(listener: TcpListener, key: Arc<MeshKey>, expecting: Arc<Mutex<Option<Expecting>>>) {
    let pending = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let peer = stream.peer_addr().map_or("?".into(), |a| a.to_string());
        if pending.fetch_add(1, Ordering::SeqCst) >= MAX_PENDING_HANDSHAKES {
            pending.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(%peer, "communicator: too many handshakes under way; closed");
            continue;
        }
        let (key, expecting, done) = (key.clone(), expecting.clone(), pending.clone());
        let spawned = std::thread::Builder::new()
            .name("comm-greet".into())
            .spawn(move || {
                if let Err(e) = greet(stream, &key, &expecting) {
                    tracing::warn!(%peer, "communicator: turned a peer away: {e:#}");
                }
                done.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            pending.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Reads a peer's hello; if it belongs to the mesh being built (same generation, a higher rank)
/// and proves the secret, hands the connection to that mesh.
fn greet(mut s: TcpStream, key: &MeshKey, expecting: &Mutex<Option<Expecting>>) -> Result<()> {
    s.set_read_timeout(Some(HELLO_TIMEOUT))?;
    s.set_write_timeout(Some(HELLO_TIMEOUT))?;
    let mut b = [0u8; HELLO_LEN];
    s.read_exact(&mut b).context("reading its hello")?;
    let theirs = Hello::decode(&b).context("not a Helios communicator hello")?;
    let (rank, joined) = {
        let guard = expecting.lock().map_err(|_| anyhow!("poisoned"))?;
        let Some(e) = guard.as_ref() else {
            bail!(
                "rank {} of generation {}: no mesh is being built",
                theirs.rank,
                theirs.generation
            );
        };
        if theirs.generation != e.generation {
            bail!(
                "rank {} of generation {}, not {}",
                theirs.rank,
                theirs.generation,
                e.generation
            );
        }
        if theirs.rank <= e.rank || theirs.rank >= e.world {
            bail!("unexpected hello from rank {}", theirs.rank);
        }
        (e.rank, e.joined.clone())
    };
    let mine = Hello::new(theirs.generation, rank)?;
    handshake::answer(&mut s, key, &mine, &theirs)?;
    s.set_read_timeout(None)?;
    s.set_write_timeout(None)?;
    // The mesh may have given up meanwhile; then the connection just closes.
    let _ = joined.send((theirs.rank, s));
    Ok(())
}

/// Which mesh to build: this rank's place, every rank's address, the generation, and the
/// newest generation this worker has been asked for (when it passes `generation`, the attempt
/// is abandoned).
pub struct MeshCall<'a> {
    pub rank: usize,
    pub peer_addrs: &'a [String],
    pub generation: u64,
    pub newest: &'a AtomicU64,
}

impl MeshCall<'_> {
    fn superseded(&self) -> bool {
        self.newest.load(Ordering::SeqCst) > self.generation
    }

    /// Whether building this mesh should go on: not superseded, `deadline` not passed.
    fn check(&self, deadline: Instant) -> Result<()> {
        if self.superseded() {
            bail!("generation {} was superseded", self.generation);
        }
        if Instant::now() > deadline {
            bail!("timed out");
        }
        Ok(())
    }
}

/// Closes every socket of a mesh, from any thread: a rank blocked in a collective (a peer
/// stopped, not gone) returns with an error at once. It also raises a flag for the waits that
/// are not on a socket (the shared-memory path, `comm::shm`).
#[derive(Default)]
pub struct MeshAbort {
    streams: Vec<TcpStream>,
    aborted: AtomicBool,
}

impl MeshAbort {
    pub fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        for s in &self.streams {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    pub fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::Relaxed)
    }
}

struct Peer {
    reader: BufReader<TcpStream>,
    sender: mpsc::Sender<Arc<Vec<u8>>>,
    acks: mpsc::Receiver<std::io::Result<()>>,
    _thread: JoinHandle<()>,
}

pub struct TcpCommunicator {
    rank: usize,
    world: usize,
    /// Indexed by rank; `None` at our own rank.
    peers: Vec<Option<Peer>>,
    recv_buf: Vec<u8>,
    abort: Arc<MeshAbort>,
}

impl TcpCommunicator {
    /// Joins the mesh of `call.generation`: dials every lower rank, accepts every higher one.
    pub fn connect(slot: &TcpListenerSlot, call: &MeshCall) -> Result<TcpCommunicator> {
        let (rank, world) = (call.rank, call.peer_addrs.len());
        if rank >= world {
            bail!("rank {rank} is outside a world of {world}");
        }
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let mut streams: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        for (r, addr) in call.peer_addrs.iter().enumerate().take(rank) {
            let s = dial(addr, r, call, &slot.key, deadline)
                .with_context(|| format!("rank {rank} dialing rank {r} at {addr}"))?;
            streams[r] = Some(s);
        }
        if rank + 1 < world {
            accept_higher(slot, call, deadline, &mut streams)
                .with_context(|| format!("rank {rank} waiting for higher ranks to dial in"))?;
        }
        let abort = Arc::new(MeshAbort {
            streams: streams
                .iter()
                .flatten()
                .map(TcpStream::try_clone)
                .collect::<std::io::Result<_>>()?,
            aborted: AtomicBool::new(false),
        });
        let peers = streams
            .into_iter()
            .map(|s| s.map(Peer::start).transpose())
            .collect::<Result<Vec<_>>>()?;
        Ok(TcpCommunicator {
            rank,
            world,
            peers,
            recv_buf: Vec::new(),
            abort,
        })
    }

    /// Closes this mesh's sockets from elsewhere (see [`MeshAbort`]).
    pub fn abort_handle(&self) -> Arc<MeshAbort> {
        self.abort.clone()
    }

    /// Errs if a peer's connection has ended (end of stream, or an error), without blocking or
    /// taking anything from it: the shared-memory path waits on its peers outside the sockets
    /// and asks this now and then, so that a rank whose peer died fails instead of hanging.
    pub(super) fn check_peers(&self) -> Result<()> {
        for (r, p) in self.peers.iter().enumerate() {
            let Some(p) = p else { continue };
            let s = p.reader.get_ref();
            // Non-blocking for one peek (no send is under way: sends finish within `exchange`).
            s.set_nonblocking(true)?;
            let peeked = s.peek(&mut [0u8; 1]);
            s.set_nonblocking(false)?;
            match peeked {
                Ok(0) => bail!("rank {r} closed its connection"),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e).with_context(|| format!("rank {r}'s connection")),
            }
        }
        Ok(())
    }

    /// Sends `bytes` to every peer and hands each peer's equally long message to `f`, in rank
    /// order (our own rank gets `bytes` itself).
    fn exchange(&mut self, bytes: Vec<u8>, mut f: impl FnMut(&[u8])) -> Result<()> {
        let n = bytes.len();
        let bytes = Arc::new(bytes);
        for p in self.peers.iter().flatten() {
            p.sender
                .send(bytes.clone())
                .context("a communicator send thread is gone")?;
        }
        self.recv_buf.resize(n, 0);
        for r in 0..self.world {
            match &mut self.peers[r] {
                None => f(&bytes),
                Some(p) => {
                    p.reader
                        .read_exact(&mut self.recv_buf)
                        .with_context(|| format!("rank {} receiving from rank {r}", self.rank))?;
                    f(&self.recv_buf);
                }
            }
        }
        for (r, p) in self.peers.iter().enumerate() {
            if let Some(p) = p {
                p.acks
                    .recv()
                    .context("a communicator send thread is gone")?
                    .with_context(|| format!("rank {} sending to rank {r}", self.rank))?;
            }
        }
        Ok(())
    }
}

impl Peer {
    fn start(stream: TcpStream) -> Result<Peer> {
        stream.set_nodelay(true)?;
        let mut writer = stream.try_clone()?;
        let (tx, rx) = mpsc::channel::<Arc<Vec<u8>>>();
        let (ack_tx, acks) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("comm-send".into())
            .spawn(move || {
                for msg in rx {
                    if ack_tx.send(writer.write_all(&msg)).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Peer {
            reader: BufReader::with_capacity(1 << 16, stream),
            sender: tx,
            acks,
            _thread: thread,
        })
    }
}

/// Waits for every higher rank of `call`'s mesh to dial in and pass the handshake (the
/// accepting thread runs it; see [`TcpListenerSlot`]).
fn accept_higher(
    slot: &TcpListenerSlot,
    call: &MeshCall,
    deadline: Instant,
    streams: &mut [Option<TcpStream>],
) -> Result<()> {
    let (tx, rx) = mpsc::channel();
    let expect = Expecting {
        generation: call.generation,
        rank: call.rank,
        world: streams.len(),
        joined: tx,
    };
    *slot.expecting.lock().map_err(|_| anyhow!("poisoned"))? = Some(expect);
    let result = (|| {
        let mut missing = streams.len() - call.rank - 1;
        while missing > 0 {
            call.check(deadline)?;
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok((r, s)) if streams[r].is_none() => {
                    streams[r] = Some(s);
                    missing -= 1;
                }
                Ok((r, _)) => tracing::warn!("rank {r} dialed in twice; kept the first"),
                Err(_) => {}
            }
        }
        Ok(())
    })();
    // Stop expecting, unless a newer attempt already took the slot.
    if let Ok(mut e) = slot.expecting.lock() {
        if e.as_ref().is_some_and(|e| e.generation == call.generation) {
            *e = None;
        }
    }
    result
}

/// Dials rank `r` until it accepts this rank into the mesh of `call.generation` (it turns
/// away, by closing, a dial it does not expect yet: it may still be leaving an older mesh).
fn dial(
    addr: &str,
    r: usize,
    call: &MeshCall,
    key: &MeshKey,
    deadline: Instant,
) -> Result<TcpStream> {
    loop {
        call.check(deadline)?;
        let err = match try_dial(addr, r, call, key, deadline) {
            Ok(s) => return Ok(s),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(err);
        }
        tracing::debug!("retrying {addr}: {err:#}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn try_dial(
    addr: &str,
    r: usize,
    call: &MeshCall,
    key: &MeshKey,
    deadline: Instant,
) -> Result<TcpStream> {
    let mut s = TcpStream::connect(addr)?;
    let mine = Hello::new(call.generation, call.rank)?;
    s.write_all(&mine.encode())?;
    // The answer comes once rank `r` is building this mesh: wait for it in slices, so that a
    // newer generation or the deadline ends the wait.
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut b = [0u8; ANSWER_LEN];
    let mut got = 0;
    while got < ANSWER_LEN {
        match s.read(&mut b[got..]) {
            Ok(0) => bail!("turned away"),
            Ok(n) => got += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if call.superseded() || Instant::now() >= deadline {
                    bail!("no answer");
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    let proof = handshake::check_answer(key, &mine, &b, r)?;
    s.write_all(&proof)?;
    s.set_read_timeout(None)?;
    Ok(s)
}

impl Communicator for TcpCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, x: &Tensor) -> Result<Tensor> {
        self.all_reduce_parts(&x.unsqueeze(0)?)
    }

    /// Every rank sends all its slices; each rank adds all `P_local · world` slices in global
    /// order, starting from the first slice itself (as `sum_in_order` does at tp 1).
    fn all_reduce_parts(&mut self, parts: &Tensor) -> Result<Tensor> {
        if parts.dtype() != DType::F32 {
            bail!(
                "the CPU communicator sums f32 tensors, got {:?}",
                parts.dtype()
            );
        }
        let shape = parts.get(0)?.shape().clone();
        let n = shape.elem_count();
        let local = parts.flatten_all()?.to_vec1::<f32>()?;
        let mut bytes = Vec::with_capacity(local.len() * 4);
        for v in &local {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        let mut sum: Option<Vec<f32>> = None;
        self.exchange(bytes, |msg| {
            for slice in msg.chunks_exact(n * 4) {
                let values = slice
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
                match &mut sum {
                    None => sum = Some(values.collect()),
                    Some(acc) => acc.iter_mut().zip(values).for_each(|(a, v)| *a += v),
                }
            }
        })?;
        let sum = sum.unwrap_or_else(|| vec![0.0; n]);
        Ok(Tensor::from_vec(sum, shape, parts.device())?)
    }

    fn barrier(&mut self) -> Result<()> {
        self.exchange(vec![0u8; 1], |_| {})
    }

    fn all_gather(&mut self, mine: &[u8], _device: &candle_core::Device) -> Result<Vec<u8>> {
        let mut all = Vec::with_capacity(mine.len() * self.world);
        self.exchange(mine.to_vec(), |msg| all.extend_from_slice(msg))?;
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::test_support::{local_mesh, local_mesh_with, on_local_mesh};
    use candle_core::Device;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Runs `f(rank, communicator)` on `world` threads joined in a mesh; results by rank.
    fn on_ranks<T: Send + 'static>(
        world: usize,
        f: impl Fn(usize, TcpCommunicator) -> T + Send + Clone + 'static,
    ) -> Vec<T> {
        on_local_mesh(world, f).unwrap()
    }

    #[test]
    fn three_ranks_get_identical_sums() {
        let world = 3;
        let results = on_ranks(world, |rank, mut c| {
            // Values whose float sum depends on the order of addition.
            let v: Vec<f32> = (0..100_000)
                .map(|i| ((i * (rank + 1)) as f32).sin() * 10f32.powi(rank as i32 * 3))
                .collect();
            let t = Tensor::from_vec(v, (1000, 100), &Device::Cpu).unwrap();
            c.barrier().unwrap();
            let s = c.all_reduce_sum(&t).unwrap();
            s.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        });
        let bits = |v: &Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&results[0]), bits(&results[1]));
        assert_eq!(bits(&results[0]), bits(&results[2]));
        // And it is the sum: spot-check one element against a rank-order sum.
        let i = 12345;
        let expect: f32 = (0..world)
            .map(|r| ((i * (r + 1)) as f32).sin() * 10f32.powi(r as i32 * 3))
            .reduce(|a, b| a + b)
            .unwrap();
        assert_eq!(results[0][i], expect);
    }

    #[test]
    fn broadcast_from_rank0_gives_every_rank_rank_0s_values() {
        let results = on_ranks(3, |rank, mut c| {
            let cpu = Device::Cpu;
            let limit = crate::comm::BROADCAST_LIMIT;
            // Other ranks pass values of their own; only rank 0's count.
            let mut v = if rank == 0 {
                vec![0, 7, 151_935, limit - 1]
            } else {
                vec![rank as u32 * 1000 + 1; 4]
            };
            c.broadcast_from_rank0(&mut v, &cpu).unwrap();
            // A value f32 cannot hold exactly fails on every rank alike, not on rank 0 alone,
            // and leaves the mesh in step for the next collective.
            let mut big = vec![if rank == 0 { limit + 1 } else { 0 }, 3];
            let refused = c.broadcast_from_rank0(&mut big, &cpu).is_err();
            let mut after = vec![if rank == 0 { 42 } else { 0 }];
            c.broadcast_from_rank0(&mut after, &cpu).unwrap();
            (v, refused, after)
        });
        for (rank, (v, refused, after)) in results.into_iter().enumerate() {
            assert_eq!(v, vec![0, 7, 151_935, (1 << 24) - 1], "rank {rank}");
            assert!(refused, "rank {rank} took a value of 2^24 + 1");
            assert_eq!(after, vec![42], "rank {rank}");
        }
    }

    #[test]
    fn all_gather_gives_every_rank_every_ranks_bytes_in_rank_order() {
        /// The trait's default gather (through the sum), over the same mesh.
        struct ViaSum(TcpCommunicator);
        impl Communicator for ViaSum {
            fn rank(&self) -> usize {
                self.0.rank()
            }
            fn world_size(&self) -> usize {
                self.0.world_size()
            }
            fn all_reduce_sum(&mut self, x: &Tensor) -> Result<Tensor> {
                self.0.all_reduce_sum(x)
            }
            fn barrier(&mut self) -> Result<()> {
                self.0.barrier()
            }
        }
        let results = on_ranks(3, |rank, c| {
            let mine: Vec<u8> = (0..5).map(|i| (rank * 100 + i * 31) as u8).collect();
            let mut c = ViaSum(c);
            let via_sum = c.all_gather(&mine, &Device::Cpu).unwrap();
            let direct = c.0.all_gather(&mine, &Device::Cpu).unwrap();
            (via_sum, direct)
        });
        let want: Vec<u8> = (0..3)
            .flat_map(|r| (0..5).map(move |i| (r * 100 + i * 31) as u8))
            .collect();
        for (rank, (via_sum, direct)) in results.into_iter().enumerate() {
            assert_eq!(direct, want, "rank {rank}");
            assert_eq!(via_sum, want, "rank {rank}, through the sum");
        }
    }

    #[test]
    fn parts_are_added_in_global_order_like_one_rank_would() {
        // Four slices whose float sum depends on the order of addition.
        let slice = |j: usize| -> Vec<f32> {
            (0..1000)
                .map(|i| ((i * (j + 3)) as f32).cos() * 10f32.powi(j as i32 * 2 - 3))
                .collect()
        };
        let all: Vec<f32> = (0..4).flat_map(slice).collect();
        let one_rank =
            crate::comm::sum_in_order(&Tensor::from_vec(all, (4, 1000), &Device::Cpu).unwrap())
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
        let results = on_ranks(2, move |rank, mut c| {
            let mine: Vec<f32> = (2 * rank..2 * rank + 2).flat_map(slice).collect();
            let t = Tensor::from_vec(mine, (2, 1000), &Device::Cpu).unwrap();
            c.all_reduce_parts(&t).unwrap().to_vec1::<f32>().unwrap()
        });
        for got in results {
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&one_rank));
        }
    }

    #[test]
    fn a_new_generation_meshes_over_the_same_listeners_and_turns_the_old_one_away() {
        let seats = local_mesh(2).unwrap();
        let newest = Arc::new(AtomicU64::new(0));
        let handles: Vec<_> = seats
            .into_iter()
            .map(|seat| {
                let newest = newest.clone();
                std::thread::spawn(move || {
                    let first = seat.join_generation(0, &newest).unwrap();
                    drop(first);
                    newest.store(1, Ordering::SeqCst);
                    let mut second = seat.join_generation(1, &newest).unwrap();
                    let x = Tensor::new(&[seat.rank() as f32 + 1.0], &Device::Cpu).unwrap();
                    let sum = second.all_reduce_sum(&x).unwrap().to_vec1::<f32>().unwrap();
                    // A rank that asks for the mesh of a superseded generation gives up.
                    let stale = seat.join_generation(0, &newest);
                    (sum, stale.is_err())
                })
            })
            .collect();
        for h in handles {
            let (sum, stale_refused) = h.join().unwrap();
            assert_eq!(sum, vec![3.0]);
            assert!(stale_refused);
        }
    }

    #[test]
    fn a_peer_of_another_generation_is_turned_away() {
        let seats = local_mesh(2).unwrap();
        let addr0 = seats[0].local_addr_for_tests();
        let mut seats = seats.into_iter();
        let (seat0, seat1) = (seats.next().unwrap(), seats.next().unwrap());
        let rank0 = std::thread::spawn(move || seat0.join_generation(5, &AtomicU64::new(5)));
        // A stale rank 1 (generation 4) says hello first: rank 0 closes on it.
        let mut stale = TcpStream::connect(&addr0).unwrap();
        stale
            .write_all(&Hello::new(4, 1).unwrap().encode())
            .unwrap();
        let mut b = [0u8; 1];
        stale
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        assert_eq!(
            stale.read(&mut b).unwrap_or(0),
            0,
            "a stale peer was answered"
        );
        // The rank 1 of generation 5 joins.
        let mut c1 = seat1.join_generation(5, &AtomicU64::new(5)).unwrap();
        let mut c0 = rank0.join().unwrap().unwrap();
        let t = std::thread::spawn(move || c0.barrier());
        c1.barrier().unwrap();
        t.join().unwrap().unwrap();
    }

    #[test]
    fn a_peer_without_the_secret_is_dropped_and_the_mesh_forms_and_runs() {
        let secret = || Some(ClusterSecret::new("the secret of this cluster").unwrap());
        let seats = local_mesh_with(2, secret).unwrap();
        let addr0 = seats[0].local_addr_for_tests();
        // An impostor of rank 1 under another secret, dialing while rank 0 waits for rank 1.
        let impostor_slot = TcpListenerSlot::bind(
            "127.0.0.1:0",
            Some(ClusterSecret::new("a guess at it!!!!").unwrap()),
        )
        .unwrap();
        let mut seats = seats.into_iter();
        let (seat0, seat1) = (seats.next().unwrap(), seats.next().unwrap());
        let rank0 = std::thread::spawn(move || seat0.join_generation(3, &AtomicU64::new(3)));
        let newest = AtomicU64::new(3);
        let call = MeshCall {
            rank: 1,
            peer_addrs: &[addr0.clone(), "127.0.0.1:9".into()],
            generation: 3,
            newest: &newest,
        };
        let deadline = Instant::now() + Duration::from_secs(2);
        let err = try_dial(&addr0, 0, &call, &impostor_slot.key, deadline).unwrap_err();
        assert!(
            format!("{err:#}").contains("did not prove the cluster secret"),
            "{err:#}"
        );
        // One that sends garbage, and one that replays a real rank's hello bytes without
        // knowing the secret, are closed as well.
        let mut garbage = TcpStream::connect(&addr0).unwrap();
        garbage.write_all(&[0xAB; HELLO_LEN]).unwrap();
        let mut b = [0u8; 1];
        garbage
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        assert_eq!(garbage.read(&mut b).unwrap_or(0), 0, "garbage was answered");
        // The real rank 1 joins, and the mesh sums.
        let mut c1 = seat1.join_generation(3, &AtomicU64::new(3)).unwrap();
        let mut c0 = rank0.join().unwrap().unwrap();
        let x = Tensor::new(&[1.0f32], &Device::Cpu).unwrap();
        let t =
            std::thread::spawn(move || c0.all_reduce_sum(&x).unwrap().to_vec1::<f32>().unwrap());
        let y = Tensor::new(&[2.0f32], &Device::Cpu).unwrap();
        assert_eq!(
            c1.all_reduce_sum(&y).unwrap().to_vec1::<f32>().unwrap(),
            vec![3.0]
        );
        assert_eq!(t.join().unwrap(), vec![3.0]);
    }

    #[test]
    fn abort_frees_a_rank_blocked_on_a_silent_peer() {
        let seats = local_mesh(2).unwrap();
        let handles: Vec<_> = seats
            .into_iter()
            .map(|seat| std::thread::spawn(move || seat.join().unwrap()))
            .collect();
        let mut comms: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let _silent = comms.pop().unwrap(); // rank 1 never enters the collective
        let mut rank0 = comms.pop().unwrap();
        let abort = rank0.abort_handle();
        let blocked = std::thread::spawn(move || rank0.barrier());
        std::thread::sleep(Duration::from_millis(100));
        abort.abort();
        assert!(blocked.join().unwrap().is_err());
    }
}
