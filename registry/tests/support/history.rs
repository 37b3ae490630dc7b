//! A recorded operation history and a linearizability checker (filled in below).
