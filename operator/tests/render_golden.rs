//! Rendering each profile gives exactly the committed objects. A change to
//! what the operator deploys shows up as a diff of these files in review;
//! `BOWLINE_UPDATE_GOLDEN=1 cargo test -p bowline-operator --test render_golden`
//! rewrites them.

use std::path::PathBuf;

use bowline_api::install::{MeshInstallation, MeshInstallationSpec, Profile};
use bowline_operator::profile;
use bowline_operator::render;

fn installation(profile: Profile) -> MeshInstallation {
    // Named `default`: Istio's default revision, the one most meshes run.
    let mut mesh = MeshInstallation::new(
        "default",
        MeshInstallationSpec {
            version: "v0.1.0".into(),
            profile: Some(profile),
            ..Default::default()
        },
    );
    mesh.metadata.uid = Some("00000000-0000-0000-0000-000000000001".into());
    mesh
}

#[test]
fn every_profile_renders_its_golden_objects() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let update = std::env::var_os("BOWLINE_UPDATE_GOLDEN").is_some();
    for profile in Profile::ALL {
        let mesh = installation(profile);
        let resolved = profile::resolve(&mesh.spec).expect("resolves");
        let objects = render::render(
            &mesh,
            &resolved,
            &bowline_operator::revisions::asked_for(&mesh, &resolved).expect("a revision name"),
        )
        .expect("renders");
        let yaml = render::to_yaml(&objects).expect("YAML");
        let path = dir.join(format!("{}.yaml", profile.as_str()));
        if update {
            std::fs::write(&path, &yaml).expect("write golden file");
            continue;
        }
        let golden = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            yaml == golden,
            "rendering the {} profile differs from {}; review the difference and rerun with \
             BOWLINE_UPDATE_GOLDEN=1 to accept it",
            profile.as_str(),
            path.display()
        );
    }
}
