//! scope::attrs (to be written)
