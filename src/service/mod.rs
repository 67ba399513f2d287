//! Running as a service: the daemon that ties channels, spool and routes together and swaps
//! config on reload ([`daemon`]), systemd's protocol and signals ([`systemd`]), `/healthz` and
//! `/metrics` ([`health`]), and logging ([`logging`]).
//!
//! This is the top of the runtime: it may use every module above it and nothing uses it but
//! `commands`.

pub mod catch_up;
pub mod daemon;
pub mod health;
mod log_writer;
pub mod logging;
pub mod systemd;
