//! Reading images of any common format into 8-bit RGB, resizing, the eight dihedral transforms, and
//! the normalised NCHW tensor the encoder takes.

use std::path::{Path, PathBuf};

use image::{RgbImage, imageops};

/// Smallest side an input may have: the encoder needs at least a 4 x 4 grid at stride 16.
pub const MIN_SIDE: u32 = 64;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read image {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("image {path} is {w}x{h}; anomalyd needs at least {MIN_SIDE}x{MIN_SIDE} pixels")]
    TooSmall { path: PathBuf, w: u32, h: u32 },
    #[error("image {path} is {w}x{h}: over the limit of {MAX_PIXELS} pixels")]
    TooLarge { path: PathBuf, w: u32, h: u32 },
    #[error("frame {width}x{height} with stride {stride} and {len} bytes is not a valid RGB frame")]
    BadFrame { width: usize, height: usize, stride: usize, len: usize },
    #[error("frame {width}x{height} stride {stride} needs {needed} bytes, buffer has {len}")]
    ShortFrame { width: usize, height: usize, stride: usize, needed: usize, len: usize },
}

/// A folder that could not be listed.
#[derive(Debug, thiserror::Error)]
#[error("cannot list {path}: {cause}")]
pub struct ListError {
    pub path: PathBuf,
    pub cause: std::io::Error,
}

/// The entries of a folder, sorted by name.
pub fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, ListError> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|cause| ListError { path: dir.to_path_buf(), cause })?
        .flatten()
        .map(|e| e.path())
        .collect();
    v.sort();
    Ok(v)
}

/// Image files in a folder, sorted by name.
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>, ListError> {
    Ok(list_dir(dir)?.into_iter().filter(|p| p.is_file() && is_image(p)).collect())
}

/// Whether a file's extension names an image format anomalyd reads.
pub fn is_image(path: &Path) -> bool {
    const EXT: [&str; 8] = ["png", "jpg", "jpeg", "bmp", "tif", "tiff", "pgm", "ppm"];
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| EXT.contains(&e.to_ascii_lowercase().as_str()))
}

/// Largest side accepted from a file or a frame (hostile headers cannot ask for more).
pub const MAX_SIDE: u32 = 16384;
/// Most pixels accepted (8192 x 8192: 192 MiB as RGB): a header that asks for more is refused before
/// anything is decoded, however well it compresses.
pub const MAX_PIXELS: u64 = 1 << 26;

/// Reads an image and converts grayscale, 16-bit and alpha formats to 8-bit RGB.
pub fn load_rgb(path: &Path) -> Result<RgbImage, ImageError> {
    let bytes =
        std::fs::read(path).map_err(|e| ImageError::Read { path: path.to_path_buf(), reason: e.to_string() })?;
    decode_rgb(&bytes, path)
}

/// Decodes an encoded image (PNG, JPEG, BMP, TIFF, PNM) from memory into 8-bit RGB, within bounded
/// dimensions and memory; `path` only names it in errors.
pub fn decode_rgb(bytes: &[u8], path: &Path) -> Result<RgbImage, ImageError> {
    let read_err = |reason: String| ImageError::Read { path: path.to_path_buf(), reason };
    let reader = || -> Result<_, ImageError> {
        let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| read_err(e.to_string()))?;
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(MAX_SIDE);
        limits.max_image_height = Some(MAX_SIDE);
        limits.max_alloc = Some(1 << 30);
        reader.limits(limits);
        Ok(reader)
    };
    let (w, h) = reader()?.into_dimensions().map_err(|e| read_err(e.to_string()))?;
    if u64::from(w) * u64::from(h) > MAX_PIXELS {
        return Err(ImageError::TooLarge { path: path.to_path_buf(), w, h });
    }
    let img = reader()?.decode().map_err(|e| read_err(e.to_string()))?;
    let rgb = img.to_rgb8();
    if rgb.width() < MIN_SIDE || rgb.height() < MIN_SIDE {
        return Err(ImageError::TooSmall { path: path.to_path_buf(), w: rgb.width(), h: rgb.height() });
    }
    Ok(rgb)
}

