//! Listeners and shutdown: binding the ports, and the drain every listener of the process
//! follows on SIGINT or SIGTERM (gRPC and HTTP drain together: they keep accepting, refuse new
//! requests with UNAVAILABLE / 503 while those in flight finish, then stop).

use std::net::SocketAddr;
use std::time::Duration;

use helios_proto::signal::shutdown_signal;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::front_door::FrontDoor;

/// Resolves once a shutdown signal came and the replica drained: every listener of the process
/// (gRPC, HTTP) stops on it, so they drain together: meanwhile they keep accepting, and refuse
/// new requests (UNAVAILABLE, 503) while those in flight finish.
#[derive(Clone)]
pub struct Drained(watch::Receiver<bool>);

impl Drained {
    pub async fn wait(mut self) {
        // An error means the drain task is gone (the runtime is shutting down): stop too.
        let _ = self.0.wait_for(|done| *done).await;
    }
}

/// Watches for SIGINT or SIGTERM; on one, drains `front` (new requests refused, those in
/// flight get up to `grace`, then are cancelled) and resolves the [`Drained`].
pub fn drain_on_signal(front: FrontDoor, grace: Duration) -> Drained {
    let (done, rx) = watch::channel(false);
    let signal = shutdown_signal();
    tokio::spawn(async move {
        signal.await;
        tracing::info!("shutting down; waiting up to {grace:?} for requests in flight");
        front.drain(grace).await;
        let _ = done.send(true);
    });
    Drained(rx)
}

/// Binds `addr` (port 0 picks a free port; the bound address is on the listener).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    Ok(TcpListener::bind(addr).await?)
}
