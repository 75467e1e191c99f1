//! Reduced-precision nearest-neighbour search, measured against the f32 search the decoder uses
//! (issue 21): the generated texture-sized bank (`common/bank.rs`), 1,008 queries, the whole bank
//! scanned (the inverted file's lists are scans of the same kind), one thread.
//!
//! - `f32 sgemm`: `features::nearest`, the decoder's exact search (matrixmultiply's sgemm, then the
//!   best of each row).
//! - `int8, i16 madd (AVX2)`: rows and queries quantised to int8 with one scale a row, widened to i16,
//!   dot products by `vpmaddwd`, i32 sums.
//! - `int8, VNNI (AVX-512)`: the same int8 values, `vpdpbusd` on 64 byte pairs an instruction (the
//!   queries offset to u8 and the offset's share subtracted through each bank row's sum).
//! - `f16 rows (F16C + FMA)`: the bank stored as IEEE half floats, widened on load.
//! - `f32 rows, the f16 kernel's loop`: the same hand kernel on f32 rows, which separates what the
//!   precision buys from what a hand kernel against sgemm buys.
//!
//! Each prints, before its time, recall@1 against the f32 search and the largest and mean error of
//! the nearest distance it reports. Kernels the CPU lacks are skipped with a message.
//!
//!     MATMUL_NUM_THREADS=1 cargo bench --bench precision

use anomalyd::detect::features::nearest;
use criterion::{Criterion, criterion_group, criterion_main};

#[path = "common/bank.rs"]
mod bank;

/// Rows quantised to int8: `round(x / scale)` with `scale = max|x| / 127` a row, padded with zeros
/// to `pad` values.
struct Int8 {
    pad: usize,
    values: Vec<i8>,
    scales: Vec<f32>,
}

fn quantise(rows: &[f32], dim: usize, pad: usize) -> Int8 {
    let n = rows.len() / dim;
    let mut values = vec![0i8; n * pad];
    let mut scales = Vec::with_capacity(n);
    for (r, out) in rows.chunks_exact(dim).zip(values.chunks_exact_mut(pad)) {
        let scale = r.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-12) / 127.0;
        for (o, v) in out.iter_mut().zip(r) {
            *o = (v / scale).round().clamp(-127.0, 127.0) as i8;
        }
        scales.push(scale);
    }
    Int8 { pad, values, scales }
}

