//! The enrolment file: a product's decisions, thresholds and memory bank, versioned and checksummed.
//!
//! Layout (little-endian):
//! ```text
//! magic      16 bytes  "ANOMALYD-ENROL\0\0"
//! version    u32       FORMAT_VERSION
//! layers     u32       number of bank layers
//! meta_len   u64       length of the JSON header
//! meta       JSON      EnrolmentMeta
//! per layer: stride u32, index u32, dim u32, rows u64, rows * dim f32, then rows * 2 f32 positions
//! sha256     32 bytes  of everything above
//! ```
//! Loading checks the magic, version, every length against the file size, the checksum and the header
//! before it allocates, so a corrupt or hostile file is an error, never a panic or a huge allocation.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::detect::enrolment::{Bank, Enrolment, EnrolmentMeta};

const MAGIC: &[u8; 16] = b"ANOMALYD-ENROL\0\0";
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum EnrolmentError {
    #[error("cannot read enrolment {path}: {cause}")]
    Read { path: PathBuf, cause: std::io::Error },
    #[error("cannot write enrolment {path}: {cause}")]
    Write { path: PathBuf, cause: std::io::Error },
    #[error("{path} is not an anomalyd enrolment file (wrong magic bytes)")]
    NotEnrolment { path: PathBuf },
    #[error("{path} has enrolment format version {found}; this anomalyd reads version {FORMAT_VERSION}: enrol again")]
    Version { path: PathBuf, found: u32 },
    #[error("{path} is corrupt: {reason}; enrol again from the reference images")]
    Corrupt { path: PathBuf, reason: String },
}

/// Serialises an enrolment to bytes.
/// An enrolment's id (`EnrolmentRef::id`): the first 16 hex digits of the sha256 of its bytes.
pub fn id(e: &Enrolment) -> String {
    id_of(&to_bytes(e))
}

/// The first 16 hex digits of the sha256 of some bytes.
pub fn id_of(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().take(8).map(|b| format!("{b:02x}")).collect()
}

pub fn to_bytes(e: &Enrolment) -> Vec<u8> {
    encode(&e.meta, &e.banks)
}

