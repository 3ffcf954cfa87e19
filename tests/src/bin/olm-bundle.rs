//! Writes the operator's OLM bundle to `config/olm/` (see `bowline_tests::olm`).

use std::path::Path;

fn main() -> anyhow::Result<()> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = bowline_tests::olm::dir(&repo);
    for file in bowline_tests::olm::bundle(&repo)? {
        let path = dir.join(&file.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, file.contents)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
