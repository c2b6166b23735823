//! SIGTERM and SIGINT as a value the flow can wait on.
//!
//! Nomad (on cancel, or at the drain deadline) and the local executor stop
//! gpu-task with SIGTERM and give it `kill_timeout` to clean up. The default
//! action would kill the process and leave its prompt running in the shared
//! ComfyUI, blocking the GPU for the next participant. So the signal becomes
//! a [`Stop`] that the flow checks at every wait, to interrupt its own prompt
//! and report before exiting.

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// Whether, and by which signal, gpu-task was asked to stop.
#[derive(Debug, Clone)]
pub struct Stop {
    rx: watch::Receiver<Option<&'static str>>,
}

impl Stop {
    /// Starts listening for SIGTERM and SIGINT (needs a Tokio runtime).
    pub fn install() -> std::io::Result<Stop> {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            tracing::info!("got {name}: stopping");
            let _ = tx.send(Some(name));
            // Keep the handlers installed: a second signal must not kill us
            // mid-cleanup (the supervisor's SIGKILL still will).
            loop {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
        });
        Ok(Stop { rx })
    }

    /// The signal's name, if one came.
    pub fn fired(&self) -> Option<&'static str> {
        *self.rx.borrow()
    }

    /// Waits for a signal and returns its name.
    pub async fn wait(&mut self) -> &'static str {
        loop {
            if let Some(name) = *self.rx.borrow_and_update() {
                return name;
            }
            if self.rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}
