//! systemd (to be written)