/// Copies a mapped RGB frame (rows `stride` bytes apart, possibly padded) into a packed image. A
/// frame whose size, stride and buffer do not agree is an error, never a panic or an over-read.
pub fn rgb_from_strided(data: &[u8], width: usize, height: usize, stride: usize) -> Result<RgbImage, ImageError> {
    let bad = || ImageError::BadFrame { width, height, stride, len: data.len() };
    if width == 0
        || height == 0
        || width > MAX_SIDE as usize
        || height > MAX_SIDE as usize
        || (width * height) as u64 > MAX_PIXELS
    {
        return Err(bad());
    }
    let row = width * 3;
    if stride < row {
        return Err(bad());
    }
    let needed = stride.checked_mul(height - 1).and_then(|n| n.checked_add(row)).ok_or_else(bad)?;
    if data.len() < needed {
        return Err(ImageError::ShortFrame { width, height, stride, needed, len: data.len() });
    }
    let mut out = Vec::with_capacity(row * height);
    for y in 0..height {
        out.extend_from_slice(&data[y * stride..y * stride + row]);
    }
    RgbImage::from_raw(width as u32, height as u32, out).ok_or_else(bad)
}

/// Reads a mask as 8-bit luma (any format); `None` if it cannot be read.
pub fn load_mask(path: &Path) -> Result<image::GrayImage, ImageError> {
    let img = image::open(path).map_err(|e| ImageError::Read { path: path.to_path_buf(), reason: e.to_string() })?;
    Ok(img.to_luma8())
}

/// Resizes with a triangle filter whose support grows with the downscale factor (area-correct).
pub fn resize(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    if img.width() == w && img.height() == h {
        return img.clone();
    }
    imageops::resize(img, w, h, imageops::FilterType::Triangle)
}

/// The taps of [`resize`]'s triangle filter from `src` to `dst` lines, computed as the `image` crate
/// does (so that the GPU resize matches it): per output line the first source line, the tap count,
/// the offset of its weights in `weights`.
#[derive(Debug, Clone, PartialEq)]
pub struct Taps {
    pub left: Vec<u32>,
    pub count: Vec<u32>,
    pub offsets: Vec<u32>,
    pub weights: Vec<f32>,
}

pub fn triangle_taps(src: u32, dst: u32) -> Taps {
    let mut t = Taps { left: vec![], count: vec![], offsets: vec![], weights: vec![] };
    let ratio = src as f32 / dst as f32;
    let sratio = if ratio < 1.0 { 1.0 } else { ratio };
    let support = sratio;
    for out in 0..dst {
        let centre = (out as f32 + 0.5) * ratio;
        let left = ((centre - support).floor() as i64).clamp(0, src as i64 - 1);
        let right = ((centre + support).ceil() as i64).clamp(left + 1, src as i64);
        let centre = centre - 0.5;
        let start = t.weights.len();
        let mut sum = 0.0f32;
        for i in left..right {
            let x = ((i as f32 - centre) / sratio).abs();
            let w = if x < 1.0 { 1.0 - x } else { 0.0 };
            t.weights.push(w);
            sum += w;
        }
        t.weights[start..].iter_mut().for_each(|w| *w /= sum);
        t.left.push(left as u32);
        t.count.push((right - left) as u32);
        t.offsets.push(start as u32);
    }
    t
}

/// The eight symmetries of the square: rotation by `rot * 90` degrees, then an optional horizontal flip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Dihedral {
    pub rot: u8,
    pub flip: bool,
}

impl Dihedral {
    pub const IDENTITY: Self = Self { rot: 0, flip: false };

    pub fn all() -> Vec<Self> {
        (0..4u8).flat_map(|rot| [false, true].map(|flip| Self { rot, flip })).collect()
    }

