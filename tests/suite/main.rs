//! The integration suite: real sockets against real nodes, one test binary.

#[path = "../support/mod.rs"]
#[macro_use]
mod support;

mod auth;
mod browser;
mod cluster;
mod deploy;
mod frames;
mod hostile;
mod http;
mod lifecycle;
mod limits;
mod load;
mod redis;
mod resume;
