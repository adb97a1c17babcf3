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
//! the same listeners, under a new **generation** number. Every connection opens with a hello
//! (magic, generation, rank) that the accepting rank answers in kind, so a peer of another
//! generation (a stale rank, a late dial from an abandoned attempt) is turned away, and a rank
//! that is asked for a newer generation gives up on the older one at once ([`MeshCall`]).
//! [`MeshAbort`] closes a mesh's sockets from outside, which frees a rank blocked in a
//! collective on a peer that stopped answering.

use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};

use super::Communicator;

/// The listener a worker binds before it knows its rank; every generation's mesh accepts on it.
pub struct TcpListenerSlot {
    listener: TcpListener,
}

impl TcpListenerSlot {
    pub fn bind(addr: &str) -> Result<Self> {
        let listener = TcpListener::bind(addr)
            .with_context(|| format!("binding the communicator to {addr}"))?;
        Ok(Self { listener })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }
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
}

/// Closes every socket of a mesh, from any thread: a rank blocked in a collective (a peer
/// stopped, not gone) returns with an error at once.
#[derive(Default)]
pub struct MeshAbort {
    streams: Vec<TcpStream>,
}

impl MeshAbort {
    pub fn abort(&self) {
        for s in &self.streams {
            let _ = s.shutdown(Shutdown::Both);
        }
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

/// How long ranks wait for each other to join a mesh.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a dialer may take to say hello once accepted.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Opens every hello, both ways.
const MAGIC: [u8; 4] = *b"HLX1";
const HELLO_LEN: usize = 16;

fn hello(generation: u64, rank: usize) -> [u8; HELLO_LEN] {
    let mut b = [0u8; HELLO_LEN];
    b[..4].copy_from_slice(&MAGIC);
    b[4..12].copy_from_slice(&generation.to_le_bytes());
    b[12..].copy_from_slice(&(rank as u32).to_le_bytes());
    b
}

/// (generation, rank) of a hello, if it is one.
fn parse_hello(b: &[u8; HELLO_LEN]) -> Option<(u64, usize)> {
    if b[..4] != MAGIC {
        return None;
    }
    let generation = u64::from_le_bytes(b[4..12].try_into().ok()?);
    let rank = u32::from_le_bytes(b[12..].try_into().ok()?) as usize;
    Some((generation, rank))
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
            let s = dial(addr, r, call, deadline)
                .with_context(|| format!("rank {rank} dialing rank {r} at {addr}"))?;
            streams[r] = Some(s);
        }
        let mut missing = world - rank - 1;
        while missing > 0 {
            let s = accept_until(&slot.listener, call, deadline)
                .with_context(|| format!("rank {rank} waiting for higher ranks to dial in"))?;
            match greet(s, call, &streams) {
                Ok((r, s)) => {
                    streams[r] = Some(s);
                    missing -= 1;
                }
                Err(e) => tracing::warn!("rank {rank}: turned a peer away: {e:#}"),
            }
        }
        let abort = Arc::new(MeshAbort {
            streams: streams
                .iter()
                .flatten()
                .map(TcpStream::try_clone)
                .collect::<std::io::Result<_>>()?,
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

/// Reads a higher rank's hello and answers it: the rank it dialed from, if it belongs in this
/// mesh (same generation, a higher rank not yet joined).
fn greet(
    mut s: TcpStream,
    call: &MeshCall,
    joined: &[Option<TcpStream>],
) -> Result<(usize, TcpStream)> {
    s.set_read_timeout(Some(HELLO_TIMEOUT))?;
    let mut b = [0u8; HELLO_LEN];
    s.read_exact(&mut b).context("reading its hello")?;
    let (generation, r) = parse_hello(&b).context("not a Helios communicator hello")?;
    if generation != call.generation {
        bail!(
            "rank {r} of generation {generation}, not {}",
            call.generation
        );
    }
    if r <= call.rank || r >= joined.len() || joined[r].is_some() {
        bail!("unexpected hello from rank {r}");
    }
    s.write_all(&hello(call.generation, call.rank))?;
    s.set_read_timeout(None)?;
    Ok((r, s))
}

fn accept_until(listener: &TcpListener, call: &MeshCall, deadline: Instant) -> Result<TcpStream> {
    listener.set_nonblocking(true)?;
    loop {
        if call.superseded() {
            bail!("generation {} was superseded", call.generation);
        }
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => bail!("timed out"),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Dials rank `r` until it accepts this rank into the mesh of `call.generation` (it turns
/// away, by closing, a dial it does not expect yet: it may still be leaving an older mesh).
fn dial(addr: &str, r: usize, call: &MeshCall, deadline: Instant) -> Result<TcpStream> {
    loop {
        if call.superseded() {
            bail!("generation {} was superseded", call.generation);
        }
        let err = match try_dial(addr, r, call, deadline) {
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

fn try_dial(addr: &str, r: usize, call: &MeshCall, deadline: Instant) -> Result<TcpStream> {
    let mut s = TcpStream::connect(addr)?;
    s.write_all(&hello(call.generation, call.rank))?;
    // The answer comes once rank `r` reaches its accept loop: wait for it in slices, so that
    // a newer generation or the deadline ends the wait.
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut b = [0u8; HELLO_LEN];
    let mut got = 0;
    while got < HELLO_LEN {
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
    match parse_hello(&b) {
        Some((g, rank)) if g == call.generation && rank == r => {}
        other => bail!(
            "answered {other:?}, expected rank {r} of generation {}",
            call.generation
        ),
    }
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::test_support::local_mesh;
    use candle_core::Device;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Runs `f(rank, communicator)` on `world` threads joined in a mesh; results by rank.
    fn on_ranks<T: Send + 'static>(
        world: usize,
        f: impl Fn(usize, TcpCommunicator) -> T + Send + Clone + 'static,
    ) -> Vec<T> {
        let handles: Vec<_> = local_mesh(world)
            .unwrap()
            .into_iter()
            .map(|seat| {
                let f = f.clone();
                std::thread::spawn(move || f(seat.rank(), seat.join().unwrap()))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
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
        stale.write_all(&hello(4, 1)).unwrap();
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