/// [`to_bytes`] of an enrolment's parts, without making the enrolment (and its search index).
pub fn encode(meta: &EnrolmentMeta, banks: &[Bank]) -> Vec<u8> {
    let meta = serde_json::to_vec(meta).expect("enrolment metadata serialises");
    let mut out = Vec::with_capacity(64 + meta.len() + banks.iter().map(|b| b.rows.len() * 4 + 20).sum::<usize>());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(banks.len() as u32).to_le_bytes());
    out.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    out.extend_from_slice(&meta);
    for (i, b) in banks.iter().enumerate() {
        out.extend_from_slice(&(b.stride as u32).to_le_bytes());
        out.extend_from_slice(&(i as u32).to_le_bytes());
        out.extend_from_slice(&(b.dim as u32).to_le_bytes());
        out.extend_from_slice(&(b.len() as u64).to_le_bytes());
        for v in b.rows.iter().chain(b.pos.iter().flatten()) {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    let digest = Sha256::digest(&out);
    out.extend_from_slice(&digest);
    out
}

/// Writes an enrolment atomically (temporary file, then rename).
pub fn save(e: &Enrolment, path: &Path) -> Result<(), EnrolmentError> {
    let werr = |cause| EnrolmentError::Write { path: path.to_path_buf(), cause };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(werr)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(werr)?;
    f.write_all(&to_bytes(e)).map_err(werr)?;
    f.sync_all().map_err(werr)?;
    std::fs::rename(&tmp, path).map_err(werr)
}

/// Reads and verifies an enrolment file.
pub fn load(path: &Path) -> Result<Enrolment, EnrolmentError> {
    let bytes = std::fs::read(path).map_err(|cause| EnrolmentError::Read { path: path.to_path_buf(), cause })?;
    from_bytes(&bytes, path)
}

/// Parses and verifies enrolment bytes; `path` only names the source in errors.
pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Enrolment, EnrolmentError> {
    let corrupt = |reason: String| EnrolmentError::Corrupt { path: path.to_path_buf(), reason };
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(EnrolmentError::NotEnrolment { path: path.to_path_buf() });
    }
    let mut r = Reader { bytes, pos: MAGIC.len() };
    let version = r.u32().ok_or_else(|| corrupt("truncated header".into()))?;
    if version != FORMAT_VERSION {
        return Err(EnrolmentError::Version { path: path.to_path_buf(), found: version });
    }
    if bytes.len() < MAGIC.len() + 16 + 32 {
        return Err(corrupt("truncated header".into()));
    }
    let (body, digest) = bytes.split_at(bytes.len() - 32);
    if Sha256::digest(body).as_slice() != digest {
        return Err(corrupt("checksum mismatch (the file was changed or cut short)".into()));
    }
    let r = &mut Reader { bytes: body, pos: r.pos };
    let layers = r.u32().ok_or_else(|| corrupt("truncated header".into()))?;
    let meta_len = r.u64().ok_or_else(|| corrupt("truncated header".into()))?;
    let meta_bytes =
        r.take(meta_len).ok_or_else(|| corrupt(format!("header of {meta_len} bytes runs past the end")))?;
    let meta: EnrolmentMeta =
        serde_json::from_slice(meta_bytes).map_err(|e| corrupt(format!("header does not parse: {e}")))?;
    if layers == 0 || layers > 8 {
        return Err(corrupt(format!("{layers} bank layers")));
    }
    let mut banks = Vec::new();
    for l in 0..layers {
        let trunc = || corrupt(format!("bank layer {l} is truncated"));
        let stride = r.u32().ok_or_else(trunc)? as usize;
        let index = r.u32().ok_or_else(trunc)?;
        let dim = r.u32().ok_or_else(trunc)? as usize;
        let rows = r.u64().ok_or_else(trunc)?;
        if index != l {
            return Err(corrupt(format!("bank layer {l} is labelled {index}")));
        }
        if meta.groups.len() != layers as usize || meta.distances.len() != layers as usize {
            return Err(corrupt(format!("{layers} bank layers but {} feature groups", meta.groups.len())));
        }
        if dim == 0 || dim > 4096 || rows == 0 {
            return Err(corrupt(format!("bank layer {l} has {rows} rows of {dim} values")));
        }
        let n = rows;
        let len = n.checked_mul(dim as u64 + 2).and_then(|n| n.checked_mul(4)).ok_or_else(trunc)?;
        let data = r.take(len).ok_or_else(trunc)?;
        let values: Vec<f32> = data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        if values.iter().any(|v| !v.is_finite()) {
            return Err(corrupt(format!("bank layer {l} holds non-finite values")));
        }
        let (rows, pos) = values.split_at(n as usize * dim);
        let pos = pos.chunks_exact(2).map(|p| [p[0], p[1]]).collect();
        banks.push(Bank { stride, dim, rows: rows.to_vec(), pos });
    }
    if r.pos != body.len() {
        return Err(corrupt(format!("{} unexpected bytes after the banks", body.len() - r.pos)));
    }
    if !(meta.thresholds.image.is_finite() && meta.thresholds.pixel.is_finite()) {
        return Err(corrupt("thresholds are not finite".into()));
    }
    Ok(Enrolment::new(meta, banks))
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64) -> Option<&'a [u8]> {
        let n = usize::try_from(n).ok()?;
        let end = self.pos.checked_add(n)?;
        let s = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
}

