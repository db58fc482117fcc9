//! audit (to be written)
