//! The TOML configuration: `[engine]` and `[detect]` (the inspection core), `[llm]` (words and
//! dialogue), and `[daemon]`, `[mqtt]`, `[http]`, `[store]`, `[modbus]`, `[opcua]`, `[ui]` and `[[camera]]` (the daemon). Every key is
//! optional but the cameras; unknown keys are refused. Environment variables `ANOMALYD__<SECTION>__<KEY>` override the file (e.g.
//! `ANOMALYD__MQTT__BROKER=10.0.0.5:1883`). `config/anomalyd.toml` documents every key.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::daemon::{CameraConfig, DaemonConfig, HttpConfig, MqttConfig, OutboxConfig, StoreConfig};
use crate::config::detect::DetectConfig;
use crate::config::engine::EngineConfig;
use crate::config::llm::LlmConfig;

pub mod daemon;
pub mod detect;
pub mod engine;
pub mod llm;
pub mod plc;
pub mod source;
pub mod ui;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub engine: EngineConfig,
    pub detect: DetectConfig,
    pub daemon: DaemonConfig,
    pub mqtt: MqttConfig,
    pub http: HttpConfig,
    pub store: StoreConfig,
    pub outbox: OutboxConfig,
    pub llm: LlmConfig,
    pub modbus: crate::config::plc::ModbusConfig,
    pub opcua: crate::config::plc::OpcUaConfig,
    pub ui: crate::config::ui::UiConfig,
    pub camera: Vec<CameraConfig>,
}

