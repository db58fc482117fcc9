//! daemon (to be written)