/// The best of `sims` (one query against every row) into `(distance, row)`, cosine as the decoder's.
fn best(sims: impl Iterator<Item = f32>) -> (f32, u32) {
    let (mut bi, mut bv) = (0u32, f32::NEG_INFINITY);
    for (j, v) in sims.enumerate() {
        if v > bv {
            (bi, bv) = (j as u32, v);
        }
    }
    ((1.0 - bv).max(0.0), bi)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Int8;
    use std::arch::x86_64::*;

    /// Sum of the eight i32 lanes.
    #[target_feature(enable = "avx2")]
    fn hsum_epi32(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        _mm_cvtsi128_si32(s)
    }

    /// Int8 values widened to i16 (the AVX2 kernel's layout).
    pub fn widen(q: &Int8) -> Vec<i16> {
        q.values.iter().map(|&v| v as i16).collect()
    }

    /// Every query's similarity to every row, one query at a time against four rows, by `vpmaddwd`.
    /// `pad` is a multiple of 16.
    #[target_feature(enable = "avx2")]
    pub fn scan_madd(q: &[i16], qs: &[f32], b: &[i16], bs: &[f32], pad: usize, out: &mut Vec<(f32, u32)>) {
        let nb = bs.len();
        let mut sims = vec![0.0f32; nb];
        for (qi, qrow) in q.chunks_exact(pad).enumerate() {
            let qp = qrow.as_ptr();
            let mut j = 0;
            while j + 4 <= nb {
                let mut acc = [_mm256_setzero_si256(); 4];
                let mut k = 0;
                while k < pad {
                    // SAFETY: k + 16 <= pad, and rows j..j+4 lie in b (j + 4 <= nb).
                    let x = unsafe { _mm256_loadu_si256(qp.add(k) as *const __m256i) };
                    for (r, a) in acc.iter_mut().enumerate() {
                        let y = unsafe { _mm256_loadu_si256(b.as_ptr().add((j + r) * pad + k) as *const __m256i) };
                        *a = _mm256_add_epi32(*a, _mm256_madd_epi16(x, y));
                    }
                    k += 16;
                }
                for (r, a) in acc.iter().enumerate() {
                    sims[j + r] = hsum_epi32(*a) as f32 * qs[qi] * bs[j + r];
                }
                j += 4;
            }
            for jj in j..nb {
                let d: i32 = qrow.iter().zip(&b[jj * pad..(jj + 1) * pad]).map(|(x, y)| *x as i32 * *y as i32).sum();
                sims[jj] = d as f32 * qs[qi] * bs[jj];
            }
            out.push(super::best(sims.iter().copied()));
        }
    }

    /// Every query's similarity to every row by `vpdpbusd`: the query's int8 values offset by 128 to
    /// u8, so `sum((q + 128) b) - 128 sum(b)` is the int8 dot product. `pad` is a multiple of 64.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub fn scan_vnni(q: &Int8, b: &Int8, out: &mut Vec<(f32, u32)>) {
        let pad = b.pad;
        let nb = b.scales.len();
        let sums: Vec<i32> = b.values.chunks_exact(pad).map(|r| r.iter().map(|&v| v as i32).sum()).collect();
        let mut sims = vec![0.0f32; nb];
        let mut qu = vec![0u8; pad];
        for (qi, qrow) in q.values.chunks_exact(pad).enumerate() {
            for (u, &v) in qu.iter_mut().zip(qrow) {
                *u = (v as i16 + 128) as u8;
            }
            let mut j = 0;
            while j + 4 <= nb {
                let mut acc = [_mm512_setzero_si512(); 4];
                let mut k = 0;
                while k < pad {
                    // SAFETY: k + 64 <= pad, and rows j..j+4 lie in b.values (j + 4 <= nb).
                    let x = unsafe { _mm512_loadu_si512(qu.as_ptr().add(k) as *const _) };
                    for (r, a) in acc.iter_mut().enumerate() {
                        let y = unsafe { _mm512_loadu_si512(b.values.as_ptr().add((j + r) * pad + k) as *const _) };
                        *a = _mm512_dpbusd_epi32(*a, x, y);
                    }
                    k += 64;
                }
                for (r, a) in acc.iter().enumerate() {
                    let d = _mm512_reduce_add_epi32(*a) - 128 * sums[j + r];
                    sims[j + r] = d as f32 * q.scales[qi] * b.scales[j + r];
                }
                j += 4;
            }
            for (jj, sim) in sims.iter_mut().enumerate().skip(j) {
                let row = &b.values[jj * pad..(jj + 1) * pad];
                let d: i32 = qrow.iter().zip(row).map(|(x, y)| *x as i32 * *y as i32).sum();
                *sim = d as f32 * q.scales[qi] * b.scales[jj];
            }
            out.push(super::best(sims.iter().copied()));
        }
    }

    /// The bank as IEEE half floats, padded with zeros to `pad` values (a multiple of 8).
    #[target_feature(enable = "avx2,f16c")]
    pub fn to_f16(rows: &[f32], dim: usize, pad: usize) -> Vec<u16> {
        let mut wide = vec![0.0f32; rows.len() / dim * pad];
        for (r, o) in rows.chunks_exact(dim).zip(wide.chunks_exact_mut(pad)) {
            o[..dim].copy_from_slice(r);
        }
        let mut out = vec![0u16; wide.len()];
        for (i, c) in wide.chunks_exact(8).enumerate() {
            // SAFETY: c holds 8 values, and out has room for 8 at i * 8.
            unsafe {
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(c.as_ptr()));
                _mm_storeu_si128(out.as_mut_ptr().add(i * 8) as *mut __m128i, h);
            }
        }
        out
    }

    /// The f16 kernel's loop on f32 rows: what the hand kernel costs without the reduced precision.
    #[target_feature(enable = "avx2,fma")]
    pub fn scan_f32(q: &[f32], b: &[f32], pad: usize, out: &mut Vec<(f32, u32)>) {
        let nb = b.len() / pad;
        let mut sims = vec![0.0f32; nb];
        for qrow in q.chunks_exact(pad) {
            let mut j = 0;
            while j + 4 <= nb {
                let mut acc = [_mm256_setzero_ps(); 4];
                let mut k = 0;
                while k < pad {
                    // SAFETY: k + 8 <= pad, and rows j..j+4 lie in b.
                    let x = unsafe { _mm256_loadu_ps(qrow.as_ptr().add(k)) };
                    for (r, a) in acc.iter_mut().enumerate() {
                        let y = unsafe { _mm256_loadu_ps(b.as_ptr().add((j + r) * pad + k)) };
                        *a = _mm256_fmadd_ps(x, y, *a);
                    }
                    k += 8;
                }
                for (r, a) in acc.iter().enumerate() {
                    sims[j + r] = hsum_ps(*a);
                }
                j += 4;
            }
            for (jj, sim) in sims.iter_mut().enumerate().skip(j) {
                *sim = qrow.iter().zip(&b[jj * pad..(jj + 1) * pad]).map(|(x, y)| x * y).sum();
            }
            out.push(super::best(sims.iter().copied()));
        }
    }

    #[target_feature(enable = "avx2")]
    fn hsum_ps(a: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }

    /// Every query's (f32, padded to `pad`) similarity to every f16 row, one query against four rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn scan_f16(q: &[f32], b: &[u16], pad: usize, out: &mut Vec<(f32, u32)>) {
        let nb = b.len() / pad;
        let mut sims = vec![0.0f32; nb];
        for qrow in q.chunks_exact(pad) {
            let mut j = 0;
            while j + 4 <= nb {
                let mut acc = [_mm256_setzero_ps(); 4];
                let mut k = 0;
                while k < pad {
                    // SAFETY: k + 8 <= pad, and rows j..j+4 lie in b.
                    let x = unsafe { _mm256_loadu_ps(qrow.as_ptr().add(k)) };
                    for (r, a) in acc.iter_mut().enumerate() {
                        let h = unsafe { _mm_loadu_si128(b.as_ptr().add((j + r) * pad + k) as *const __m128i) };
                        *a = _mm256_fmadd_ps(x, _mm256_cvtph_ps(h), *a);
                    }
                    k += 8;
                }
                for (r, a) in acc.iter().enumerate() {
                    sims[j + r] = hsum_ps(*a);
                }
                j += 4;
            }
            for (jj, sim) in sims.iter_mut().enumerate().skip(j) {
                let row = &b[jj * pad..(jj + 1) * pad];
                *sim =
                    qrow.iter().zip(row).map(|(x, h)| x * _mm_cvtss_f32(_mm_cvtph_ps(_mm_set1_epi16(*h as i16)))).sum();
            }
            out.push(super::best(sims.iter().copied()));
        }
    }
}

