//! proxy::route (to be written)
