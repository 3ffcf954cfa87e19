//! Writes Bowline's CustomResourceDefinitions to `config/crd/` (or the
//! directory given), one file per CRD.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config/crd"));
    std::fs::create_dir_all(&dir)?;
    for crd in bowline_api::crds::all() {
        let path = dir.join(bowline_api::crds::file_name(&crd));
        std::fs::write(&path, bowline_api::crds::to_yaml(&crd)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
