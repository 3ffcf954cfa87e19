//! Writes the operator's OLM bundle to `config/olm/` (see `bowline_tests::olm`).

fn main() -> anyhow::Result<()> {
    let dir = bowline_tests::olm::dir();
    for file in bowline_tests::olm::bundle()? {
        let path = dir.join(&file.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, file.contents)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
