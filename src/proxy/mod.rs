//! The data plane: the HTTP server on the data socket, request routing and validation, the
//! upstream TLS client, response streaming and scrubbing, limits and the error contract.
//!
//! A request's path, in the order it runs:
//!
//! - `server`: listeners, connection caps, HTTP/1.1 and HTTP/2, drain on shutdown;
//! - `call`: the per-call context and the named phases (admit → authenticate → route →
//!   read body → resolve scope → govern → audit resolution → upstream → respond);
//! - `body`: reading the app's body up to its model, or whole for a signing target;
//! - `failover` and `replay`: which answers move a call to its next key, and the body kept
//!   to send again;
//! - `attempt`: one attempt with one key — unseal, inject or sign, send;
//! - `respond`: the answer on its way back — scrubbed, counted, completed in the audit trail;
//! - [`operator`]: an operator's test call with one pinned credential, through the same phases.
//!
//! `proxy` must not choose credentials (that is `scope`) or know how secrets are sealed.

pub mod app_conn;
mod attempt;
pub mod aws_session;
mod body;
mod call;
pub mod conn;
pub mod error;
mod failover;
mod lane;
pub mod limits;
pub mod operator;
mod replay;
mod respond;
pub mod route;
pub mod scrub;
pub mod server;
pub mod token;
pub mod upstream;
