//! The VM agent: onboards a legacy host into the mesh. It is a small gateway (VIP
//! listeners for imported services, inbound tunnels for its own) with a DNS stub, health
//! checks that decide which endpoints are exported, a site lease, and an SVID it obtains
//! once with a join token and then renews by itself.

pub mod config;
mod exports;
pub mod health;
pub mod identity;
mod run;

pub use config::Config;
pub use run::{Agent, AgentError, AgentHandle};
