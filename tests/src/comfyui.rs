//! Test equipment: stands in for ComfyUI's server (version 0.3.64, the one
//! recorded in `shared/comfyui-samples/`), so that gpu-task and the gateway
//! can be tested without torch, a GPU or model files. Never shipped.
//!
//! It really computes a few model-free nodes (`EmptyImage`, `ImageInvert`,
//! `SolidMask`, `MaskToImage`, `ImageCompositeMasked`, `ImageScale`,
//! `ImageScaleBy`, `ImageToMask`, `InvertMask`, `LoadImage`, `PreviewImage`,
//! `SaveImage`) on float images, writes real PNGs, and says what ComfyUI
//! says: the same routes (also under `/api`), the same websocket message
//! sequence for fresh, cached, interrupted and failed runs, the same history
//! entries and the same 400 bodies. `tests/tests/comfyui_standin.rs` checks
//! it against the recordings.
//!
//! # Layout
//!
//! - [`server`]: routes, websocket, and the [`ComfyUi`] handle.
//! - [`executor`]: runs the queue, emits the execution messages, keeps the cache.
//! - [`validate`]: ComfyUI's prompt validation and its error bodies.
//! - [`graph`]: execution order and cache keys.
//! - [`nodes`]: node definitions (copied from the recorded `/object_info`) and implementations.
//! - [`tensor`]: images, masks, resampling, PNG.
//! - [`state`]: queue, history, sockets, interrupt flag.
//! - [`messages`]: the message and history types, in ComfyUI's key order.
//! - [`paths`]: ComfyUI's file naming and directory rules.
//! - [`json`]: key-order-preserving JSON and Python value semantics.
//!
//! # Deliberate differences from ComfyUI
//!
//! - Only the routes above exist (no frontend, `/userdata`, `/settings`,
//!   `/models`, `/internal`); `/extensions` lists none, `/embeddings` none.
//! - `/system_stats` has the recorded shape and `comfyui_version` "0.3.64";
//!   it reports a CPU device with this machine's memory and says
//!   "n/a (ComfyUI stand-in)" for the Python and torch versions.
//! - Requests ComfyUI answers with a 500 (body not a JSON object, a prompt
//!   that is not an object) get a 400 with an `invalid_prompt` body.
//! - `LoadImage` reads PNG only; other files fail at execution like an
//!   unreadable image in ComfyUI (`PIL.UnidentifiedImageError`).
//! - `lanczos` follows Pillow's algorithm; results may differ from Pillow in
//!   the last bit. `execution_error` tracebacks name the stand-in, and its
//!   `current_inputs` describe tensors by shape instead of printing them.
//!   Validation tracebacks copy the recorded frames (lines 788/808); frames
//!   that were never recorded carry plausible, unverified line numbers.
//! - Python's sets make some orders arbitrary in ComfyUI (outputs to run,
//!   errors within a node, `current_outputs`); the stand-in uses prompt and
//!   declaration order.
//! - Tensors over 64 Mi elements are refused with a `MemoryError`.
//! - An interrupt aimed at a running prompt is never lost: the flag is
//!   cleared when a prompt is taken from the queue, not a moment later.
//! - A websocket replaced by a newer one with the same client id is closed
//!   (ComfyUI leaves it open but sends it nothing).
//! - Date variables in `filename_prefix` use UTC.
//! - No binary preview frames and no `progress` messages: none of these
//!   nodes reports progress in ComfyUI either.

pub mod executor;
pub mod graph;
pub mod json;
pub mod messages;
pub mod nodes;
pub mod paths;
pub mod server;
pub mod state;
pub mod tensor;
pub mod validate;

use std::path::PathBuf;
use std::time::Duration;

pub use server::ComfyUi;

/// How to run the stand-in.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// ComfyUI's `output/` (created if missing).
    pub output_dir: PathBuf,
    /// ComfyUI's `input/` (created if missing).
    pub input_dir: PathBuf,
    /// Artificial delay before each executed (not cached) node, so tests can
    /// watch progress and interrupt; an interrupt cuts it short.
    pub node_delay: Duration,
}

impl Options {
    /// Options with the given directories and no delay.
    pub fn new(output_dir: impl Into<PathBuf>, input_dir: impl Into<PathBuf>) -> Options {
        Options { output_dir: output_dir.into(), input_dir: input_dir.into(), node_delay: Duration::ZERO }
    }
}

/// The 7-node model-free workflow of `comfyui-api.md` B.5 (API format):
/// a red 512×512 image, inverted to cyan, with a 50 % grey square pasted at
/// (128, 128), scaled bilinearly to 256×256 and saved as `smoke_NNNNN_.png`.
/// The output is cyan (0, 255, 255) above and left of (64, 64) and grey
/// (127, 127, 127) from there on.
pub fn model_free_workflow() -> serde_json::Value {
    serde_json::from_str(MODEL_FREE_JSON).expect("tests/workflows/model-free.json is JSON")
}

/// `tests/workflows/model-free.json`, the one copy of that workflow.
pub const MODEL_FREE_JSON: &str = include_str!("../workflows/model-free.json");
