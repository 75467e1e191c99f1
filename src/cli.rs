//! Command-line interface.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "anomalyd",
    version,
    about = "Few-shot industrial anomaly detection: is this part good, and if not, where is the defect?"
)]
pub struct Cli {
    /// TOML configuration; see config/anomalyd.toml. ANOMALYD__SECTION__KEY variables override it.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// More log output (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the inspection daemon: cameras -> a verdict per frame on MQTT, metrics and health over HTTP.
    /// With no --config it runs the built-in demo: generated parts on an embedded broker.
    Run {
        /// Stop (draining every queued frame) after this many seconds; default: until SIGTERM or,
        /// for replay sources, until they end.
        #[arg(long)]
        duration: Option<f64>,
    },
    /// Check a configuration file and print every problem at once (exit status 2 if any).
    Validate {
        /// The file to check (default: --config).
        file: Option<PathBuf>,
    },
    /// Print the argon2 hash of a password read from standard input (its first line), for a
    /// `[[ui.operator]]`'s password_hash. The password itself is never printed or kept.
    Passwd,
    /// Inspect the built-in demo parts against their built-in reference (no dataset needed).
    Demo {
        /// Folder for the generated images, overlays and enrolment.
        #[arg(long, default_value = "anomalyd-demo")]
        out: PathBuf,
        #[command(flatten)]
        opts: DetectArgs,
    },
    /// Enrol normal reference images of a product into an enrolment file.
    Enroll {
        /// Folder of normal images (or image files); with --refine, an enrolment file.
        #[arg(long, required = true, num_args = 1..)]
        reference: Vec<PathBuf>,
        /// Enrolment file to write.
        #[arg(long)]
        out: PathBuf,
        /// Learn offline from a folder of unlabelled line images, as line mode does on the line: the
        /// guard sets defects aside, the rest grow the bank and refine the thresholds.
        #[arg(long)]
        refine: Option<PathBuf>,
        /// Regions to ignore or to inspect: a JSON list of {"kind": "ignore" | "inspect", "points":
        /// [[x, y], ...]}, corners in fractions of the frame (docs/CALIBRATION.md, "Zones").
        #[arg(long)]
        zones: Option<PathBuf>,
        #[command(flatten)]
        opts: DetectArgs,
    },
    /// Inspect images: verdict as JSON and text, and a heat-map overlay PNG per image.
    Inspect {
        /// Images to inspect.
        #[arg(required = true)]
        images: Vec<PathBuf>,
        /// Enrolment file, or folder of normal reference images to enrol first.
        #[arg(long)]
        reference: PathBuf,
        /// Folder for the overlays.
        #[arg(long, default_value = "anomalyd-out")]
        out: PathBuf,
        /// Override the automatic image threshold.
        #[arg(long)]
        image_threshold: Option<f32>,
        /// Override the automatic mask threshold.
        #[arg(long)]
        pixel_threshold: Option<f32>,
        #[command(flatten)]
        opts: DetectArgs,
    },
    /// What line mode learned for a camera (daemon.enrolments of --config): its enrolment versions and
    /// history. With --rollback, make an earlier version active; a running daemon applies it at its next
    /// reload (SIGHUP or POST /v1/reload), or use POST /v1/cameras/CAMERA/rollback, which reloads.
    Enrolments {
        /// The camera, as named in the config.
        camera: String,
        /// One of the camera's recipes: its versions (each recipe learns on its own).
        #[arg(long)]
        product: Option<String>,
        /// Make the version before the active one active.
        #[arg(long)]
        rollback: bool,
        /// With --rollback: this version instead (0 = the base enrolment).
        #[arg(long, requires = "rollback")]
        to: Option<u32>,
    },
    /// Few-shot evaluation on MVTec-layout folders: image/pixel AUROC, PRO, F1-max, accuracy.
    Eval {
        /// A category folder (train/good, test/<type>, ground_truth/<type>) or a folder of them.
        dir: PathBuf,
        /// Normal shots per category; several (1,4) run each in turn.
        #[arg(long, value_delimiter = ',', default_value = "1")]
        shots: Vec<usize>,
        /// Seeds: seed s uses train/good (sorted) [s*K, (s+1)*K).
        #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
        seeds: Vec<u64>,
        /// Write the report as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Also run line mode: after enrolment, learn from a warm-up stream of unused train/good images
        /// (with --contamination defective test images mixed in, no labels), then judge the rest.
        #[arg(long)]
        line: bool,
        /// Warm-up parts in line mode (fewer if train/good has fewer left).
        #[arg(long, default_value_t = 50)]
        learn_parts: usize,
        /// Share of defective parts in the line-mode warm-up stream.
        #[arg(long, default_value_t = 0.05)]
        contamination: f64,
        /// Also run a reference recipe on every category: `patchcore` (same encoder, shots and input;
        /// L2 nearest neighbour anywhere, image score = largest patch distance).
        #[arg(long)]
        baseline: Option<Baseline>,
        #[command(flatten)]
        opts: DetectArgs,
    },
    /// Ask about a verdict, in turns: a stored NG frame of the running daemon (FRAME_ID, through its
    /// HTTP API), or an image inspected here (--image with --reference) with the [llm] model in process.
    Chat {
        /// Frame id from a verdict on MQTT (e.g. demo-19c0d1e2f3a-3).
        #[arg(required_unless_present = "image")]
        frame_id: Option<String>,
        /// The daemon's HTTP API; default: http.listen of --config (http://127.0.0.1:9464).
        #[arg(long)]
        url: Option<String>,
        /// File with the daemon's bearer token; default: http.token_file (or http.token) of --config.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Inspect this image here instead of asking the daemon.
        #[arg(long, conflicts_with = "frame_id", requires = "reference")]
        image: Option<PathBuf>,
        /// Enrolment file or folder of normal images, with --image.
        #[arg(long)]
        reference: Option<PathBuf>,
        /// Questions to ask in order, then exit; default: read them from the terminal, one per line.
        #[arg(short = 'q', long = "question")]
        questions: Vec<String>,
        /// Local GGUF model, with --image (default: [llm] model, then models/llm/).
        #[arg(long)]
        llm_model: Option<PathBuf>,
        /// The product, in your words, for the model's prompt, with --image (default: the first camera's).
        #[arg(long)]
        product: Option<String>,
        #[command(flatten)]
        opts: DetectArgs,
    },
    /// Measure ms/frame per stage, frames/s, p50/p99 latency and peak memory.
    Bench {
        /// Measure the whole daemon instead: capture to publish through the embedded broker, with 1
        /// and 4 cameras.
        #[arg(long)]
        e2e: bool,
        /// Measure the language model instead: load time, tokens/s, first answer for an NG frame, and
        /// the frame path's frames/s with the model busy on every NG against without it.
        #[arg(long, conflicts_with = "e2e")]
        llm: bool,
        /// Local GGUF model for --llm (default: [llm] model, then models/llm/).
        #[arg(long)]
        llm_model: Option<PathBuf>,
        /// Seconds per camera count (--e2e).
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
        /// Enrolment file or folder of references; default: the built-in demo part.
        #[arg(long)]
        reference: Option<PathBuf>,
        /// Frames to inspect (the reference's own images, or demo parts).
        #[arg(long, default_value_t = 200)]
        frames: usize,
        /// Frames per inspection call (one GPU batch; on the CPU, frames one after another).
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 10)]
        warmup: usize,
        /// Write the report as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        #[command(flatten)]
        opts: DetectArgs,
    },
}

