//! proxy (to be written)
