//! The signals that stop a Helios process: SIGTERM (what Kubernetes and `podman stop` send)
//! and SIGINT (Ctrl-C), shared by the coordinator and the worker.

use std::future::Future;

/// Registers for SIGINT and SIGTERM at once (so that a signal right after the ready line is
/// caught, not fatal) and resolves on the first of them.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let signals = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        );
        async move {
            match signals {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                _ => tokio::signal::ctrl_c().await.unwrap_or(()),
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
