//! The TOML configuration of the inspection core: `[engine]` and `[detect]`, every key optional, unknown
//! keys refused. `config/anomalyd.toml` documents every key.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::detect::DetectConfig;
use crate::engine::EngineConfig;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub engine: EngineConfig,
    pub detect: DetectConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {cause}")]
    Read { path: PathBuf, cause: std::io::Error },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: {}", .problems.join("; "))]
    Invalid { path: PathBuf, problems: Vec<String> },
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read { path: path.into(), cause })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })?;
        let problems = cfg.validate();
        if problems.is_empty() { Ok(cfg) } else { Err(ConfigError::Invalid { path: path.into(), problems }) }
    }

    /// Every problem at once, each naming its key and the fix.
    pub fn validate(&self) -> Vec<String> {
        let d = &self.detect;
        let mut p = Vec::new();
        if !(4096..=4_194_304).contains(&d.pixels) {
            p.push(format!(
                "detect.pixels = {} is out of range: use 4096..=4194304 (256*256 = 65536 is the default)",
                d.pixels
            ));
        }
        if d.strides.is_empty() || d.strides.iter().any(|s| ![4, 8, 16].contains(s)) {
            p.push(format!("detect.strides = {:?}: use one or more of 4, 8, 16", d.strides));
        }
        if d.pool == 0 || d.pool.is_multiple_of(2) || d.pool > 9 {
            p.push(format!("detect.pool = {}: use an odd size from 1 to 9", d.pool));
        }
        if !(d.top_fraction > 0.0 && d.top_fraction <= 1.0) {
            p.push(format!("detect.top_fraction = {}: use a fraction in (0, 1]", d.top_fraction));
        }
        if !(0.0..=32.0).contains(&d.sigma) {
            p.push(format!("detect.sigma = {}: use 0 to 32 pixels", d.sigma));
        }
        if !(d.window > 0.0 && d.window <= 1.0) {
            p.push(format!("detect.window = {}: use a fraction in (0, 1] (1 = match anywhere)", d.window));
        }
        if let Some(s) = &d.score_strides
            && s.iter().any(|s| ![4, 8, 16].contains(s))
        {
            p.push(format!("detect.score_strides = {s:?}: use strides among 4, 8, 16, or [] for the map's"));
        }
        if d.max_bank < 256 {
            p.push(format!("detect.max_bank = {}: use at least 256", d.max_bank));
        }
        if !(0.0..0.5).contains(&d.min_region) {
            p.push(format!("detect.min_region = {}: use a fraction below 0.5", d.min_region));
        }
        if d.normal_views == 0 || d.anomaly_views < 3 {
            p.push("detect.normal_views must be at least 1 and detect.anomaly_views at least 3".into());
        }
        if self.engine.providers.is_empty() {
            p.push("engine.providers is empty: list at least \"cpu\"".into());
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_config_parses_and_equals_defaults() {
        let text = include_str!("../config/anomalyd.toml");
        let cfg = Config::parse(text, Path::new("config/anomalyd.toml")).unwrap();
        assert_eq!(cfg, Config::default());
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let e = Config::parse("[detect]\npixel = 3\n", Path::new("c.toml")).unwrap_err().to_string();
        assert!(e.contains("pixel"), "{e}");
        let e = Config::parse("[engin]\n", Path::new("c.toml")).unwrap_err().to_string();
        assert!(e.contains("engin"), "{e}");
    }

    #[test]
    fn every_invalid_value_is_reported_at_once() {
        let e = Config::parse("[detect]\npool = 2\nstrides = [32]\ntop_fraction = 0.0\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("detect.pool") && e.contains("detect.strides") && e.contains("detect.top_fraction"), "{e}");
    }
}
