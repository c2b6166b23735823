//! Test equipment for comfy-multi. Nothing here ships as product.
//!
//! # Layout
//!
//! - [`harness`]: starts real Redis and a real Consul dev agent on free
//!   loopback ports, finds the project's binaries, waits on conditions with
//!   deadlines.
//! - [`comfyui`]: a ComfyUI stand-in (a few model-free nodes that make real
//!   PNGs), faithful to `shared/comfyui-samples/`. `COMFYUI_URL` points tests
//!   at a real ComfyUI instead.
//! - [`nomad`]: a Nomad API stand-in, faithful to `shared/nomad-api/`, that
//!   runs dispatched children as local processes the way `raw_exec` would.
//! - [`browser`]: drives Debian's chromium through the `tests/browser/` scripts.
//! - [`stack`]: the whole local stack as real processes, for end-to-end tests.
//! - [`tls`]: certificates made at test time for the gateway's HTTPS.
//! - [`proxy`]: a TCP proxy a test cuts to make Nomad or Consul unreachable.

pub mod browser;
pub mod comfyui;
pub mod harness;
pub mod nomad;
pub mod proxy;
pub mod stack;
pub mod tls;
