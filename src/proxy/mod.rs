//! The data plane: the HTTP server on the data socket, request routing and validation, the
//! upstream TLS client, response streaming and scrubbing, limits and the error contract.
//!
//! `proxy` must not choose credentials (that is `scope`) or know how secrets are sealed.

pub mod app_conn;
pub mod aws_session;
mod body;
pub mod conn;
pub mod error;
mod failover;
mod lane;
pub mod limits;
mod replay;
pub mod route;
pub mod scrub;
pub mod server;
pub mod token;
pub mod upstream;
