//! The Port pipeline: decode an entity change, diff it, evaluate rules with alert state, and
//! produce alerts.
//!
//! ```text
//! Event --port::decode--> Change --diff--> changed properties
//!                            \--rules (+ state)--> Alert
//! ```

pub mod diff;
pub mod jq;
pub mod port;
pub mod rules;
pub mod state;
