//! nginx module (to come).
