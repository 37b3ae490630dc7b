//! The VM agent: onboards a legacy host into the mesh.

pub mod health;
