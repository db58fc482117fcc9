//! proxy::error (to be written)