/// Detector and engine settings that override the config file.
#[derive(Debug, Clone, Default, Args)]
pub struct DetectArgs {
    /// Encoder input pixel budget (default 65536 = 256x256).
    #[arg(long)]
    pub pixels: Option<u32>,
    /// Encoder strides to match, e.g. 8,16.
    #[arg(long, value_delimiter = ',')]
    pub strides: Option<Vec<usize>>,
    /// auto | aligned | texture.
    #[arg(long)]
    pub geometry: Option<crate::config::detect::GeometryChoice>,
    /// Leave a plain background out of the score: auto | on | off.
    #[arg(long)]
    pub foreground: Option<crate::config::detect::Switch>,
    /// Execution providers in order, e.g. cuda,cpu.
    #[arg(long, value_delimiter = ',')]
    pub providers: Option<Vec<crate::config::engine::Provider>>,
    /// CPU threads for the encoder (0 = one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Encoder ONNX model (with its .json manifest beside it).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Where inspection runs: auto | cpu | cuda:N.
    #[arg(long)]
    pub device: Option<crate::config::engine::DeviceChoice>,
    /// Share of good parts the automatic threshold may reject (detect.false_reject_target).
    #[arg(long)]
    pub false_reject_target: Option<f64>,
}

/// Reference recipes `eval --baseline` runs beside anomalyd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Baseline {
    Patchcore,
}
