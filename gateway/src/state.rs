//! The state every handler shares: one value, cheap to clone.

use std::path::PathBuf;
use std::sync::Arc;

use dispatcher::queue::Store;

use crate::auth::Auth;
use crate::files::Files;

/// Shared application state.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub auth: Auth,
    pub files: Files,
    pub limits: Limits,
    /// Shared with gpu-task; guards `/_internal`.
    pub internal_secret: Arc<str>,
    /// GPUs the dispatcher keeps busy (`dispatcher.slots`), for wait estimates.
    pub slots: usize,
    /// What the admin page shows of Nomad and Consul, and its live hub.
    pub cluster: crate::admin::Cluster,
    /// The editor: its files, participants' userdata, the GPU node's answers.
    pub editor: crate::editor::Editor,
    /// The editors' websockets: client ids and the per-participant fan-out.
    pub events: crate::ws::Events,
}

/// Size limits on what clients send.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_workflow_bytes: usize,
    pub max_output_bytes: usize,
}

impl AppState {
    /// Where outputs and inputs live.
    pub fn data_dir(&self) -> &PathBuf {
        self.files.root()
    }
}
