//! harden (to be written)
