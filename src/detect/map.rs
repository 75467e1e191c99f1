//! Anomaly maps: a grid of scores, bilinear upsampling, Gaussian smoothing and the top-k image score.

/// A row-major grid of anomaly scores.
#[derive(Debug, Clone, PartialEq)]
pub struct Grid {
    pub w: usize,
    pub h: usize,
    pub data: Vec<f32>,
}

impl Grid {
    pub fn new(w: usize, h: usize, data: Vec<f32>) -> Self {
        assert_eq!(data.len(), w * h, "grid data does not fit {w}x{h}");
        Self { w, h, data }
    }

    pub fn at(&self, x: usize, y: usize) -> f32 {
        self.data[y * self.w + x]
    }

    pub fn max(&self) -> f32 {
        self.data.iter().copied().fold(f32::NEG_INFINITY, f32::max)
    }

    /// Bilinear resize with pixel-centre alignment (`align_corners = false`).
    pub fn resize(&self, w: usize, h: usize) -> Grid {
        if w == self.w && h == self.h {
            return self.clone();
        }
        let xs = bilinear_taps(w, self.w);
        let ys = bilinear_taps(h, self.h);
        // Horizontal pass into rows of the source height, then vertical.
        let mut tmp = vec![0.0f32; self.h * w];
        for y in 0..self.h {
            let row = &self.data[y * self.w..(y + 1) * self.w];
            for (x, &(a, b, t)) in xs.iter().enumerate() {
                tmp[y * w + x] = row[a] * (1.0 - t) + row[b] * t;
            }
        }
        let mut out = vec![0.0f32; w * h];
        for (y, &(a, b, t)) in ys.iter().enumerate() {
            for x in 0..w {
                out[y * w + x] = tmp[a * w + x] * (1.0 - t) + tmp[b * w + x] * t;
            }
        }
        Grid::new(w, h, out)
    }

    /// Separable Gaussian blur with reflected edges; `sigma <= 0` leaves the grid unchanged.
    pub fn gaussian(&self, sigma: f32) -> Grid {
        if sigma <= 0.0 {
            return self.clone();
        }
        let k = gaussian_weights(sigma);
        let r = (k.len() / 2) as isize;
        let (w, h) = (self.w, self.h);
        let mut tmp = vec![0.0f32; w * h];
        for y in 0..h {
            for x in 0..w {
                let mut s = 0.0;
                for (j, kv) in k.iter().enumerate() {
                    s += kv * self.data[y * w + reflect(x as isize + j as isize - r, w)];
                }
                tmp[y * w + x] = s;
            }
        }
        let mut out = vec![0.0f32; w * h];
        for y in 0..h {
            for x in 0..w {
                let mut s = 0.0;
                for (j, kv) in k.iter().enumerate() {
                    s += kv * tmp[reflect(y as isize + j as isize - r, h) * w + x];
                }
                out[y * w + x] = s;
            }
        }
        Grid::new(w, h, out)
    }
}

/// Index `i` reflected into `0..n` about the edges, the edge sample repeated (... 1 0 | 0 1 ...), as
/// kernels/map.cu does. Repeated reflection keeps any `i` in range (huge kernels on tiny grids).
pub fn reflect(i: isize, n: usize) -> usize {
    let n = n as isize;
    let mut i = i;
    loop {
        if i < 0 {
            i = -i - 1;
        } else if i >= n {
            i = 2 * n - i - 1;
        } else {
            return i as usize;
        }
    }
}

/// The normalised weights of a Gaussian of `sigma > 0` over `[-r, r]`, `r = ceil(3 sigma)`.
pub fn gaussian_weights(sigma: f32) -> Vec<f32> {
    let r = (3.0 * sigma).ceil() as isize;
    let mut k: Vec<f32> = (-r..=r).map(|i| (-(i * i) as f32 / (2.0 * sigma * sigma)).exp()).collect();
    let sum: f32 = k.iter().sum();
    k.iter_mut().for_each(|v| *v /= sum);
    k
}

/// For each of `out` output positions, the two source indices of a bilinear resize from `inp` positions
/// and the weight of the second, with pixel-centre alignment (`align_corners = false`).
pub fn bilinear_taps(out: usize, inp: usize) -> Vec<(usize, usize, f32)> {
    let scale = inp as f32 / out as f32;
    (0..out)
        .map(|o| {
            let src = ((o as f32 + 0.5) * scale - 0.5).clamp(0.0, (inp - 1) as f32);
            let i0 = src.floor() as usize;
            (i0, (i0 + 1).min(inp - 1), src - i0 as f32)
        })
        .collect()
}

/// Mean of the largest `fraction` of the values (at least one value).
pub fn top_mean(values: &[f32], fraction: f32) -> f32 {
    if values.is_empty() {
        return 0.0;
    }
    let k = ((values.len() as f32 * fraction).ceil() as usize).clamp(1, values.len());
    let mut v = values.to_vec();
    let idx = v.len() - k;
    v.select_nth_unstable_by(idx, f32::total_cmp);
    v[idx..].iter().sum::<f32>() / k as f32
}

/// Linear-interpolated quantile of `v` (`q` in 0..=1); NaN for an empty slice.
pub fn quantile(v: &[f32], q: f32) -> f32 {
    if v.is_empty() {
        return f32::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f32::total_cmp);
    let pos = q.clamp(0.0, 1.0) * (s.len() - 1) as f32;
    let (i, t) = (pos.floor() as usize, pos.fract());
    if i + 1 < s.len() { s[i] * (1.0 - t) + s[i + 1] * t } else { s[i] }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_keeps_constant_and_interpolates_linearly() {
        let g = Grid::new(2, 1, vec![0.0, 1.0]);
        let r = g.resize(4, 1);
        // Centres of the 4 outputs fall at source -0.25, 0.25, 0.75, 1.25 -> clamped and interpolated.
        assert_eq!(r.data, vec![0.0, 0.25, 0.75, 1.0]);
        let c = Grid::new(3, 3, vec![2.0; 9]).resize(7, 5);
        assert!(c.data.iter().all(|v| (v - 2.0).abs() < 1e-6));
    }

    #[test]
    fn gaussian_preserves_mass_and_spreads_a_peak() {
        let mut d = vec![0.0; 21 * 21];
        d[10 * 21 + 10] = 1.0;
        let g = Grid::new(21, 21, d).gaussian(2.0);
        let sum: f32 = g.data.iter().sum();
        assert!((sum - 1.0).abs() < 1e-4);
        assert!(g.at(10, 10) > g.at(11, 10) && g.at(11, 10) > g.at(13, 10));
        assert!((g.at(9, 10) - g.at(11, 10)).abs() < 1e-7);
    }

    #[test]
    fn top_mean_takes_the_top_fraction() {
        let v: Vec<f32> = (1..=100).map(|i| i as f32).collect();
        assert_eq!(top_mean(&v, 0.01), 100.0);
        assert_eq!(top_mean(&v, 0.05), (96..=100).sum::<i32>() as f32 / 5.0);
        assert_eq!(top_mean(&[], 0.5), 0.0);
    }
}
