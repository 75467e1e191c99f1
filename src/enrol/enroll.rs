//! Enrolment: normal reference images of one product become an [`Enrolment`]: geometry, banks,
//! background model and calibrated thresholds, all decided from the shots.

use image::RgbImage;

use crate::config::detect::{DetectConfig, Fusion, GeometryChoice, MetricChoice, Switch, TextureScale};
use crate::detect::background;
use crate::detect::detector::Detector;
use crate::detect::enrolment::ALIGN;
use crate::detect::enrolment::*;
use crate::detect::features::{Distance, Patches};
use crate::detect::inspection::DetectError;
use crate::enrol::{bank, calibrate};
use crate::util::imageio::{self, Dihedral};

impl Detector {
    /// Enrols normal reference images (name, image) of one product.
    pub fn enroll(
        &mut self,
        references: &[(String, RgbImage)],
        cfg: &DetectConfig,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Enrolment, DetectError> {
        self.enroll_with_zones(references, &[], cfg, progress)
    }

    /// [`Detector::enroll`] of a product with regions to ignore or inspect: calibration scores its
    /// evidence with them, and simulated defects are placed where they inspect.
    pub fn enroll_with_zones(
        &mut self,
        references: &[(String, RgbImage)],
        zones: &[crate::detect::zones::Zone],
        cfg: &DetectConfig,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Enrolment, DetectError> {
        crate::detect::zones::check(zones)?;
        let Some((first_name, first)) = references.first() else {
            return Err(DetectError::NoReferences);
        };
        let outputs = cfg.strides.iter().map(|&s| self.output_for(s)).collect::<Result<Vec<_>, _>>()?;
        // Bank layers: one joint group, or one per stride; each layer sits on its finest stride's grid.
        let (mut groups, mut bank_strides): (Vec<Vec<usize>>, Vec<usize>) = match cfg.fusion {
            Fusion::Concat => (vec![outputs.clone()], vec![*cfg.strides.iter().min().unwrap_or(&8)]),
            Fusion::Mean => (outputs.iter().map(|&o| vec![o]).collect(), cfg.strides.clone()),
        };
        let (aw, ah) = imageio::fit_pixels(first.width(), first.height(), cfg.pixels, ALIGN);
        let aligned_first = imageio::resize(first, aw, ah);

        // Geometry: aligned object or texture, decided from the first shot unless configured.
        let stationarity = calibrate::stationarity(self, &aligned_first, &groups[..1], cfg.pool)?;
        let texture = match cfg.geometry {
            GeometryChoice::Auto => stationarity < calibrate::TEXTURE_RATIO,
            GeometryChoice::Aligned => false,
            GeometryChoice::Texture => true,
        };
        progress(&format!(
            "product looks {} (stationarity {stationarity:.2}; texture below {})",
            if texture {
                "like a texture: 8 rotations/flips, matched anywhere"
            } else {
                "aligned: fixed input, matched near its own place"
            },
            calibrate::TEXTURE_RATIO
        ));
        let geometry = if texture {
            let scale = (cfg.pixels as f64 / (first.width() as f64 * first.height() as f64)).sqrt();
            match cfg.texture_scale {
                TextureScale::Keep => Geometry::Texture { scale, max_pixels: cfg.pixels.saturating_mul(4) },
                TextureScale::Fit => Geometry::Fit { pixels: cfg.pixels },
                TextureScale::Squash => Geometry::Aligned { width: aw, height: ah },
            }
        } else {
            Geometry::Aligned { width: aw, height: ah }
        };
        if !texture {
            for (name, img) in &references[1..] {
                let rel = |a: u32, b: u32| (a as f32 / b as f32 - 1.0).abs();
                let aspect = rel(img.width() * first.height(), img.height() * first.width());
                if aspect > 0.05 {
                    return Err(DetectError::SizeMismatch {
                        name: name.clone(),
                        w: img.width(),
                        h: img.height(),
                        first: first_name.clone(),
                        fw: first.width(),
                        fh: first.height(),
                    });
                }
            }
        }
        // The image score may come from its own (coarser, more semantic) layer than the map. `auto`:
        // textures score on stride 16, whose features shrug off normal texture variation; aligned
        // products score on the map's layers, whose positional matching catches misplaced parts.
        let mut score_strides = match &cfg.score_strides {
            Some(s) => s.clone(),
            None if texture => vec![16],
            None => Vec::new(),
        };
        score_strides.sort_unstable();
        let mut map_strides = cfg.strides.clone();
        map_strides.sort_unstable();
        let score_group = if score_strides.is_empty() || score_strides == map_strides {
            None
        } else {
            let outs = score_strides.iter().map(|&s| self.output_for(s)).collect::<Result<Vec<_>, _>>()?;
            groups.push(outs);
            bank_strides.push(score_strides[0]);
            Some(groups.len() - 1)
        };
        let augment = if texture { Dihedral::all() } else { vec![Dihedral::IDENTITY] };
        // Distances: raw-feature L2 keeps the magnitude of a local change, which localises defects and
        // separates misplaced parts; a texture's verdict needs invariance to tile-to-tile contrast, so its
        // score layer compares directions (cosine). Measured in docs/RESULTS.md.
        let distances: Vec<Distance> = (0..groups.len())
            .map(|g| match cfg.metric {
                MetricChoice::Cosine => Distance::Cosine,
                MetricChoice::L2 => Distance::L2,
                MetricChoice::Auto if texture && Some(g) == score_group => Distance::Cosine,
                MetricChoice::Auto => Distance::L2,
            })
            .collect();
        // Textures: the score layer always holds every rotation (the verdict must not depend on how a
        // tile lies); the map layers hold them too unless `rotate_map = false`, which halves the
        // decoder's time at a small cost in localisation (docs/RESULTS.md).
        let group_augment: Vec<Vec<Dihedral>> = (0..groups.len())
            .map(|g| {
                if Some(g) == score_group || cfg.rotate_map || score_group.is_none() {
                    augment.clone()
                } else {
                    vec![Dihedral::IDENTITY]
                }
            })
            .collect();
        let prepared: Vec<RgbImage> = references
            .iter()
            .map(|(_, img)| {
                let (w, h) = geometry.input_size(img.width(), img.height());
                imageio::resize(img, w, h)
            })
            .collect();

        let background = match cfg.foreground {
            Switch::On => Some(background::background(&prepared[0])),
            Switch::Off => None,
            Switch::Auto if texture => None,
            Switch::Auto => background::plain_background(&prepared[0]),
        };
        if let Some(bg) = &background {
            progress(&format!(
                "plain background {:?}: its patches are left out of the score",
                bg.rgb.map(|v| v.round())
            ));
        }
        let mut meta = EnrolmentMeta {
            model_name: self.encoder.manifest().name.clone(),
            model_sha256: self.encoder.model_sha256().to_string(),
            input: self.encoder.manifest().input.clone(),
            geometry,
            augment,
            group_augment,
            groups,
            pool: cfg.pool,
            window: if texture { 1.0 } else { cfg.window },
            score_group,
            score_scales: if texture && score_group.is_some() { cfg.scale_augment.clone() } else { Vec::new() },
            distances,
            top_fraction: cfg.top_fraction,
            search: crate::detect::enrolment::Search { lists: cfg.search_lists, probe: cfg.search_probe },
            sigma: cfg.sigma,
            min_region: cfg.min_region,
            background,
            zones: zones.to_vec(),
            classes: Vec::new(),
            thresholds: Thresholds::default(),
            calibration: Calibration::default(),
            references: references.iter().map(|(n, _)| n.clone()).collect(),
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        // Memory bank: every reference under every augmentation, per layer, then coreset-bounded.
        let mut per_ref: Vec<Vec<Patches>> = Vec::new();
        for (i, img) in prepared.iter().enumerate() {
            progress(&format!("encoding reference {}/{} ({} views)", i + 1, prepared.len(), meta.augment.len()));
            per_ref.push(self.reference_patches(&meta, img)?);
        }
        let banks = bank::build_banks(&per_ref, &bank_strides, None, cfg.max_bank, progress);
        let (thresholds, mut calibration) =
            calibrate::calibrate(self, &meta, &banks, &per_ref, &prepared, cfg, progress)?;
        calibration.stationarity = stationarity;
        meta.thresholds = thresholds;
        meta.calibration = calibration;
        Ok(Enrolment::new(meta, banks))
    }
}
