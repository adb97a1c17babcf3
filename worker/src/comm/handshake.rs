//! The CPU communicator's handshake: how two ranks that meet on a TCP connection prove to each
//! other that they hold the cluster secret and belong to the same generation of the same mesh.
//!
//! ```text
//! dialer (higher rank)                        acceptor (lower rank)
//!   hello: magic, generation, rank, nonce_d  ->
//!                                            <-  hello: magic, generation, rank, nonce_a
//!                                                + accept tag = HMAC(accept, gen, ranks, nonces)
//!   dial tag = HMAC(dial, gen, ranks, nonces) ->
//! ```
//!
//! Each side's tag covers the generation, both ranks and both fresh nonces under the secret, so
//! a recorded handshake is worthless (the other side's nonce is new each time), a peer of
//! another generation cannot pass for this one, and neither side learns anything it could
//! replay. Workers started `--insecure` (no secret) run the same handshake under a well-known
//! key: it still checks generation and rank, and proves nothing.

use std::io::{Read, Write};
use std::net::TcpStream;

use anyhow::{bail, Context, Result};
use helios_proto::auth::ClusterSecret;

/// Opens every hello.
const MAGIC: [u8; 4] = *b"HLX2";
pub const HELLO_LEN: usize = 32;
pub const TAG_LEN: usize = 32;
/// The acceptor's answer: its hello and its tag.
pub const ANSWER_LEN: usize = HELLO_LEN + TAG_LEN;

/// The key both sides' tags are made with.
pub struct MeshKey(ClusterSecret);

/// The key of workers without a secret: public, so it proves nothing.
const INSECURE_KEY: &str = "helios mesh without a cluster secret";

impl MeshKey {
    pub fn new(secret: Option<ClusterSecret>) -> Result<Self> {
        Ok(Self(match secret {
            Some(s) => s,
            None => ClusterSecret::new(INSECURE_KEY)?,
        }))
    }

    fn tag(&self, role: &[u8], generation: u64, from: &Hello, to: &Hello) -> [u8; TAG_LEN] {
        with_parts(role, generation, from, to, |parts| self.0.mac(parts))
    }

    fn verify(&self, role: &[u8], generation: u64, from: &Hello, to: &Hello, tag: &[u8]) -> bool {
        with_parts(role, generation, from, to, |parts| {
            self.0.verify(parts, tag)
        })
    }
}

/// What a tag covers: its role, the generation, the sender's and the receiver's rank, the
/// receiver's nonce (the challenge) and the sender's.
fn with_parts<T>(
    role: &[u8],
    generation: u64,
    from: &Hello,
    to: &Hello,
    f: impl FnOnce(&[&[u8]]) -> T,
) -> T {
    let g = generation.to_le_bytes();
    let (fr, tr) = (
        (from.rank as u64).to_le_bytes(),
        (to.rank as u64).to_le_bytes(),
    );
    f(&[role, &g, &fr, &tr, &to.nonce, &from.nonce])
}

const ACCEPT: &[u8] = b"helios mesh accept v2";
const DIAL: &[u8] = b"helios mesh dial v2";

/// One side's opening: who it is and a fresh nonce.
#[derive(Debug, Clone)]
pub struct Hello {
    pub generation: u64,
    pub rank: usize,
    nonce: [u8; 16],
}

impl Hello {
    pub fn new(generation: u64, rank: usize) -> Result<Self> {
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
        Ok(Self {
            generation,
            rank,
            nonce,
        })
    }

    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[..4].copy_from_slice(&MAGIC);
        b[4..12].copy_from_slice(&self.generation.to_le_bytes());
        b[12..16].copy_from_slice(&(self.rank as u32).to_le_bytes());
        b[16..].copy_from_slice(&self.nonce);
        b
    }

    /// A hello, if `b` is one.
    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != HELLO_LEN || b[..4] != MAGIC {
            return None;
        }
        Some(Self {
            generation: u64::from_le_bytes(b[4..12].try_into().ok()?),
            rank: u32::from_le_bytes(b[12..16].try_into().ok()?) as usize,
            nonce: b[16..].try_into().ok()?,
        })
    }
}

