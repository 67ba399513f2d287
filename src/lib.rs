//! smee-relay: receive webhooks from a smee.io channel and replay them to local services,
//! without losing, reordering or mangling them.
//!
//! Data flows one way (see `DESIGN.md` in the repository):
//!
//! ```text
//! channel --SSE--> source --Event--> relay (in order) --> forward --> HTTP target
//! ```
//!
//! - [`source`] keeps the SSE connection alive and decodes smee frames into [`event::Event`]s;
//! - [`forward`] replays an event to a target over HTTP;
//! - [`relay`] runs the `forward` command: source to target, one event at a time.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod dispatch;
pub mod event;
pub mod forward;
pub mod http;
pub mod inspect;
pub mod memory;
pub mod notify;
pub mod pipeline;
pub mod relay;
pub mod retry;
pub mod serve;
pub mod service;
pub mod source;
pub mod spool;
pub mod telemetry;
pub mod url;
pub mod verify;
