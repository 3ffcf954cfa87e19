//! The install API, `install.bowline.dev/v1alpha1`: Bowline's own, cluster-scoped.

mod installation;
mod mesh_config;
mod revision;
mod settings;

pub use installation::*;
pub use mesh_config::*;
pub use revision::*;
pub use settings::*;
