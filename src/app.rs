//! The commands behind the CLI. This is the only place (with `main`) that uses `anyhow`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Parser;
use image::RgbImage;

use crate::cli::{Cli, Command, DetectArgs};
use crate::commands::{bench, eval};
use crate::config::Config;
use crate::detect::detector::Detector;
use crate::detect::enrolment::Enrolment;
use crate::detect::overlay;
use crate::enrol::{file as enrolment, reference};
use crate::source::demo;
use crate::util::imageio;

/// `anomalyd passwd`: the argon2 hash of the first line of standard input.
fn passwd_cmd() -> Result<ExitCode> {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).context("cannot read the password from standard input")?;
    let password = line.trim_end_matches(['\n', '\r']);
    if password.chars().count() < 8 {
        bail!("the password (the first line of standard input) must have at least 8 characters");
    }
    println!("{}", crate::control::ui::auth::hash_password(password));
    Ok(ExitCode::SUCCESS)
}

/// Parses the command line, runs the command and returns the process exit code.
pub fn run() -> Result<ExitCode> {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    if let Command::Validate { file } = &cli.command {
        return validate_cmd(file.as_deref().or(cli.config.as_deref()));
    }
    if let Command::Passwd = cli.command {
        return passwd_cmd();
    }
    let base = match &cli.config {
        Some(p) => Config::load(p)?,
        None if matches!(cli.command, Command::Run { .. }) => Config::demo(),
        None => Config::default(),
    };
    match cli.command {
        Command::Validate { .. } | Command::Passwd => unreachable!("handled above"),
        Command::Run { duration } => run_cmd(base, cli.config.clone(), duration),
        Command::Demo { out, opts } => demo_cmd(&configure(base, &opts)?, &out),
        Command::Enroll { reference, out, refine, zones, opts } => {
            let cfg = configure(base, &opts)?;
            let zones = zones.as_deref().map(reference::load_zones).transpose()?.unwrap_or_default();
            if refine.is_some() && !zones.is_empty() {
                bail!("--zones is for a new enrolment, not --refine (a refined enrolment keeps its own zones)");
            }
            let mut det = detector(&cfg)?;
            let e = match (&refine, reference.as_slice()) {
                (None, _) => reference::enroll_from(&mut det, &reference, &zones, &cfg.detect, &mut log_progress)?,
                (Some(dir), [one]) => {
                    let base = load_reference(&mut det, one, &cfg)?;
                    let (e, r) = reference::refine(&mut det, &base, dir, &cfg.detect, &mut log_progress)?;
                    println!(
                        "learned from {} of {} line images ({} refused by the guard)",
                        r.entered, r.parts, r.refused
                    );
                    e
                }
                (Some(_), _) => bail!("--refine takes one --reference: an enrolment file or a folder of shots"),
            };
            enrolment::save(&e, &out)?;
            println!(
                "enrolled {} reference(s) into {} (image threshold {:.4}, pixel threshold {:.4})",
                e.meta.references.len(),
                out.display(),
                e.meta.thresholds.image,
                e.meta.thresholds.pixel
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect { images, reference, out, image_threshold, pixel_threshold, opts } => {
            let cfg = configure(base, &opts)?;
            let mut det = detector(&cfg)?;
            let mut e = load_reference(&mut det, &reference, &cfg)?;
            if let Some(t) = image_threshold {
                e.meta.thresholds.image = t;
                e.meta.thresholds.source = "user".into();
            }
            if let Some(t) = pixel_threshold {
                e.meta.thresholds.pixel = t;
                e.meta.thresholds.source = "user".into();
            }
            inspect_cmd(&mut det, &e, &images, &out)
        }
        Command::Enrolments { camera, product, rollback, to } => {
            let root = &base.daemon.enrolments;
            if root.as_os_str().is_empty() {
                bail!("daemon.enrolments is \"\": this configuration keeps no learned versions");
            }
            // A recipe's versions are kept under <camera>.<recipe>.
            let key = product.as_ref().map_or_else(|| camera.clone(), |p| format!("{camera}.{p}"));
            let v = crate::enrol::versions::Versions::existing(root, &key)?;
            if rollback {
                let active = v.rollback(to)?;
                println!(
                    "camera {key}: version {active} is active now{}; reload the daemon to apply it (SIGHUP or POST /v1/reload)",
                    if active == 0 { " (the base enrolment)" } else { "" }
                );
            }
            println!("versions: {:?}, active: {:?}", v.list()?, v.active()?);
            for c in v.history()? {
                println!(
                    "{}  {:<8} -> version {}  threshold {}  {}",
                    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(c.unix)),
                    c.action,
                    c.version,
                    c.image_threshold.map_or("base".into(), |t| format!("{t:.4}")),
                    c.note
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval { dir, shots, seeds, json, line, learn_parts, contamination, baseline, opts } => {
            if !(0.0..0.5).contains(&contamination) {
                bail!("--contamination {contamination}: use a share of defective parts in [0, 0.5)");
            }
            let line = line.then_some(eval::Line { parts: learn_parts, contamination });
            eval_cmd(&configure(base, &opts)?, &dir, &shots, &seeds, line, baseline, json.as_deref())
        }
        Command::Chat { frame_id, url, token_file, image, reference, questions, llm_model, product, opts } => {
            let mut cfg = configure(base, &opts)?;
            if let Some(m) = llm_model {
                cfg.llm.model = m;
            }
            let product = product.or_else(|| cfg.camera.first().and_then(|c| c.product.clone()));
            match (frame_id, image, reference) {
                (_, Some(img), Some(r)) => Ok(crate::commands::chat::local(&cfg, &img, &r, product, &questions)?),
                (Some(id), _, _) => {
                    Ok(crate::commands::chat::remote(&cfg, &id, url.as_deref(), token_file.as_deref(), &questions)?)
                }
                _ => bail!("give a FRAME_ID, or --image with --reference"),
            }
        }
        Command::Bench { llm: true, seconds, frames, json, llm_model, opts, .. } => {
            let mut cfg = configure(base, &opts)?;
            if let Some(m) = llm_model {
                cfg.llm.model = m;
            }
            let report = bench::llm(&cfg, frames, seconds)?;
            println!("{report}");
            if let Some(p) = json {
                std::fs::write(&p, serde_json::to_string_pretty(&report)?)
                    .with_context(|| format!("writing {}", p.display()))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { e2e: true, seconds, json, opts, .. } => {
            let cfg = configure(base, &opts)?;
            let report = runtime()?.block_on(crate::commands::e2e::run(&cfg, seconds))?;
            println!("{report}");
            if let Some(p) = json {
                std::fs::write(&p, serde_json::to_string_pretty(&report)?)
                    .with_context(|| format!("writing {}", p.display()))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { reference, frames, warmup, batch, json, opts, .. } => {
            let cfg = configure(base, &opts)?;
            let mut det = detector(&cfg)?;
            let (e, imgs) = match &reference {
                Some(r) => {
                    let e = load_reference(&mut det, r, &cfg)?;
                    let imgs =
                        if r.is_dir() { load_dir(r)?.into_iter().map(|(_, i)| i).collect() } else { demo_frames() };
                    (e, imgs)
                }
                None => {
                    let refs = demo::reference();
                    (det.enroll(&refs, &cfg.detect, &mut log_progress)?, demo_frames())
                }
            };
            if batch == 0 {
                bail!("--batch must be at least 1");
            }
            let report = bench::run_batched(&mut det, &e, &imgs, frames, warmup, batch)?;
            println!("{report}");
            if let Some(p) = json {
                std::fs::write(&p, serde_json::to_string_pretty(&report)?)
                    .with_context(|| format!("writing {}", p.display()))?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("anomalyd-io")
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// `anomalyd validate`: every problem of the file at once, with its key and the fix.
fn validate_cmd(file: Option<&Path>) -> Result<ExitCode> {
    let Some(file) = file else {
        bail!("give the file to check: anomalyd validate FILE (or --config FILE)");
    };
    let cfg = match Config::read(file) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(2));
        }
    };
    let problems = crate::daemon::problems(&cfg);
    if problems.is_empty() {
        println!("{}: ok ({} camera(s))", file.display(), cfg.camera.len());
        return Ok(ExitCode::SUCCESS);
    }
    report_problems(file, &problems)
}

fn report_problems(file: &Path, problems: &[String]) -> Result<ExitCode> {
    eprintln!("{}: {} problem(s):", file.display(), problems.len());
    for p in problems {
        eprintln!("  - {p}");
    }
    Ok(ExitCode::from(2))
}

/// `anomalyd run`: the daemon, with SIGTERM/SIGINT draining and SIGHUP reloading `config_path`.
fn run_cmd(cfg: Config, config_path: Option<PathBuf>, duration: Option<f64>) -> Result<ExitCode> {
    use tokio::signal::unix::{SignalKind, signal};
    let rt = runtime()?;
    rt.block_on(async move {
        let notifier = crate::daemon::systemd::Systemd::from_env();
        // Installed before the start, which can take a while (enrolments load): a SIGTERM meanwhile
        // waits for it and then drains, instead of killing the process.
        let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let mut daemon = crate::daemon::Daemon::start(cfg).await?;
        daemon.set_config_path(config_path);
        // One pending SIGHUP is enough: a reload reads the file as it is when it runs.
        let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                if let Err(tokio::sync::mpsc::error::TrySendError::Closed(())) = reload_tx.try_send(()) {
                    break;
                }
            }
        });
        let shutdown = async move {
            let timer = async {
                match duration {
                    Some(s) => tokio::time::sleep(std::time::Duration::from_secs_f64(s.max(0.0))).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: draining"),
                _ = int.recv() => tracing::info!("SIGINT: draining"),
                _ = timer => tracing::info!("--duration reached: draining"),
            }
        };
        let (_, summary) = daemon.run(shutdown, reload_rx, &notifier).await;
        println!("published {} verdict(s)", summary.published);
        println!("summary: {}", serde_json::to_string(&summary)?);
        Ok(ExitCode::SUCCESS)
    })
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("anomalyd={default},ort=warn")));
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).try_init();
}

fn log_progress(msg: &str) {
    tracing::info!("{msg}");
}

/// Applies command-line overrides to the config and validates the result.
fn configure(mut cfg: Config, a: &DetectArgs) -> Result<Config> {
    if let Some(v) = a.pixels {
        cfg.detect.pixels = v;
    }
    if let Some(v) = &a.strides {
        cfg.detect.strides = v.clone();
    }
    if let Some(v) = a.geometry {
        cfg.detect.geometry = v;
    }
    if let Some(v) = a.foreground {
        cfg.detect.foreground = v;
    }
    if let Some(v) = &a.providers {
        cfg.engine.providers = v.clone();
    }
    if let Some(v) = a.threads {
        cfg.engine.threads = v;
    }
    if let Some(v) = &a.model {
        cfg.engine.model = Some(v.clone());
    }
    if let Some(v) = a.device {
        cfg.engine.device = v;
    }
    if let Some(v) = a.false_reject_target {
        cfg.detect.false_reject_target = v;
    }
    let problems = cfg.validate();
    if !problems.is_empty() {
        bail!("invalid settings:\n  {}", problems.join("\n  "));
    }
    Ok(cfg)
}

fn detector(cfg: &Config) -> Result<Detector> {
    Ok(Detector::load(&cfg.engine)?)
}

fn load_dir(dir: &Path) -> Result<Vec<(String, RgbImage)>> {
    Ok(reference::load_dir(dir)?)
}

fn enroll_from(det: &mut Detector, reference: &[PathBuf], cfg: &Config) -> Result<Enrolment> {
    Ok(reference::enroll_from(det, reference, &[], &cfg.detect, &mut log_progress)?)
}

/// An enrolment file, or a folder of references enrolled on the spot.
fn load_reference(det: &mut Detector, reference: &Path, cfg: &Config) -> Result<Enrolment> {
    Ok(reference::load(det, reference, &cfg.detect, &mut log_progress)?)
}

fn inspect_cmd(det: &mut Detector, e: &Enrolment, images: &[PathBuf], out: &Path) -> Result<ExitCode> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut failed = 0;
    let mut names = OverlayNames::default();
    for path in images {
        let img = match imageio::load_rgb(path) {
            Ok(i) => i,
            Err(err) => {
                eprintln!("error: {err}");
                failed += 1;
                continue;
            }
        };
        let ins = det.inspect(e, &img)?;
        let overlay_path = out.join(names.next(path));
        overlay::render(&img, &ins)
            .save(&overlay_path)
            .with_context(|| format!("writing {}", overlay_path.display()))?;
        let mut json = serde_json::to_value(&ins.verdict)?;
        json["image"] = path.display().to_string().into();
        json["overlay"] = overlay_path.display().to_string().into();
        println!("{json}");
        println!("{}: {}", path.display(), ins.verdict.answer);
    }
    Ok(if failed > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

/// Overlay file names, one per input and never the same twice in a run: `<stem>_overlay.png`, then
/// `<folder>_<stem>_overlay.png` for a second input of that name (`a/003.png`, `b/003.png`), then a count.
#[derive(Default)]
struct OverlayNames(std::collections::HashSet<String>);

impl OverlayNames {
    fn next(&mut self, input: &Path) -> String {
        let stem = input.file_stem().unwrap_or_default().to_string_lossy();
        let folder = input.parent().and_then(|p| p.file_name()).map(|f| f.to_string_lossy().into_owned());
        let mut candidates = vec![format!("{stem}_overlay.png")];
        candidates.extend(folder.map(|f| format!("{f}_{stem}_overlay.png")));
        let name = candidates.into_iter().find(|n| !self.0.contains(n)).unwrap_or_else(|| {
            (2..).map(|i| format!("{stem}_{i}_overlay.png")).find(|n| !self.0.contains(n)).expect("a free name")
        });
        self.0.insert(name.clone());
        name
    }
}

fn demo_frames() -> Vec<RgbImage> {
    (1..=8).map(|v| demo::part(v, demo::Defect::None)).collect()
}

fn demo_cmd(cfg: &Config, out: &Path) -> Result<ExitCode> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let reference = out.join("reference");
    std::fs::create_dir_all(&reference)?;
    let ref_path = reference.join("good_0.png");
    demo::part(0, demo::Defect::None).save(&ref_path)?;
    let mut queries = Vec::new();
    for (name, variant, defect) in
        [("good_1", 1, demo::Defect::None), ("scratch", 2, demo::Defect::Scratch), ("blob", 3, demo::Defect::Blob)]
    {
        let p = out.join(format!("{name}.png"));
        demo::part(variant, defect).save(&p)?;
        queries.push(p);
    }
    let mut det = detector(cfg)?;
    let e = enroll_from(&mut det, &[reference], cfg)?;
    let enrol_path = out.join("demo.enrol");
    enrolment::save(&e, &enrol_path)?;
    println!("enrolled the built-in part from 1 shot into {}", enrol_path.display());
    inspect_cmd(&mut det, &e, &queries, &out.join("overlays"))
}

fn eval_cmd(
    cfg: &Config,
    dir: &Path,
    shots: &[usize],
    seeds: &[u64],
    line: Option<eval::Line>,
    baseline: Option<crate::cli::Baseline>,
    json: Option<&Path>,
) -> Result<ExitCode> {
    if shots.is_empty() || shots.contains(&0) {
        bail!("--shots must be at least 1");
    }
    if line.is_some_and(|l| l.parts < crate::enrol::learn::MIN_PARTS) {
        bail!("--learn-parts must be at least {}", crate::enrol::learn::MIN_PARTS);
    }
    let cats = eval::categories(dir)?;
    let mut det = detector(cfg)?;
    let tests: u64 = cats
        .iter()
        .map(|(_, p)| {
            std::fs::read_dir(p.join("test"))
                .map(|rd| {
                    rd.flatten()
                        .filter_map(|d| imageio::image_files(&d.path()).ok())
                        .map(|v| v.len() as u64)
                        .sum::<u64>()
                })
                .unwrap_or(0)
        })
        .sum::<u64>();
    let passes = 1 + line.is_some() as u64 + baseline.is_some() as u64;
    let bar = indicatif::ProgressBar::new(tests * seeds.len() as u64 * shots.len() as u64 * passes);
    if std::io::stderr().is_terminal() {
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} images  {elapsed} (eta {eta}) {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let patchcore = eval::patchcore(&cfg.detect);
    let (mut reports, mut baselines) = (Vec::new(), Vec::new());
    for &k in shots {
        for (name, path) in &cats {
            let name = if shots.len() > 1 { format!("{name}@{k}shot") } else { name.clone() };
            bar.set_message(name.clone());
            let mut done = 0u64;
            let mut on_image = || {
                bar.inc(1);
                done += 1;
                if bar.is_hidden() && done.is_multiple_of(100) {
                    tracing::info!("{name}: {done} images inspected");
                }
            };
            let mut log = |m: &str| bar.suspend(|| tracing::info!("{m}"));
            let plan = eval::Plan { shots: k, seeds, detect: &cfg.detect, line };
            let e = eval::evaluate(&mut det, &name, path, &plan, &mut on_image, &mut log)?;
            reports.push(e.enrolment);
            reports.extend(e.line);
            if baseline.is_some() {
                let plan = eval::Plan { shots: k, seeds, detect: &patchcore, line: None };
                let mut b = eval::evaluate(&mut det, &name, path, &plan, &mut on_image, &mut log)?.enrolment;
                b.name = format!("{name}@patchcore");
                baselines.push(b);
            }
        }
    }
    bar.finish_and_clear();
    print!("{}", eval::table(&reports));
    if !baselines.is_empty() {
        println!("\nbaseline (image/pixel AUROC only; its verdicts use anomalyd's calibration):");
        print!("{}", eval::table(&baselines));
    }
    for r in &reports {
        for s in &r.skipped {
            println!("skipped: {s}");
        }
    }
    if let Some(p) = json {
        let mut report = eval::report_json(&reports);
        if !baselines.is_empty() {
            report["baseline"] = eval::report_json(&baselines);
        }
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
        println!("wrote {}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlays_of_inputs_with_the_same_name_do_not_overwrite_each_other() {
        let mut n = OverlayNames::default();
        assert_eq!(n.next(Path::new("a/003.png")), "003_overlay.png");
        assert_eq!(n.next(Path::new("b/003.png")), "b_003_overlay.png");
        assert_eq!(n.next(Path::new("c/b/003.png")), "003_2_overlay.png");
        assert_eq!(n.next(Path::new("004.png")), "004_overlay.png");
    }
}
