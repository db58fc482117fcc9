//! Request attributes (target, model, capability) and credential selection. Pure: no I/O.

pub mod attrs;
