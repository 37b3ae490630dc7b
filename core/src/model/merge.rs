//! Merged views of the catalog (MCS rules) and locality ranking.