/// Prefix of environment overrides: `ANOMALYD__MQTT__BROKER` sets `mqtt.broker`.
pub const ENV_PREFIX: &str = "ANOMALYD";

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
    /// Reads a file, applies `ANOMALYD__*` environment overrides and validates the core sections.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let cfg = Self::read(path)?;
        let problems = cfg.validate();
        cfg.checked(path, problems)
    }

    /// Reads a file with its `ANOMALYD__*` environment overrides, without validating the values.
    pub fn read(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read { path: path.into(), cause })?;
        Self::layered(&text, path, true)
    }

    /// Parses a file's text (no environment) and validates the core sections.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg = Self::layered(text, path, false)?;
        let problems = cfg.validate();
        cfg.checked(path, problems)
    }

    /// The built-in default of `anomalyd run`: the demo camera on the embedded broker.
    pub fn demo() -> Config {
        Config { camera: vec![CameraConfig::demo()], ..Config::default() }
    }

    fn checked(self, path: &Path, problems: Vec<String>) -> Result<Config, ConfigError> {
        if problems.is_empty() { Ok(self) } else { Err(ConfigError::Invalid { path: path.into(), problems }) }
    }

    /// Every problem of the whole file, daemon sections included (`anomalyd validate`, `anomalyd run`).
    pub fn validate_all(&self) -> Vec<String> {
        let mut p = self.validate();
        p.extend(crate::config::daemon::validate(self));
        p.extend(self.modbus.validate());
        p.extend(self.opcua.validate());
        p.extend(self.ui.validate());
        p
    }

    /// The file through the `config` crate, with environment overrides on top. The file alone is
    /// parsed by `toml` first, so that its mistakes are reported with line and column.
    fn layered(text: &str, path: &Path, env: bool) -> Result<Config, ConfigError> {
        let parse_err = |message: String| ConfigError::Parse { path: path.into(), message };
        toml::from_str::<Config>(text).map_err(|e| parse_err(e.to_string()))?;
        let mut builder = config::Config::builder().add_source(config::File::from_str(text, config::FileFormat::Toml));
        if env {
            builder = builder.add_source(
                config::Environment::with_prefix(ENV_PREFIX).prefix_separator("__").separator("__").try_parsing(true),
            );
        }
        let merged = builder.build().map_err(|e| parse_err(e.to_string()))?;
        merged
            .try_deserialize::<Config>()
            .map_err(|e| parse_err(format!("{e} (after applying {ENV_PREFIX}__SECTION__KEY environment overrides)")))
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
        if let Some(s) = d.scale_augment.iter().find(|s| !(0.25..=4.0).contains(*s)) {
            p.push(format!("detect.scale_augment holds {s}: use scales between 0.25 and 4"));
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
        if d.search_lists > 0 && !(1..=d.search_lists).contains(&d.search_probe) {
            p.push(format!(
                "detect.search_probe = {}: use 1 to detect.search_lists ({})",
                d.search_probe, d.search_lists
            ));
        }
        if !(0.0..0.5).contains(&d.min_region) {
            p.push(format!("detect.min_region = {}: use a fraction below 0.5", d.min_region));
        }
        if !(d.false_reject_target > 0.0 && d.false_reject_target <= 0.2) {
            p.push(format!(
                "detect.false_reject_target = {}: use the share of good parts the line may reject, in (0, 0.2] (e.g. 0.05)",
                d.false_reject_target
            ));
        }
        if d.normal_views == 0 || d.anomaly_views < 3 {
            p.push("detect.normal_views must be at least 1 and detect.anomaly_views at least 3".into());
        }
        if self.engine.providers.is_empty() {
            p.push("engine.providers is empty: list at least \"cpu\"".into());
        }
        p.extend(self.llm.validate());
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_config_parses_and_equals_the_builtin_default() {
        let text = include_str!("../../config/anomalyd.toml");
        let cfg = Config::parse(text, Path::new("config/anomalyd.toml")).unwrap();
        assert_eq!(cfg, Config::demo());
        assert!(cfg.validate_all().is_empty(), "{:?}", cfg.validate_all());
    }

    #[test]
    fn example_configs_parse() {
        for (name, text) in [
            ("config/examples/line.toml", include_str!("../../config/examples/line.toml")),
            ("config/examples/replay.toml", include_str!("../../config/examples/replay.toml")),
            ("config/examples/recipes.toml", include_str!("../../config/examples/recipes.toml")),
            ("config/examples/modbus.toml", include_str!("../../config/examples/modbus.toml")),
            ("config/examples/opcua.toml", include_str!("../../config/examples/opcua.toml")),
            ("config/examples/sparkplug.toml", include_str!("../../config/examples/sparkplug.toml")),
        ] {
            let cfg = Config::parse(text, Path::new(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!cfg.camera.is_empty(), "{name}");
        }
    }

    #[test]
    fn recipes_are_checked_with_their_keys() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().display();
        let cam = |extra: &str, recipes: &str| {
            let text = format!("[[camera]]\nname = \"c\"\n{extra}[camera.source]\nkind = \"demo\"\n{recipes}");
            Config::parse(&text, Path::new("c.toml")).unwrap().validate_all().join("\n")
        };
        let recipe = |name: &str, reference: &str| {
            format!("[[camera.recipe]]\nname = \"{name}\"\nreference = \"{reference}\"\n")
        };
        let good = recipe("a", &a.to_string()) + &recipe("b", &a.to_string());
        assert_eq!(cam("start_recipe = \"b\"\n", &good), "");
        let all = cam(
            &format!("reference = \"{a}\"\nstart_recipe = \"z\"\n"),
            &(recipe("a", &a.to_string()) + &recipe("a", "/nowhere") + &recipe("x/y", &a.to_string())),
        );
        for want in [
            "camera[0].reference is set beside [[camera.recipe]]",
            "camera[0].recipe[1].name = \"a\" is used twice",
            "camera[0].recipe[1].reference = /nowhere: no such file or folder",
            "camera[0].recipe[2].name = \"x/y\"",
            "camera[0].start_recipe = \"z\" is not one of the camera's recipes",
        ] {
            assert!(all.contains(want), "{want} missing from:\n{all}");
        }
        assert!(cam("start_recipe = \"a\"\n", "").contains("has no [[camera.recipe]]"));
    }

    #[test]
    fn camera_sources_are_tagged_by_kind_and_checked() {
        let text = "[[camera]]\nname = \"c1\"\nreference = \"/x\"\n[camera.source]\nkind = \"test\"\nfps = 0\n";
        let cfg = Config::parse(text, Path::new("c.toml")).unwrap();
        assert!(matches!(cfg.camera[0].source, crate::config::source::SourceConfig::Test { fps: 0, .. }));
        let all = cfg.validate_all().join("\n");
        assert!(all.contains("camera[0].source.fps") && all.contains("camera[0].reference"), "{all}");
        let e = Config::parse("[[camera]]\nname = \"c\"\n[camera.source]\nkind = \"webcam\"\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("webcam"), "{e}");
    }

    #[test]
    fn daemon_problems_are_all_reported_with_their_keys() {
        let cfg = Config {
            daemon: DaemonConfig { node: "line 1/a".into(), ..DaemonConfig::default() },
            mqtt: MqttConfig { qos: 3, broker: "nohost".into(), ..MqttConfig::default() },
            http: HttpConfig { listen: "localhost".into(), ..HttpConfig::default() },
            ..Config::default()
        };
        let all = cfg.validate_all().join("\n");
        for key in ["daemon.node", "mqtt.qos", "mqtt.broker", "http.listen", "no [[camera]]"] {
            assert!(all.contains(key), "{key} missing from {all}");
        }
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
        let e = Config::parse(
            "[detect]\npool = 2\nstrides = [32]\ntop_fraction = 0.0\nscale_augment = [0.0]\n",
            Path::new("c.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("detect.pool") && e.contains("detect.strides") && e.contains("detect.top_fraction"), "{e}");
        assert!(e.contains("detect.scale_augment"), "{e}");
    }

    #[test]
    fn the_false_reject_target_and_the_warm_up_are_checked() {
        let e = Config::parse("[detect]\nfalse_reject_target = 0.5\n", Path::new("c.toml")).unwrap_err().to_string();
        assert!(e.contains("detect.false_reject_target = 0.5"), "{e}");
        let toml = "[[camera]]\nname = \"c\"\nlearn_parts = 3\n[camera.source]\nkind = \"demo\"\n";
        let problems = Config::parse(toml, Path::new("c.toml")).map(|c| c.validate_all());
        assert!(format!("{problems:?}").contains("camera[0].learn_parts = 3"), "{problems:?}");
    }
}
