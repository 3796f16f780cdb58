//! SIGTERM and SIGINT become a cancellation token; a second signal exits at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::exit::ExitCode;

/// Shared by every task of a process: the token to watch, and which signal fired.
#[derive(Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    signal: Arc<AtomicI32>,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// The signal that cancelled us, if any.
    pub fn signal(&self) -> Option<i32> {
        match self.signal.load(Ordering::SeqCst) {
            0 => None,
            n => Some(n),
        }
    }

    /// Installs the handlers. Must be called inside the runtime.
    pub fn listen(&self) -> std::io::Result<()> {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let n = tokio::select! {
                    _ = term.recv() => 15,
                    _ = int.recv() => 2,
                };
                if this.token.is_cancelled() {
                    warn!(signal = n, "second signal: exiting now");
                    std::process::exit(ExitCode::Signal(n).code());
                }
                warn!(signal = n, "signal received: stopping");
                this.signal.store(n, Ordering::SeqCst);
                this.token.cancel();
            }
        });
        Ok(())
    }
}
