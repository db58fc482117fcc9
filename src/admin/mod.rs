//! The admin socket: a local, peer-checked HTTP/1.1 + JSON API for managing tenants, clients
//! and credentials and for querying the audit trail (README, "Admin API").
//!
//! - [`api`]: the request and response types, the error shape and the path router, shared by
//!   the daemon and the CLI (one file per resource);
//! - `server`: the HTTP server, the peer-uid check before a byte is read, connection caps and
//!   timeouts;
//! - `ops`: what each operation does, through `store` and `audit`;
//! - [`openapi`]: the OpenAPI 3.1 document served at `GET /v1/openapi.json`;
//! - [`client`]: the CLI's HTTP client over the Unix socket.
//!
//! `admin` must not run raw SQL and no response ever carries a secret; a client token is
//! returned once, when the client is created.

pub mod api;
pub mod client;
pub mod openapi;
mod ops;
mod server;

pub use api::WireSecret;
pub use ops::{dev_client, fingerprint_key};
pub use server::serve;
