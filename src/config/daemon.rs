//! The daemon's sections of the configuration: `[daemon]`, `[mqtt]`, `[http]`, `[store]` and one
//! `[[camera]]` per camera. Defaults are written once, here; `config/anomalyd.toml` documents each key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::source::SourceConfig;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Name of this box in MQTT topics and frame ids' messages.
    pub node: String,
    /// Which verdicts are logged: "all", "ng" (NG, SKIPPED, ERROR) or "none".
    pub log_verdicts: LogVerdicts,
    /// Stop (drain and exit 0) when every camera's source has ended, as replayed files do.
    pub exit_when_sources_end: bool,
    /// Longest a clean shutdown waits for the broker to acknowledge the last verdicts.
    pub drain_timeout_ms: u64,
    /// An artificial pause after each inspection, for overload drills. Keep 0 in production.
    pub inspect_delay_ms: u64,
    /// Folder of what line mode learned: one subfolder per camera with its enrolment versions and
    /// history ("" keeps none: a restart learns again).
    pub enrolments: PathBuf,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            node: "anomalyd".into(),
            log_verdicts: LogVerdicts::All,
            exit_when_sources_end: true,
            drain_timeout_ms: 10_000,
            inspect_delay_ms: 0,
            enrolments: "anomalyd-state/enrolments".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum LogVerdicts {
    All,
    Ng,
    None,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// "embedded" (a broker inside anomalyd on 127.0.0.1:embedded_port) or "host:port".
    pub broker: String,
    pub embedded_port: u16,
    /// Defaults to "anomalyd-<node>".
    pub client_id: Option<String>,
    pub username: Option<String>,
    /// File holding the password (first line); never logged.
    pub password_file: Option<PathBuf>,
    /// TLS: the CA bundle that signs the broker's certificate; setting it turns TLS on.
    pub ca_file: Option<PathBuf>,
    /// TLS client certificate and key (PEM), for brokers that require them.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// QoS of verdicts and status: 0, 1 (default) or 2.
    pub qos: u8,
    pub keep_alive_s: u64,
    /// Topic root: verdicts go to `<prefix>/<node>/<camera>/verdict`.
    pub topic_prefix: String,
    /// File holding a token (first line, at least 16 characters, mode 0600) that every command on the
    /// command and chat topics must carry as `"token"`; unset, any client of the broker may command.
    pub command_token_file: Option<PathBuf>,
    /// Sparkplug B instead of JSON verdicts (`sink::sparkplug`).
    pub sparkplug: SparkplugConfig,
}

/// `[mqtt.sparkplug]`: verdicts as Sparkplug B DDATA (the camera is the device, `daemon.node` the edge
/// node), with births, deaths and commands; the other topics (status, states, descriptions, chat, JSON
/// commands) stay as they are.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SparkplugConfig {
    pub enabled: bool,
    /// The Sparkplug group id: topics are `spBv1.0/<group_id>/...`.
    pub group_id: String,
    /// The primary host application whose STATE the births wait for; "" to publish without one.
    pub primary_host_id: String,
}

impl Default for SparkplugConfig {
    fn default() -> Self {
        Self { enabled: false, group_id: "anomalyd".into(), primary_host_id: String::new() }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            broker: "embedded".into(),
            embedded_port: 1883,
            client_id: None,
            username: None,
            password_file: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            qos: 1,
            keep_alive_s: 15,
            topic_prefix: "anomalyd".into(),
            command_token_file: None,
            sparkplug: SparkplugConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of /metrics, /healthz, /readyz and /v1/frames; "" turns the server off.
    pub listen: String,
    /// Bearer token for the endpoints that change state (POST /v1/reload, /v1/trigger). Prefer
    /// `token_file`; with neither set those endpoints answer 403.
    pub token: Option<Secret>,
    /// File holding the token (first line); it must not be readable by group or others (0600).
    pub token_file: Option<PathBuf>,
    /// Require the token for the read-only endpoints too (/metrics, /v1/frames); /healthz and
    /// /readyz stay open for probes.
    pub protect_reads: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self { listen: "127.0.0.1:9464".into(), token: None, token_file: None, protect_reads: false }
    }
}

/// A secret from the configuration: never printed (Debug shows `***`).
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    /// True when `given` is this secret; the time taken does not depend on where they differ.
    pub fn matches(&self, given: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), given.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// Why the HTTP token file cannot be used; each names `http.token_file` and the fix.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TokenError(String);

/// The HTTP token: from `token_file` (refused unless 0600) or `token`.
pub fn http_token(h: &HttpConfig) -> Result<Option<Secret>, TokenError> {
    match &h.token_file {
        Some(f) => token_file("http.token_file", f).map(Some),
        None => Ok(h.token.clone()),
    }
}