    pub fn apply(self, img: &RgbImage) -> RgbImage {
        let r = match self.rot % 4 {
            1 => imageops::rotate90(img),
            2 => imageops::rotate180(img),
            3 => imageops::rotate270(img),
            _ => img.clone(),
        };
        if self.flip { imageops::flip_horizontal(&r) } else { r }
    }
}

/// HWC u8 -> NCHW f32 with `(v * scale - mean) / std` per channel.
pub fn to_tensor(img: &RgbImage, scale: f32, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let plane = w * h;
    let mut out = vec![0.0f32; 3 * plane];
    let mul: [f32; 3] = std::array::from_fn(|c| scale / std[c]);
    let add: [f32; 3] = std::array::from_fn(|c| -mean[c] / std[c]);
    for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * plane + i] = px[c] as f32 * mul[c] + add[c];
        }
    }
    out
}

/// Size (multiple of `align`) with about `pixels` pixels and the aspect ratio of `w x h`.
pub fn fit_pixels(w: u32, h: u32, pixels: u32, align: u32) -> (u32, u32) {
    let s = (pixels as f64 / (w as f64 * h as f64)).sqrt();
    scaled(w, h, s, align)
}

/// `w x h` scaled by `s`, rounded to a multiple of `align`, never below `MIN_SIDE`.
pub fn scaled(w: u32, h: u32, s: f64, align: u32) -> (u32, u32) {
    let round = |v: f64| -> u32 {
        let a = align as f64;
        (((v / a).round() * a) as u32).max(MIN_SIDE.div_ceil(align) * align)
    };
    (round(w as f64 * s), round(h as f64 * s))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The GPU's resize (kernels/preprocess.cu) on the CPU: vertical taps into f32 rows, then
    /// horizontal taps rounded to u8. It must equal `resize` bit for bit.
    fn resize_by_taps(img: &RgbImage, w: u32, h: u32) -> RgbImage {
        let (sw, sh) = img.dimensions();
        let (v, hz) = (triangle_taps(sh, h), triangle_taps(sw, w));
        let src = img.as_raw();
        let w3 = sw as usize * 3;
        let mut tmp = vec![0.0f32; h as usize * w3];
        for y in 0..h as usize {
            for i in 0..w3 {
                let mut t = 0.0f32;
                for k in 0..v.count[y] as usize {
                    t += src[(v.left[y] as usize + k) * w3 + i] as f32 * v.weights[v.offsets[y] as usize + k];
                }
                tmp[y * w3 + i] = t;
            }
        }
        let mut out = vec![0u8; (w * h * 3) as usize];
        for y in 0..h as usize {
            for x in 0..w as usize {
                for c in 0..3 {
                    let mut t = 0.0f32;
                    for k in 0..hz.count[x] as usize {
                        t += tmp[y * w3 + (hz.left[x] as usize + k) * 3 + c] * hz.weights[hz.offsets[x] as usize + k];
                    }
                    out[(y * w as usize + x) * 3 + c] = t.clamp(0.0, 255.0).round() as u8;
                }
            }
        }
        RgbImage::from_raw(w, h, out).unwrap()
    }

    #[test]
    fn triangle_taps_reproduce_the_resize_exactly() {
        let img =
            RgbImage::from_fn(101, 67, |x, y| image::Rgb([(x * 7 + y) as u8, (x * y) as u8, (255 - x - y) as u8]));
        for (w, h) in [(64, 48), (160, 96), (101, 40), (37, 67), (288, 224)] {
            assert_eq!(resize_by_taps(&img, w, h), resize(&img, w, h), "{w}x{h}");
        }
    }

    #[test]
    fn rows_are_copied_by_stride_and_bad_geometry_is_refused() {
        // 2x2 RGB with 8-byte rows (2 bytes of padding each).
        let data = [1, 2, 3, 4, 5, 6, 99, 99, 7, 8, 9, 10, 11, 12, 99, 99];
        let img = rgb_from_strided(&data, 2, 2, 8).unwrap();
        assert_eq!(img.into_raw(), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        assert!(rgb_from_strided(&data, 2, 2, 4).is_err(), "stride shorter than a row");
        assert!(rgb_from_strided(&data[..12], 2, 2, 8).is_err(), "buffer too short");
        assert!(rgb_from_strided(&data, 0, 2, 8).is_err());
        assert!(rgb_from_strided(&data, 2, usize::MAX / 2, usize::MAX / 4).is_err(), "overflowing geometry");
    }

    #[test]
    fn dihedral_group_has_eight_distinct_members() {
        let img = RgbImage::from_fn(3, 2, |x, y| image::Rgb([(x + 3 * y) as u8, 0, 0]));
        let outs: Vec<_> = Dihedral::all().iter().map(|d| d.apply(&img).into_raw()).collect();
        for i in 0..8 {
            for j in i + 1..8 {
                assert_ne!(outs[i], outs[j], "{i} and {j}");
            }
        }
        assert_eq!(Dihedral::IDENTITY.apply(&img), img);
    }

    #[test]
    fn tensor_is_planar_and_normalised() {
        let img = RgbImage::from_pixel(2, 1, image::Rgb([255, 0, 51]));
        let t = to_tensor(&img, 1.0 / 255.0, [0.5; 3], [0.5; 3]);
        assert_eq!(t.len(), 6);
        assert!((t[0] - 1.0).abs() < 1e-6 && (t[2] + 1.0).abs() < 1e-6 && (t[4] + 0.6).abs() < 1e-6);
    }

    #[test]
    fn fit_keeps_aspect_and_alignment() {
        assert_eq!(fit_pixels(800, 1600, 256 * 256, 16), (176, 368));
        assert_eq!(fit_pixels(10, 10, 256 * 256, 16), (256, 256));
        let (w, h) = fit_pixels(100, 10_000, 256 * 256, 16);
        assert!(w >= MIN_SIDE && h % 16 == 0);
    }

    #[test]
    fn unreadable_and_tiny_images_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.png");
        std::fs::write(&junk, b"not a png").unwrap();
        assert!(matches!(load_rgb(&junk), Err(ImageError::Read { .. })));
        let tiny = dir.path().join("tiny.png");
        image::GrayImage::new(10, 10).save(&tiny).unwrap();
        let err = load_rgb(&tiny).unwrap_err().to_string();
        assert!(err.contains("10x10") && err.contains("at least"), "{err}");
    }

    #[test]
    fn a_header_asking_for_too_many_pixels_is_refused_before_decoding() {
        // A 16384 x 16384 8-bit image: within the side limit, 805 MB as RGB.
        let err = decode_rgb(b"P5\n16384 16384\n255\n", Path::new("huge.pgm")).unwrap_err();
        assert!(matches!(err, ImageError::TooLarge { w: 16384, h: 16384, .. }), "{err}");
        assert!(rgb_from_strided(&[], 16384, 16384, 16384 * 3).is_err());
    }

    #[test]
    fn gray_sixteen_bit_and_rgba_are_converted() {
        let dir = tempfile::tempdir().unwrap();
        let g16 = dir.path().join("g16.png");
        image::ImageBuffer::<image::Luma<u16>, _>::from_pixel(64, 64, image::Luma([65535u16])).save(&g16).unwrap();
        assert_eq!(load_rgb(&g16).unwrap().get_pixel(0, 0).0, [255, 255, 255]);
        let rgba = dir.path().join("rgba.png");
        image::RgbaImage::from_pixel(64, 64, image::Rgba([10, 20, 30, 0])).save(&rgba).unwrap();
        assert_eq!(load_rgb(&rgba).unwrap().get_pixel(5, 5).0, [10, 20, 30]);
    }
}
