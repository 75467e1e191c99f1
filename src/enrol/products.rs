//! Products enrolled from the operator station: each is a folder of its reference images, kept beside
//! the cameras' enrolment versions, and loaded with the camera's configured recipes at every start and
//! reload, as if it were a `[[camera.recipe]]` whose reference is that folder.
//!
//! ```text
//! <daemon.enrolments>/products/<camera>/<recipe>/product.json   {"product": words, "by": user, "unix": ...}
//! <daemon.enrolments>/products/<camera>/<recipe>/ref_01.png, ref_02.png, ...
//! ```
//! A folder is written under a temporary name and renamed into place, so a crash never leaves half a
//! product.

use std::path::{Path, PathBuf};

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::config::daemon::RecipeConfig;

/// What a product folder says of itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProductFile {
    /// The product in the operator's words.
    pub product: Option<String>,
    pub by: String,
    pub unix: u64,
}

/// The folder of `camera`'s station products under `root` (`daemon.enrolments`).
pub fn dir(root: &Path, camera: &str) -> PathBuf {
    root.join("products").join(camera)
}

/// `camera`'s station products as recipes, in name order; a folder without a readable `product.json`
/// is skipped with a warning (it is not a product this module wrote).
pub fn list(root: &Path, camera: &str) -> Vec<RecipeConfig> {
    let Ok(entries) = std::fs::read_dir(dir(root, camera)) else { return Vec::new() };
    let mut out: Vec<RecipeConfig> = entries
        .flatten()
        .filter(|e| e.path().is_dir() && !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let file = std::fs::read(path.join("product.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<ProductFile>(&b).ok());
            match file {
                Some(f) if crate::config::daemon::valid_name(&name) => {
                    Some(RecipeConfig { name, reference: path, product: f.product })
                }
                _ => {
                    tracing::warn!(camera, "{} is not a station product (no product.json): skipped", path.display());
                    None
                }
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Writes a product's folder: its images as PNG and its `product.json`, under a temporary name renamed
/// into place. Refuses a name that is taken.
pub fn save(
    root: &Path,
    camera: &str,
    name: &str,
    file: &ProductFile,
    images: &[RgbImage],
) -> Result<PathBuf, std::io::Error> {
    let parent = dir(root, camera);
    let target = parent.join(name);
    if target.exists() {
        return Err(std::io::Error::new(std::io::ErrorKind::AlreadyExists, format!("{} exists", target.display())));
    }
    let tmp = parent.join(format!(".tmp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let written = (|| {
        for (i, img) in images.iter().enumerate() {
            img.save(tmp.join(format!("ref_{:02}.png", i + 1))).map_err(std::io::Error::other)?;
        }
        std::fs::write(tmp.join("product.json"), serde_json::to_vec_pretty(file).map_err(std::io::Error::other)?)?;
        std::fs::rename(&tmp, &target)
    })();
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written.map(|()| target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_product_is_listed_as_a_recipe_and_a_name_is_taken_once() {
        let root = tempfile::tempdir().unwrap();
        let f = ProductFile { product: Some("a bracket".into()), by: "anna".into(), unix: 1 };
        let img = RgbImage::from_pixel(8, 8, image::Rgb([1, 2, 3]));
        let p = save(root.path(), "cam", "bracket", &f, &[img.clone(), img.clone()]).unwrap();
        assert!(p.join("ref_02.png").is_file());
        assert!(save(root.path(), "cam", "bracket", &f, &[img]).is_err(), "taken");
        // A stray folder is not a product.
        std::fs::create_dir_all(dir(root.path(), "cam").join("stray")).unwrap();
        let listed = list(root.path(), "cam");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].name, "bracket");
        assert_eq!(listed[0].product.as_deref(), Some("a bracket"));
        assert!(list(root.path(), "other").is_empty());
    }
}
