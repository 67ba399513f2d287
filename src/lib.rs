//! smee-relay: receive webhooks from a smee.io channel and replay them to local services,
//! without losing, reordering or mangling them; optionally judge Port entity changes and alert
//! Slack.
//!
//! Data flows one way (see `DESIGN.md` in the repository):
//!
//! ```text
//! channel --SSE--> source --Event--> dispatch::intake --> spool (redb, fsync)
//!     spool --> dispatch::run_route --> forward --> HTTP target
//!     spool --> pipeline (Port decode, diff, rules, state) --> spool --> notify (Slack/stdout)
//! ```
//!
//! - [`source`] keeps the SSE connection alive ([`source::sse`] parses the stream,
//!   [`source::wire`] decodes smee frames into [`event::Event`]s);
//! - [`dispatch`] stores events and delivers each route's queue in order; [`spool`] is the disk;
//! - [`forward`] replays an event to a target over HTTP; [`pipeline`] and [`notify`] do alerts;
//! - [`daemon`] runs all of it for `forward` and `run`; [`serve`] is the channel server.

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
