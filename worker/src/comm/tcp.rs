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

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};

use super::Communicator;

/// The listener a worker binds before it knows its rank.
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
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

impl TcpCommunicator {
    /// Joins the mesh: dials every lower rank, accepts every higher one.
    pub fn connect(
        slot: &TcpListenerSlot,
        rank: usize,
        peer_addrs: &[String],
    ) -> Result<TcpCommunicator> {
        let world = peer_addrs.len();
        if rank >= world {
            bail!("rank {rank} is outside a world of {world}");
        }
        let mut streams: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        for (r, addr) in peer_addrs.iter().enumerate().take(rank) {
            let mut s =
                dial(addr).with_context(|| format!("rank {rank} dialing rank {r} at {addr}"))?;
            s.write_all(&(rank as u32).to_le_bytes())?;
            streams[r] = Some(s);
        }
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        for _ in rank + 1..world {
            let mut s = accept_until(&slot.listener, deadline)
                .with_context(|| format!("rank {rank} waiting for higher ranks to dial in"))?;
            let mut b = [0u8; 4];
            s.read_exact(&mut b)?;
            let r = u32::from_le_bytes(b) as usize;
            if r <= rank || r >= world || streams[r].is_some() {
                bail!("rank {rank}: unexpected hello from rank {r}");
            }
            streams[r] = Some(s);
        }
        let peers = streams
            .into_iter()
            .map(|s| s.map(Peer::start).transpose())
            .collect::<Result<Vec<_>>>()?;
        Ok(TcpCommunicator {
            rank,
            world,
            peers,
            recv_buf: Vec::new(),
        })
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

fn accept_until(listener: &TcpListener, deadline: Instant) -> Result<TcpStream> {
    listener.set_nonblocking(true)?;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => bail!("timed out"),
            Err(e) => return Err(e.into()),
        }
    }
}

fn dial(addr: &str) -> Result<TcpStream> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("retrying {addr}: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e.into()),
        }
    }
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
}
