//! Test support shared by the kvtier tests (and, by path, the daemon's end-to-end tests).

pub mod cluster;
