//! scope (to be written)
