//! Entry points for fuzzing hostile input: each takes arbitrary bytes and must return, never panic
//! or allocate without bound. `fuzz/` drives them with cargo-fuzz (libFuzzer); the test suite replays
//! the committed corpus through them and runs a short random-mutation pass on every CI run. Exec
//! counts of both are in `docs/RESULTS.md` ("Fuzzing").

use std::path::Path;

/// A configuration file: parse, then validate everything (as `anomalyd validate` does).
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(cfg) = crate::config::Config::parse(text, Path::new("fuzz.toml")) {
        let _ = crate::daemon::problems(&cfg);
    }
}

/// An MQTT command or chat request payload, as the link takes it from the broker.
pub fn command(data: &[u8]) {
    if let Ok(e) = crate::types::command::parse_command(data) {
        // What passes the edge is within every bound.
        e.command.check().expect("a parsed command is checked");
    }
    let _ = crate::types::command::parse_chat(data);
}

/// An HTTP request body; the first byte picks the endpoint (trigger, chat, rollback).
pub fn http_body(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else { return };
    match which % 3 {
        0 => {
            if let Ok(c) = crate::control::http::trigger_body(body) {
                c.check().expect("a parsed trigger is checked");
            }
        }
        1 => {
            if let Ok(q) = crate::control::http::chat_body(body) {
                assert!(q.len() <= crate::types::command::MAX_QUESTION);
            }
        }
        _ => {
            let _ = crate::control::http::rollback_body(body);
        }
    }
}

/// An enrolment file's payload past its checksum: the checksum is recomputed here, so every mutation
/// reaches the header and bank parsers instead of stopping at "checksum mismatch".
pub fn enrolment_body(data: &[u8]) {
    use sha2::{Digest, Sha256};
    let mut file = data.to_vec();
    file.extend_from_slice(&Sha256::digest(data));
    enrolment(&file);
}

/// An enrolment file.
pub fn enrolment(data: &[u8]) {
    if let Ok(e) = crate::enrol::file::from_bytes(data, Path::new("fuzz.enrol")) {
        // A file that loads must serialise again.
        let _ = crate::enrol::file::to_bytes(&e);
    }
}

/// An encoded image, as a `files` camera or `inspect` reads it.
pub fn image(data: &[u8]) {
    let _ = crate::util::imageio::decode_rgb(data, Path::new("fuzz.img"));
}

/// A raw camera buffer: the first 6 bytes give width, height and stride (u16 each), the rest is the
/// buffer, as a GStreamer appsink hands it over.
pub fn frame(data: &[u8]) {
    if data.len() < 6 {
        return;
    }
    let w = u16::from_le_bytes([data[0], data[1]]) as usize;
    let h = u16::from_le_bytes([data[2], data[3]]) as usize;
    let stride = u16::from_le_bytes([data[4], data[5]]) as usize;
    if let Ok(img) = crate::util::imageio::rgb_from_strided(&data[6..], w, h, stride) {
        assert_eq!((img.width() as usize, img.height() as usize), (w, h));
    }
}

/// A fuzz target: arbitrary bytes in, nothing out (it must simply return).
pub type Target = fn(&[u8]);

