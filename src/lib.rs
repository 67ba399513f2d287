//! smee-relay: receive webhooks from a smee.io channel and replay them to local services,
//! without losing, reordering or mangling them; optionally judge Port entity changes and alert
//! Slack.
//!
//! Data flows one way (`ARCHITECTURE.md` in the repository has the whole picture):
//!
//! ```text
//! channel --SSE--> source --Event--> spool::intake --> spool (redb, fsync)
//!     spool --> delivery (one route per target) --> delivery::forward --> HTTP target
//!     spool --> pipeline::runner (Port decode, diff, rules, state) --> spool --> notify (Slack/stdout)
//!     Port API --> pipeline::reconcile (after a gap) --> spool --> pipeline::runner
//! ```
//!
//! The modules, upstream first. A module uses only those above it in this list (a test in
//! `tests/layout.rs` holds the line):
//!
//! - leaves every stage shares: [`clock`], [`error`], [`secret`], [`url`], [`event`], [`counters`],
//!   [`retry`], [`http`], [`memory`];
//! - [`source`] keeps the SSE connection alive and decodes smee frames into [`event::Event`]s;
//! - [`spool`] is the disk: the writer thread, the intake, the lock, the queries;
//! - [`cluster`] is the shared spool of relays on several machines (NATS JetStream);
//! - [`delivery`] delivers each route's queue in order; [`delivery::forward`] is HTTP;
//! - [`pipeline`] judges Port changes; [`actions`] runs Port self-service action runs;
//!   [`notify`] sends the alerts and the run reports;
//! - [`server`] is `smee-relay serve`, the channel server;
//! - [`config`] reads the config file into the components' settings;
//! - [`service`] runs it all as a daemon (systemd, signals, reload, health, metrics);
//! - [`cli`] is the command line (clap types only); [`commands`] carry out what it asks for.

pub mod clock;
pub mod counters;
pub mod error;
pub mod event;
pub mod http;
pub mod memory;
pub mod retry;
pub mod secret;
#[cfg(test)]
mod test_logs;
pub mod text;
pub mod url;

pub mod source;

pub mod spool;

pub mod cluster;

pub mod delivery;

pub mod pipeline;

pub mod actions;

pub mod notify;

pub mod server;

pub mod config;

pub mod service;

pub mod cli;

pub mod commands;