/// A small, valid enrolment (made-up model and banks) for tests of code that carries an enrolment
/// without inspecting with it.
#[doc(hidden)]
pub fn sample_for_tests() -> Enrolment {
    use crate::detect::enrolment::{Bank, Geometry};
    use crate::detect::enrolment::{Calibration, Thresholds};
    use crate::engine::encoder::InputSpec;
    use crate::util::imageio::Dihedral;
    Enrolment::new(
        EnrolmentMeta {
            model_name: "m".into(),
            model_sha256: "ab".repeat(32),
            input: InputSpec { name: "image".into(), scale: 1.0 / 255.0, mean: [0.5; 3], std: [0.5; 3] },
            geometry: Geometry::Aligned { width: 64, height: 128 },
            augment: vec![Dihedral::IDENTITY],
            group_augment: vec![vec![Dihedral::IDENTITY]; 2],
            groups: vec![vec![1], vec![2]],
            window: 0.125,
            score_group: None,
            score_scales: Vec::new(),
            distances: vec![crate::detect::features::Distance::Cosine, crate::detect::features::Distance::L2],
            pool: 3,
            top_fraction: 0.01,
            search: Default::default(),
            sigma: 4.0,
            min_region: 0.001,
            background: None,
            zones: Vec::new(),
            classes: Vec::new(),
            thresholds: Thresholds { image: 0.3, pixel: 0.25, source: "auto".into() },
            calibration: Calibration { normal: vec![0.1], anomaly: vec![0.5], ..Default::default() },
            references: vec!["a.png".into()],
            created_unix: 1,
        },
        vec![
            Bank { stride: 8, dim: 3, rows: vec![0.0, 0.6, 0.8, 1.0, 0.0, 0.0], pos: vec![[0.25, 0.5], [0.75, 0.5]] },
            Bank { stride: 16, dim: 2, rows: vec![0.6, 0.8], pos: vec![[0.5, 0.5]] },
        ],
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> Enrolment {
        super::sample_for_tests()
    }

    #[test]
    fn round_trip_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/product.enrol");
        let e = sample();
        save(&e, &path).unwrap();
        assert_eq!(load(&path).unwrap(), e);
    }

    #[test]
    fn a_header_written_before_score_scales_existed_still_loads() {
        // Enrolments made before the score bank held scaled shots lack the key; they read as no extra scales.
        let mut header = serde_json::to_value(&sample().meta).unwrap();
        header.as_object_mut().unwrap().remove("score_scales").expect("the header has the key");
        let meta: EnrolmentMeta = serde_json::from_value(header).unwrap();
        assert!(meta.score_scales.is_empty());
        assert_eq!(EnrolmentMeta { score_scales: Vec::new(), ..sample().meta }, meta);
    }

    #[test]
    fn every_single_byte_flip_and_truncation_is_rejected() {
        let bytes = to_bytes(&sample());
        let p = Path::new("x.enrol");
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x41;
            assert!(from_bytes(&b, p).is_err(), "flip at {i} accepted");
        }
        for n in 0..bytes.len() {
            assert!(from_bytes(&bytes[..n], p).is_err(), "truncation to {n} accepted");
        }
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let p = Path::new("x.enrol");
        let e = from_bytes(b"PNG garbage", p).unwrap_err().to_string();
        assert!(e.contains("not an anomalyd enrolment"), "{e}");
        let mut b = to_bytes(&sample());
        b[16] = 9;
        let e = from_bytes(&b, p).unwrap_err().to_string();
        assert!(e.contains("version 9") && e.contains("enrol again"), "{e}");
        let mut b = to_bytes(&sample());
        let n = b.len();
        b[n - 40] ^= 1;
        let e = from_bytes(&b, p).unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");
    }

    #[test]
    fn valid_checksum_over_bad_lengths_is_still_rejected() {
        // A file re-checksummed after its row count was inflated must not allocate or panic.
        let mut b = to_bytes(&sample());
        b.truncate(b.len() - 32);
        let meta_len = u64::from_le_bytes(b[24..32].try_into().unwrap()) as usize;
        let rows_at = 32 + meta_len + 12;
        b[rows_at..rows_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        let d = Sha256::digest(&b);
        b.extend_from_slice(&d);
        let e = from_bytes(&b, Path::new("x")).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
    }
}