/// Every target by name (for the corpus replay and the fuzz crate).
pub const TARGETS: [(&str, Target); 7] = [
    ("config", config),
    ("enrolment", enrolment),
    ("enrolment_body", enrolment_body),
    ("image", image),
    ("frame", frame),
    ("command", command),
    ("http_body", http_body),
];

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes the seed corpus (`ANOMALYD_UPDATE_CORPUS=1 cargo test --lib fuzzing`): the shipped configs,
    /// a small enrolment, a 64x64 image in each format, and raw frames with padded strides.
    fn write_seeds(root: &Path) {
        let put = |dir: &str, name: &str, bytes: &[u8]| {
            std::fs::create_dir_all(root.join(dir)).unwrap();
            std::fs::write(root.join(dir).join(name), bytes).unwrap();
        };
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        for f in [
            "config/anomalyd.toml",
            "config/examples/line.toml",
            "config/examples/replay.toml",
            "config/examples/recipes.toml",
            "config/examples/modbus.toml",
        ] {
            let name = f.rsplit('/').next().unwrap();
            put("config", name, &std::fs::read(manifest.join(f)).unwrap());
        }
        put("config", "camera-test.toml", b"[[camera]]\nname = \"c\"\n[camera.source]\nkind = \"test\"\n");
        let sample = crate::enrol::file::to_bytes(&crate::enrol::file::sample_for_tests());
        put("enrolment", "sample.enrol", &sample);
        put("enrolment_body", "sample.body", &sample[..sample.len() - 32]);
        for (name, payload) in [
            ("trigger.json", r#"{"cmd":"trigger","camera":"side","part_id":"P-000731","request_id":"r1","token":"t"}"#),
            ("reload.json", r#"{"cmd":"reload"}"#),
            ("chat.json", r#"{"cmd":"chat","frame_id":"top-1-2","question":"Where?\nWhy?","request_id":"q"}"#),
            ("ask.json", r#"{"frame_id":"top-1-2","question":"How large is it?","request_id":"hmi-7"}"#),
        ] {
            put("command", name, payload.as_bytes());
        }
        for (name, body) in [
            ("trigger.bin", b"\x00{\"camera\":\"c\",\"part_id\":\"P-1\"}".as_slice()),
            ("chat.bin", b"\x01{\"question\":\"Where exactly?\"}".as_slice()),
            ("rollback.bin", b"\x02{\"version\":2}".as_slice()),
        ] {
            put("http_body", name, body);
        }
        let img = crate::source::demo::part(1, crate::source::demo::Defect::Blob);
        let small = image::imageops::resize(&img, 64, 64, image::imageops::FilterType::Triangle);
        for (name, fmt) in [
            ("part.png", image::ImageFormat::Png),
            ("part.jpg", image::ImageFormat::Jpeg),
            ("part.bmp", image::ImageFormat::Bmp),
            ("part.tif", image::ImageFormat::Tiff),
            ("part.ppm", image::ImageFormat::Pnm),
        ] {
            let mut out = std::io::Cursor::new(Vec::new());
            small.write_to(&mut out, fmt).unwrap();
            put("image", name, out.get_ref());
        }
        for (w, h, stride) in [(4u16, 3u16, 12u16), (5, 2, 16), (90, 2, 272)] {
            let mut b = Vec::new();
            for v in [w, h, stride] {
                b.extend_from_slice(&v.to_le_bytes());
            }
            b.extend((0..stride as usize * h as usize).map(|i| i as u8));
            put("frame", &format!("{w}x{h}s{stride}.raw"), &b);
        }
    }

    /// Replays the committed corpus (fuzz/corpus/<target>/*), then mutates it at random for a
    /// moment: the short fuzz run of every CI build. `ANOMALYD_FUZZ_SECS` lengthens it.
    #[test]
    fn corpus_and_a_short_random_mutation_run_never_panic() {
        let secs: f64 = std::env::var("ANOMALYD_FUZZ_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(2.0);
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        if std::env::var_os("ANOMALYD_UPDATE_CORPUS").is_some() {
            write_seeds(&root);
        }
        let mut rng = crate::util::rng::Rng::new(0xF022);
        for (name, target) in TARGETS {
            let mut corpus: Vec<Vec<u8>> = std::fs::read_dir(root.join(name))
                .map(|rd| rd.flatten().filter_map(|e| std::fs::read(e.path()).ok()).collect())
                .unwrap_or_default();
            assert!(!corpus.is_empty(), "fuzz/corpus/{name} is empty");
            for input in &corpus {
                target(input);
            }
            let t0 = std::time::Instant::now();
            let mut runs = 0u64;
            while t0.elapsed().as_secs_f64() < secs {
                let mut input = corpus[rng.below(corpus.len() as u32) as usize].clone();
                for _ in 0..1 + rng.below(8) {
                    mutate(&mut input, &mut rng);
                }
                target(&input);
                runs += 1;
                if runs.is_multiple_of(64) && corpus.len() < 256 {
                    corpus.push(input);
                }
            }
            eprintln!("fuzz {name}: {} corpus inputs, {runs} mutated runs", corpus.len());
        }
    }

    fn mutate(b: &mut Vec<u8>, rng: &mut crate::util::rng::Rng) {
        let at = |rng: &mut crate::util::rng::Rng, n: usize| rng.below(n.max(1) as u32) as usize;
        match rng.below(6) {
            0 if !b.is_empty() => {
                let i = at(rng, b.len());
                b[i] ^= 1 << rng.below(8);
            }
            1 if !b.is_empty() => {
                let i = at(rng, b.len());
                b[i] = [0, 0xFF, 0x7F, 0x80][rng.below(4) as usize];
            }
            2 => {
                let i = at(rng, b.len() + 1);
                b.insert(i.min(b.len()), rng.below(256) as u8);
            }
            3 if !b.is_empty() => {
                let i = at(rng, b.len());
                b.remove(i);
            }
            4 => {
                let n = at(rng, b.len() + 1);
                b.truncate(n);
            }
            _ if b.len() > 2 => {
                let (i, j) = (at(rng, b.len()), at(rng, b.len()));
                let n = at(rng, 16).min(b.len() - i.max(j));
                let chunk: Vec<u8> = b[i..i + n].to_vec();
                b.splice(j..j, chunk);
            }
            _ => b.push(rng.below(256) as u8),
        }
    }
}