/// The command token, from `mqtt.command_token_file` (refused unless 0600).
pub fn command_token(m: &MqttConfig) -> Result<Option<Secret>, TokenError> {
    m.command_token_file.as_deref().map(|f| token_file("mqtt.command_token_file", f)).transpose()
}

/// A token from a file only its owner can read, at least 16 characters long.
fn token_file(key: &str, f: &Path) -> Result<Secret, TokenError> {
    let meta = std::fs::metadata(f).map_err(|e| TokenError(format!("{key} = {}: {e}", f.display())))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(TokenError(format!(
                "{key} = {} has mode {mode:o}: others can read it; chmod 600 it",
                f.display()
            )));
        }
    }
    let _ = meta;
    let token = read_secret(f).map_err(|e| TokenError(format!("{key} = {}: {e}", f.display())))?;
    if token.len() < 16 {
        return Err(TokenError(format!("{key} = {}: the token is shorter than 16 characters", f.display())));
    }
    Ok(Secret(token))
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Folder of the flagged (NG) frames; "" keeps none.
    pub dir: PathBuf,
    /// Byte budget; the oldest frames are deleted first above it.
    pub max_bytes: u64,
    /// JPEG quality of the stored frame and overlay.
    pub jpeg_quality: u8,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self { dir: "anomalyd-state/flagged".into(), max_bytes: 512 << 20, jpeg_quality: 90 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// The durable log of verdicts not yet acknowledged by the broker (a redb file).
    pub path: PathBuf,
    /// Byte bound; past it the oldest unpublished verdicts are evicted (counted and logged).
    pub max_bytes: u64,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self { path: "anomalyd-state/outbox.redb".into(), max_bytes: 256 << 20 }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Trigger {
    /// Inspect every frame the source delivers.
    #[default]
    EveryFrame,
    /// Inspect the next frame after each PLC trigger on the command topic, tagged with its part id.
    Triggered,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CameraConfig {
    /// Letters, digits, `-` and `_`: it appears in topics, frame ids and metric labels.
    pub name: String,
    pub source: SourceConfig,
    /// Enrolment file or folder of normal images of the product. Unset only for a `demo` source
    /// (its built-in reference part).
    #[serde(default)]
    pub reference: Option<PathBuf>,
    #[serde(default)]
    pub trigger: Trigger,
    /// A trigger with no frame after this long gets an ERROR verdict carrying its part id.
    #[serde(default = "default_trigger_timeout_ms")]
    pub trigger_timeout_ms: u64,
    /// Frames that may wait for inspection; a live camera's frame that finds the queue full is SKIPPED.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// A frame that waited longer than this is SKIPPED as stale instead of inspected late.
    #[serde(default = "default_max_age_ms")]
    pub max_age_ms: u64,
    /// The product, in the operator's words, for the language model's prompt.
    #[serde(default)]
    pub product: Option<String>,
    /// Line mode: the first this many parts after enrolment refine the thresholds and grow the bank
    /// (docs/CALIBRATION.md); 0 turns learning off. Their verdicts use the enrolment's threshold and
    /// carry `"learning": true`.
    #[serde(default = "default_learn_parts")]
    pub learn_parts: usize,
    /// `[[camera.recipe]]`: the products this camera inspects, each with its own enrolment, all loaded
    /// at start and switched by the PLC (docs/PLC.md). Empty: the camera inspects `reference` only.
    #[serde(default)]
    pub recipe: Vec<RecipeConfig>,
    /// The recipe in use at start (and after a reload that removed the one in use); unset = the first.
    #[serde(default)]
    pub start_recipe: Option<String>,
}

/// One product a camera inspects: a name the PLC selects it by, and its enrolment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RecipeConfig {
    /// Letters, digits, `-` and `_`: the product id a PLC sends, and the `product` of every verdict.
    pub name: String,
    /// Enrolment file or folder of normal images of this product.
    pub reference: PathBuf,
    /// The product in the operator's words, for the language model's prompt (unset: the camera's).
    #[serde(default)]
    pub product: Option<String>,
}

/// Most recipes one camera may hold: each is loaded at start and kept in memory.
pub const MAX_RECIPES: usize = 64;

const fn default_trigger_timeout_ms() -> u64 {
    2000
}
const fn default_queue() -> usize {
    4
}
const fn default_max_age_ms() -> u64 {
    5000
}
const fn default_learn_parts() -> usize {
    50
}

/// Line mode learns from no fewer parts than this (fewer accepted parts leave the enrolment unchanged).
pub const MIN_LEARN_PARTS: usize = 6;

impl CameraConfig {
    /// The built-in demo camera: generated parts, some defective, against the built-in reference.
    pub fn demo() -> Self {
        CameraConfig {
            name: "demo".into(),
            source: SourceConfig::demo_default(),
            reference: None,
            trigger: Trigger::EveryFrame,
            trigger_timeout_ms: default_trigger_timeout_ms(),
            queue: default_queue(),
            max_age_ms: default_max_age_ms(),
            product: Some("a machined steel plate with four bolt holes and a printed label".into()),
            learn_parts: default_learn_parts(),
            recipe: Vec::new(),
            start_recipe: None,
        }
    }
}

/// A name usable in topics, ids and labels.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Whether `id` may be a Sparkplug group, edge node or host id: not empty, no `/`, `+` or `#`.
pub fn valid_sparkplug_id(id: &str) -> bool {
    !id.is_empty() && !id.contains(['/', '+', '#'])
}

/// Problems of the daemon sections, each naming its key and the fix.
pub fn validate(cfg: &crate::config::Config) -> Vec<String> {
    let (d, m, h, s, cams) = (&cfg.daemon, &cfg.mqtt, &cfg.http, &cfg.store, &cfg.camera);
    let mut p = Vec::new();
    if cfg.outbox.path.as_os_str().is_empty() {
        p.push("outbox.path is empty: verdicts must be logged before they are published; give a file path".into());
    }
    if cfg.outbox.max_bytes < 1 << 20 {
        p.push(format!("outbox.max_bytes = {}: use at least 1048576 (1 MiB)", cfg.outbox.max_bytes));
    }
    if !valid_name(&d.node) {
        p.push(format!("daemon.node = {:?}: use 1-64 letters, digits, '-' or '_' (it is part of MQTT topics)", d.node));
    }
    if m.broker != "embedded" && broker_addr(&m.broker).is_none() {
        p.push(format!("mqtt.broker = {:?}: use \"embedded\" or \"host:port\" (e.g. \"127.0.0.1:1883\")", m.broker));
    }
    if m.qos > 2 {
        p.push(format!("mqtt.qos = {}: use 0, 1 or 2", m.qos));
    }
    if m.sparkplug.enabled {
        let sp = &m.sparkplug;
        if !valid_sparkplug_id(&sp.group_id) {
            p.push(format!("mqtt.sparkplug.group_id = {:?}: use a non-empty id without '/', '+' or '#'", sp.group_id));
        }
        if !sp.primary_host_id.is_empty() && !valid_sparkplug_id(&sp.primary_host_id) {
            p.push(format!(
                "mqtt.sparkplug.primary_host_id = {:?}: use an id without '/', '+' or '#', or \"\" for none",
                sp.primary_host_id
            ));
        }
    }
    if m.keep_alive_s < 5 {
        p.push(format!("mqtt.keep_alive_s = {}: use at least 5", m.keep_alive_s));
    }
    if m.topic_prefix.is_empty() || m.topic_prefix.contains(['+', '#']) || m.topic_prefix.ends_with('/') {
        p.push(format!("mqtt.topic_prefix = {:?}: use a topic without wildcards or a trailing '/'", m.topic_prefix));
    }
    if m.cert_file.is_some() != m.key_file.is_some() {
        p.push("mqtt.cert_file and mqtt.key_file go together: set both or neither".into());
    }
    if m.cert_file.is_some() && m.ca_file.is_none() {
        p.push("mqtt.cert_file needs mqtt.ca_file (TLS is on only with a CA)".into());
    }
    if m.broker == "embedded" && m.ca_file.is_some() {
        p.push("the embedded broker is plain MQTT on 127.0.0.1: TLS needs mqtt.broker = \"host:port\"".into());
    }
    for (key, f) in [
        ("mqtt.password_file", &m.password_file),
        ("mqtt.ca_file", &m.ca_file),
        ("mqtt.cert_file", &m.cert_file),
        ("mqtt.key_file", &m.key_file),
    ] {
        if let Some(f) = f
            && !f.is_file()
        {
            p.push(format!("{key} = {}: no such file", f.display()));
        }
    }
    if m.password_file.is_some() && m.username.is_none() {
        p.push("mqtt.password_file needs mqtt.username".into());
    }
    if let Err(e) = command_token(m) {
        p.push(e.to_string());
    }
    if let Err(e) = http_token(h) {
        p.push(e.to_string());
    }
    if h.token.as_ref().is_some_and(|t| t.0.len() < 16) {
        p.push("http.token is shorter than 16 characters: use a long random token (openssl rand -hex 32)".into());
    }
    if h.token.is_some() && h.token_file.is_some() {
        p.push("http.token and http.token_file are both set: keep one (token_file is preferred)".into());
    }
    if !h.listen.is_empty() && h.listen.parse::<SocketAddr>().is_err() {
        p.push(format!("http.listen = {:?}: use \"address:port\" (e.g. \"127.0.0.1:9464\") or \"\" for off", h.listen));
    }
    if !(1..=100).contains(&s.jpeg_quality) {
        p.push(format!("store.jpeg_quality = {}: use 1..=100", s.jpeg_quality));
    }
    if !s.dir.as_os_str().is_empty() && s.max_bytes < 1 << 20 {
        p.push(format!(
            "store.max_bytes = {}: use at least 1048576 (1 MiB), or store.dir = \"\" to keep none",
            s.max_bytes
        ));
    }
    if cams.is_empty() {
        p.push("no [[camera]] is configured: add one (see config/anomalyd.toml)".into());
    }
    let mut names = std::collections::HashSet::new();
    for (i, c) in cams.iter().enumerate() {
        let key = format!("camera[{i}]");
        if !valid_name(&c.name) {
            p.push(format!("{key}.name = {:?}: use 1-64 letters, digits, '-' or '_'", c.name));
        } else if !names.insert(c.name.as_str()) {
            p.push(format!("{key}.name = {:?} is used twice: camera names must be unique", c.name));
        }
        let min = MIN_LEARN_PARTS;
        if c.learn_parts != 0 && !(min..=1000).contains(&c.learn_parts) {
            p.push(format!("{key}.learn_parts = {}: use 0 (off) or {min} to 1000 parts", c.learn_parts));
        }
        p.extend(c.source.validate(&format!("{key}.source")));
        p.extend(validate_recipes(c, &key));
        match &c.reference {
            None if !c.source.is_demo() && c.recipe.is_empty() => {
                p.push(format!("{key}.reference is missing: give an enrolment file or a folder of normal images"))
            }
            Some(r) if !r.exists() => p.push(format!("{key}.reference = {}: no such file or folder", r.display())),
            _ => {}
        }
        if c.queue == 0 || c.queue > 1024 {
            p.push(format!("{key}.queue = {}: use 1..=1024", c.queue));
        }
        if c.max_age_ms < 10 {
            p.push(format!("{key}.max_age_ms = {}: use at least 10", c.max_age_ms));
        }
        if c.trigger == Trigger::Triggered && c.trigger_timeout_ms < 10 {
            p.push(format!("{key}.trigger_timeout_ms = {}: use at least 10", c.trigger_timeout_ms));
        }
    }
    p
}

/// Problems of a camera's recipes: names, references, and the one in use at start.
fn validate_recipes(c: &CameraConfig, key: &str) -> Vec<String> {
    let mut p = Vec::new();
    if c.recipe.is_empty() {
        if let Some(s) = &c.start_recipe {
            p.push(format!(
                "{key}.start_recipe = {s:?} but the camera has no [[camera.recipe]]: add them or remove it"
            ));
        }
        return p;
    }
    if c.reference.is_some() {
        p.push(format!(
            "{key}.reference is set beside [[camera.recipe]]: give each recipe its reference and remove this one"
        ));
    }
    if c.recipe.len() > MAX_RECIPES {
        p.push(format!("{key} has {} recipes: at most {MAX_RECIPES} are loaded", c.recipe.len()));
    }
    let mut names = std::collections::HashSet::new();
    for (j, r) in c.recipe.iter().enumerate() {
        let rkey = format!("{key}.recipe[{j}]");
        if !valid_name(&r.name) {
            p.push(format!("{rkey}.name = {:?}: use 1-64 letters, digits, '-' or '_'", r.name));
        } else if !names.insert(r.name.as_str()) {
            p.push(format!("{rkey}.name = {:?} is used twice: recipe names must be unique on a camera", r.name));
        }
        if !r.reference.exists() {
            p.push(format!("{rkey}.reference = {}: no such file or folder", r.reference.display()));
        }
    }
    if let Some(s) = &c.start_recipe
        && !c.recipe.iter().any(|r| &r.name == s)
    {
        p.push(format!("{key}.start_recipe = {s:?} is not one of the camera's recipes"));
    }
    p
}

/// `host:port` of a broker address.
pub fn broker_addr(s: &str) -> Option<(String, u16)> {
    let s = s.strip_prefix("mqtt://").or_else(|| s.strip_prefix("tcp://")).unwrap_or(s);
    let (host, port) = s.rsplit_once(':')?;
    let port = port.parse().ok()?;
    (!host.is_empty()).then(|| (host.trim_matches(['[', ']']).to_string(), port))
}

/// Reads the first line of a secret file.
pub fn read_secret(path: &Path) -> std::io::Result<String> {
    Ok(std::fs::read_to_string(path)?.lines().next().unwrap_or("").to_string())
}