/// Recall@1 and the error of the reported nearest distance against the f32 search.
fn report(name: &str, exact: &(Vec<f32>, Vec<u32>), found: &[(f32, u32)]) {
    let hits = exact.1.iter().zip(found).filter(|(a, f)| **a == f.1).count();
    let errs: Vec<f32> = exact.0.iter().zip(found).map(|(e, f)| (f.0 - e).abs()).collect();
    let mean_d = exact.0.iter().sum::<f32>() / exact.0.len() as f32;
    eprintln!(
        "{name}: recall@1 {:.3}, nearest distance error mean {:.5} max {:.5} (mean distance {mean_d:.4})",
        hits as f32 / found.len() as f32,
        errs.iter().sum::<f32>() / errs.len() as f32,
        errs.iter().fold(0.0f32, |m, e| m.max(*e)),
    );
}

fn pad_rows(rows: &[f32], dim: usize, pad: usize) -> Vec<f32> {
    rows.chunks_exact(dim).flat_map(|r| r.iter().copied().chain(std::iter::repeat_n(0.0, pad - dim))).collect()
}

fn precision(c: &mut Criterion) {
    let (bank, queries) = bank::generated();
    let dim = bank::DIM;
    let exact = nearest(&queries, &bank, dim);
    let mut g = c.benchmark_group("precision: 1008 queries x 16128 bank x 152, whole bank");
    g.sample_size(10);
    g.bench_function("f32 sgemm", |b| b.iter(|| nearest(std::hint::black_box(&queries), &bank, dim)));
    #[cfg(target_arch = "x86_64")]
    {
        let has = |f: &str| match f {
            "avx2" => is_x86_feature_detected!("avx2"),
            "f16c" => is_x86_feature_detected!("f16c") && is_x86_feature_detected!("fma"),
            _ => is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vnni"),
        };
        if has("avx2") {
            let pad = dim.div_ceil(16) * 16;
            let (qi, bi) = (quantise(&queries, dim, pad), quantise(&bank, dim, pad));
            // SAFETY (each call below): the CPU has the features the kernel is compiled for.
            let (qw, bw) = (x86::widen(&qi), x86::widen(&bi));
            let run = || {
                let mut out = Vec::new();
                unsafe { x86::scan_madd(&qw, &qi.scales, &bw, &bi.scales, pad, &mut out) };
                out
            };
            report("int8, i16 madd (AVX2)", &exact, &run());
            g.bench_function("int8, i16 madd (AVX2)", |b| b.iter(run));
        } else {
            eprintln!("skipped int8 madd: no AVX2");
        }
        if has("vnni") {
            let pad = dim.div_ceil(64) * 64;
            let (qi, bi) = (quantise(&queries, dim, pad), quantise(&bank, dim, pad));
            let run = || {
                let mut out = Vec::new();
                unsafe { x86::scan_vnni(&qi, &bi, &mut out) };
                out
            };
            report("int8, VNNI (AVX-512)", &exact, &run());
            g.bench_function("int8, VNNI (AVX-512)", |b| b.iter(run));
        } else {
            eprintln!("skipped int8 VNNI: no AVX-512 VNNI");
        }
        if has("f16c") {
            let pad = dim.div_ceil(8) * 8;
            let b16 = unsafe { x86::to_f16(&bank, dim, pad) };
            let qp = pad_rows(&queries, dim, pad);
            let run = || {
                let mut out = Vec::new();
                unsafe { x86::scan_f16(&qp, &b16, pad, &mut out) };
                out
            };
            report("f16 rows (F16C + FMA)", &exact, &run());
            g.bench_function("f16 rows (F16C + FMA)", |b| b.iter(run));
            let bp = pad_rows(&bank, dim, pad);
            let run = || {
                let mut out = Vec::new();
                unsafe { x86::scan_f32(&qp, &bp, pad, &mut out) };
                out
            };
            report("f32 rows, the f16 kernel's loop", &exact, &run());
            g.bench_function("f32 rows, the f16 kernel's loop", |b| b.iter(run));
        } else {
            eprintln!("skipped f16: no F16C/FMA");
        }
    }
    g.finish();
}

criterion_group!(benches, precision);
criterion_main!(benches);
