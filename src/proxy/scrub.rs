//! proxy::scrub (to be written)
