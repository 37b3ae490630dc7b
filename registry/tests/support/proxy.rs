//! A TCP fault proxy.
