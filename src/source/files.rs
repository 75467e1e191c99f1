//! The `files` source: replays images from a folder (recursively, sorted) or a glob such as
//! `dir/*.png`, decoded exactly as `anomalyd inspect` decodes them. A file that cannot be decoded
//! becomes an ERROR verdict with the decoder's reason.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use super::{SourceEnd, pace};
use crate::source::intake::Intake;
use crate::util::imageio;

/// The image files a `path` setting names, in replay order.
pub fn list(path: &str) -> Result<Vec<PathBuf>, String> {
    let p = Path::new(path);
    if p.is_dir() {
        let mut out = Vec::new();
        walk(p, &mut out)?;
        out.sort();
        return Ok(out);
    }
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if !name.contains(['*', '?']) {
        return if p.is_file() { Ok(vec![p.to_path_buf()]) } else { Err("no such file or folder".into()) };
    }
    let dir = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if dir.to_string_lossy().contains(['*', '?']) {
        return Err("only the file name may hold wildcards (* and ?)".into());
    }
    let rd = std::fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut out: Vec<PathBuf> = rd
        .flatten()
        .map(|d| d.path())
        .filter(|f| f.is_file() && f.file_name().and_then(|n| n.to_str()).is_some_and(|n| wildcard(name, n)))
        .collect();
    out.sort();
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), String> {
    out.extend(imageio::image_files(dir).map_err(|e| e.to_string())?);
    let rd = std::fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut subdirs: Vec<PathBuf> = rd.flatten().map(|d| d.path()).filter(|p| p.is_dir()).collect();
    subdirs.sort();
    for d in subdirs {
        walk(&d, out)?;
    }
    Ok(())
}

/// `*` (any run) and `?` (one character) matching of a whole file name.
fn wildcard(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

pub fn run(files: Vec<PathBuf>, fps: f32, repeat: bool, intake: Intake) -> SourceEnd {
    let period = if fps > 0.0 { Some(Duration::from_secs_f64(1.0 / fps as f64)) } else { None };
    let start = Instant::now();
    let mut n = 0u64;
    loop {
        for path in &files {
            if let Some(p) = period {
                if !pace(start + p.mul_f64(n as f64), &intake) {
                    return SourceEnd::Stopped;
                }
            } else {
                // Replay as fast as inspected; a triggered camera waits for its trigger.
                while !intake.wants_frame() {
                    if intake.stopping() {
                        return SourceEnd::Stopped;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            if intake.stopping() {
                return SourceEnd::Stopped;
            }
            // A replay folder on a share that vanished is an unplugged camera: fail, and be restarted.
            if let Some(dir) = path.parent()
                && !dir.exists()
            {
                return SourceEnd::Failed(format!("{} disappeared", dir.display()));
            }
            n += 1;
            let (captured, at) = (SystemTime::now(), Instant::now());
            let image = imageio::load_rgb(path).map_err(|e| e.to_string());
            if let Err(e) = &image {
                tracing::warn!(camera = %intake.camera.name, "{e}");
            }
            intake.offer(image, captured, at);
        }
        if !repeat {
            return SourceEnd::Eos;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_whole_names() {
        assert!(wildcard("*.png", "a.png"));
        assert!(wildcard("good_??.png", "good_01.png"));
        assert!(!wildcard("*.png", "a.png.bak"));
        assert!(!wildcard("good_?.png", "good_10.png"));
        assert!(wildcard("*", "x"));
    }

    #[test]
    fn folders_are_walked_sorted_and_globs_filtered() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("b")).unwrap();
        for f in ["z.png", "a.png", "b/c.png", "notes.txt"] {
            std::fs::write(dir.path().join(f), b"x").unwrap();
        }
        let all = list(dir.path().to_str().unwrap()).unwrap();
        let names: Vec<_> =
            all.iter().map(|p| p.strip_prefix(dir.path()).unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["a.png", "b/c.png", "z.png"]);
        let glob = format!("{}/z*", dir.path().display());
        assert_eq!(list(&glob).unwrap().len(), 1);
        assert!(list("/no/such/dir/x.png").is_err());
    }
}
