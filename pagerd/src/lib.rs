//! pagerd
