//! A product's reference: an enrolment file, or a folder of normal images enrolled on the spot.
//! `anomalyd enroll/inspect` and every daemon camera resolve references through here.

use std::path::{Path, PathBuf};

use image::RgbImage;

use crate::config::detect::DetectConfig;
use crate::detect::detector::Detector;
use crate::detect::enrolment::Enrolment;
use crate::detect::inspection::DetectError;
use crate::enrol::file::EnrolmentError;
use crate::enrol::learn::{LearnReport, Learner};
use crate::util::imageio::{self, ImageError};

#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error("reference {0} does not exist: give an enrolment file or a folder of normal images")]
    Missing(PathBuf),
    #[error("{0} holds no images (png, jpg, bmp, tif, pgm, ppm): give a folder of normal images of the product")]
    Empty(PathBuf),
    #[error(transparent)]
    List(#[from] imageio::ListError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Enrolment(#[from] EnrolmentError),
    #[error(transparent)]
    Detect(#[from] DetectError),
    #[error("zones file {path}: {cause}")]
    Zones { path: PathBuf, cause: String },
}

/// Reads a zones file: a JSON list of `{"kind": "ignore" | "inspect", "points": [[x, y], ...]}`, the
/// corners in fractions of the frame's width and height; checked ([`crate::detect::zones::check`]).
pub fn load_zones(path: &Path) -> Result<Vec<crate::detect::zones::Zone>, ReferenceError> {
    let err = |cause: String| ReferenceError::Zones { path: path.into(), cause };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let zones: Vec<crate::detect::zones::Zone> = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    crate::detect::zones::check(&zones).map_err(|e| err(e.to_string()))?;
    Ok(zones)
}

/// Images of a folder (name, RGB), refusing an empty folder and reporting any unreadable file.
pub fn load_dir(dir: &Path) -> Result<Vec<(String, RgbImage)>, ReferenceError> {
    let files = imageio::image_files(dir)?;
    if files.is_empty() {
        return Err(ReferenceError::Empty(dir.into()));
    }
    load_files(&files)
}

pub fn load_files(files: &[PathBuf]) -> Result<Vec<(String, RgbImage)>, ReferenceError> {
    files.iter().map(|p| Ok((p.display().to_string(), imageio::load_rgb(p)?))).collect()
}

/// Enrols the images of every folder or file in `reference`, with the operator's `zones` (none: the
/// whole frame is inspected).
pub fn enroll_from(
    det: &mut Detector,
    reference: &[PathBuf],
    zones: &[crate::detect::zones::Zone],
    cfg: &DetectConfig,
    progress: &mut dyn FnMut(&str),
) -> Result<Enrolment, ReferenceError> {
    let mut refs = Vec::new();
    for r in reference {
        if r.is_dir() {
            refs.extend(load_dir(r)?);
        } else if r.exists() {
            refs.extend(load_files(std::slice::from_ref(r))?);
        } else {
            return Err(ReferenceError::Missing(r.clone()));
        }
    }
    Ok(det.enroll_with_zones(&refs, zones, cfg, progress)?)
}

/// An enrolment file (checked against the detector's model), or an image or folder of images of
/// normal parts, enrolled now.
pub fn load(
    det: &mut Detector,
    reference: &Path,
    cfg: &DetectConfig,
    progress: &mut dyn FnMut(&str),
) -> Result<Enrolment, ReferenceError> {
    if reference.is_file() && !imageio::is_image(reference) {
        let e = crate::enrol::file::load(reference)?;
        det.check(&e)?;
        return Ok(e);
    }
    if !reference.exists() {
        return Err(ReferenceError::Missing(reference.into()));
    }
    enroll_from(det, &[reference.to_path_buf()], &[], cfg, progress)
}

/// `anomalyd enroll --refine DIR`: line mode offline. Every image of `dir` (unlabelled line images) is
/// inspected with `enrolment` and learned from as the daemon's first parts would be; an unreadable
/// image is reported and left out.
pub fn refine(
    det: &mut Detector,
    enrolment: &Enrolment,
    dir: &Path,
    cfg: &DetectConfig,
    progress: &mut dyn FnMut(&str),
) -> Result<(Enrolment, LearnReport), ReferenceError> {
    let files = imageio::image_files(dir)?;
    if files.is_empty() {
        return Err(ReferenceError::Empty(dir.into()));
    }
    let mut learner = Learner::new(files.len());
    for (i, p) in files.iter().enumerate() {
        match imageio::load_rgb(p) {
            Ok(img) => {
                let score = det.inspect(enrolment, &img)?.verdict.score;
                learner.add(enrolment, &img, score);
            }
            Err(e) => progress(&format!("skipping {e}")),
        }
        if (i + 1) % 10 == 0 || i + 1 == files.len() {
            progress(&format!("refine: {}/{} line images inspected", i + 1, files.len()));
        }
    }
    Ok(learner.finish(det, enrolment, cfg, progress)?)
}
