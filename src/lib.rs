//! roomcast: a horizontally scalable WebSocket broadcast server.
//!
//! A node keeps only its own sockets ([`hub`]); nodes share nothing but a
//! [`broker`], which also stores each room's [`history`] so clients resume
//! without gaps. [`session`] serves one socket, [`http`] the routes,
//! [`node`] wires it all and drains on shutdown. The wire format is
//! [`protocol`] v1 (docs/PROTOCOL.md).

pub mod auth;
pub mod broker;
pub mod config;
pub mod history;
pub mod http;
pub mod hub;
pub mod limits;
pub mod node;
pub mod protocol;
pub mod session;
pub mod stats;

pub use config::Config;
pub use node::{Node, NodeError};
