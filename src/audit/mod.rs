//! Audit trail (to be written)