/// The acceptor, once the dialer's hello (`theirs`) was read and belongs here: answers with
/// `mine` and its tag, then reads and checks the dialer's tag.
pub fn answer(s: &mut TcpStream, key: &MeshKey, mine: &Hello, theirs: &Hello) -> Result<()> {
    let mut out = [0u8; ANSWER_LEN];
    out[..HELLO_LEN].copy_from_slice(&mine.encode());
    out[HELLO_LEN..].copy_from_slice(&key.tag(ACCEPT, mine.generation, mine, theirs));
    s.write_all(&out).context("answering its hello")?;
    let mut tag = [0u8; TAG_LEN];
    s.read_exact(&mut tag).context("reading its proof")?;
    if !key.verify(DIAL, mine.generation, theirs, mine, &tag) {
        bail!(
            "a peer saying it is rank {} did not prove the cluster secret",
            theirs.rank
        );
    }
    Ok(())
}

/// The dialer, with the acceptor's answer read: checks that rank `expect_rank` of `mine`'s
/// generation answered and proved the secret, and gives the proof to send back.
pub fn check_answer(
    key: &MeshKey,
    mine: &Hello,
    answer: &[u8; ANSWER_LEN],
    expect_rank: usize,
) -> Result<[u8; TAG_LEN]> {
    let theirs = Hello::decode(&answer[..HELLO_LEN]).context("not a Helios communicator")?;
    if theirs.generation != mine.generation || theirs.rank != expect_rank {
        bail!(
            "answered as rank {} of generation {}, expected rank {expect_rank} of generation {}",
            theirs.rank,
            theirs.generation,
            mine.generation
        );
    }
    if !key.verify(ACCEPT, mine.generation, &theirs, mine, &answer[HELLO_LEN..]) {
        bail!(
            "rank {expect_rank} did not prove the cluster secret (is it the same on every worker?)"
        );
    }
    Ok(key.tag(DIAL, mine.generation, mine, &theirs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> MeshKey {
        MeshKey::new(Some(ClusterSecret::new(s).unwrap())).unwrap()
    }

    /// The acceptor's answer bytes for `dialer`, as `answer` writes them.
    fn answer_bytes(k: &MeshKey, acceptor: &Hello, dialer: &Hello) -> [u8; ANSWER_LEN] {
        let mut out = [0u8; ANSWER_LEN];
        out[..HELLO_LEN].copy_from_slice(&acceptor.encode());
        out[HELLO_LEN..].copy_from_slice(&k.tag(ACCEPT, acceptor.generation, acceptor, dialer));
        out
    }

    #[test]
    fn both_sides_prove_the_same_secret_for_this_generation_only() {
        let k = key("the secret of cluster one");
        let (d, a) = (Hello::new(7, 1).unwrap(), Hello::new(7, 0).unwrap());
        let proof = check_answer(&k, &d, &answer_bytes(&k, &a, &d), 0).unwrap();
        assert!(k.verify(DIAL, 7, &d, &a, &proof));
        // Another secret on either side fails.
        let other = key("the secret of cluster two");
        assert!(check_answer(&other, &d, &answer_bytes(&k, &a, &d), 0).is_err());
        assert!(!other.verify(DIAL, 7, &d, &a, &proof));
        // A recorded answer does not answer a new hello (its nonce is new).
        let d2 = Hello::new(7, 1).unwrap();
        assert!(check_answer(&k, &d2, &answer_bytes(&k, &a, &d), 0).is_err());
        // Nor does a recorded proof prove a new acceptor's challenge.
        let a2 = Hello::new(7, 0).unwrap();
        assert!(!k.verify(DIAL, 7, &d, &a2, &proof));
        // Another generation, another rank.
        let a8 = Hello::new(8, 0).unwrap();
        assert!(check_answer(&k, &d, &answer_bytes(&k, &a8, &d), 0).is_err());
        assert!(check_answer(&k, &d, &answer_bytes(&k, &a, &d), 2).is_err());
    }

    #[test]
    fn a_hello_reads_back_and_garbage_is_not_one() {
        let h = Hello::new(u64::MAX, 3).unwrap();
        let back = Hello::decode(&h.encode()).unwrap();
        assert_eq!(
            (back.generation, back.rank, back.nonce),
            (h.generation, h.rank, h.nonce)
        );
        assert!(Hello::decode(&[0u8; HELLO_LEN]).is_none());
        assert!(Hello::decode(b"GET / HTTP/1.1\r\n").is_none());
    }
}
