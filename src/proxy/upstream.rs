//! proxy::upstream (to be written)
