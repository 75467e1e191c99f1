//! The whole inspection on the GPU: each frame is copied to the device once (RGB8), resized and
//! normalised there, encoded (by the netplan layers with anomalyd's kernels, or by ONNX Runtime's
//! TensorRT/CUDA provider through IO binding, its outputs left on the device), pooled into patches,
//! matched against the memory
//! bank (GEMM + fused row-min), masked, averaged, upsampled, smoothed and scored. Only the map, the
//! patch grid and the score come back. Every step mirrors the CPU reference in `detect`, `features`
//! and `map`; the parity tests hold the two together.

use std::collections::HashMap;
use std::time::Instant;

use image::RgbImage;

use crate::config::engine::EngineConfig;
use crate::detect::enrolment::{Bank, EnrolmentMeta};
use crate::detect::features::Distance;
use crate::detect::inspection::{DetectError, Scored, Timings};
use crate::detect::map::{self, Grid};
use crate::engine::encoder::{Encoder, FeatureMap, Manifest, Memory, relative_error};
use crate::engine::gpu::{Arg, DevBuf, Gpu, GpuError, copy, download, upload};
use crate::engine::netplan::{Act, Layer, Plan};
use crate::util::imageio;

/// Bank rows per similarity chunk are bounded so that the chunk's matrix stays near 64 Mi floats.
const SIM_FLOATS: usize = 64 << 20;

/// The encoder's weights on the device, and the value-to-buffer assignment that reuses buffers.
struct Net {
    plan: Plan,
    weights: Vec<(DevBuf, DevBuf)>,
    /// Buffer slot of every value (value 0, the input, has slot 0).
    slot: Vec<usize>,
    slots: Vec<DevBuf>,
    /// Plan value of each manifest output.
    outputs: Vec<usize>,
}

/// A pooled encoder output on the device: its pointer and `(channels, height, width)`.
type Part = (u64, (usize, usize, usize));

/// One bank layer on the device.
struct DevBank {
    rows: DevBuf,
    pos: DevBuf,
    sq: Option<DevBuf>,
    len: usize,
    dim: usize,
}

/// What runs the encoder on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceEncoder {
    /// The netplan layers with anomalyd's kernels.
    Kernels,
    /// The detector's ONNX Runtime session (TensorRT or CUDA provider on this GPU) through IO
    /// binding: its input is written by the preprocessing kernels and its outputs feed the pooling.
    Onnxruntime,
}

/// The device side of the detector: one per worker thread, like the CPU encoder session.
pub struct Pipeline {
    gpu: Gpu,
    encoder: DeviceEncoder,
    net: Net,
    mul: [f32; 3],
    add: [f32; 3],
    bank: Option<(u64, Vec<DevBank>)>,
    bufs: HashMap<&'static str, DevBuf>,
    tables: HashMap<String, DevBuf>,
    pool_bufs: Vec<DevBuf>,
    qt_bufs: Vec<DevBuf>,
    dist_bufs: Vec<DevBuf>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline").field("gpu", &self.gpu).field("layers", &self.net.plan.layers.len()).finish()
    }
}

impl Pipeline {
    /// Builds the device side from the encoder's model bytes; with [`DeviceEncoder::Kernels`] the
    /// encoder's weights are uploaded for anomalyd's kernels.
    pub fn new(gpu: Gpu, model: &[u8], manifest: &Manifest, encoder: DeviceEncoder) -> Result<Pipeline, GpuError> {
        let plan = Plan::from_onnx(model)?;
        let outputs =
            manifest
                .outputs
                .iter()
                .map(|o| {
                    plan.outputs.iter().find(|(n, _)| *n == o.name).map(|(_, v)| *v).ok_or_else(|| {
                        GpuError::Unsupported(format!("manifest output `{}` is not a graph output", o.name))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
        let mut weights = Vec::new();
        for l in &plan.layers {
            match l {
                Layer::Conv(c) if encoder == DeviceEncoder::Kernels => {
                    weights.push((DevBuf::from_slice(&gpu, &c.weight)?, DevBuf::from_slice(&gpu, &c.bias)?))
                }
                _ => weights.push((DevBuf::empty(&gpu), DevBuf::empty(&gpu))),
            }
        }
        let slot = assign_slots(&plan);
        let n_slots = slot.iter().max().map_or(1, |m| m + 1);
        let slots = (0..n_slots).map(|_| DevBuf::empty(&gpu)).collect();
        let s = &manifest.input;
        let mul = std::array::from_fn(|c| s.scale / s.std[c]);
        let add = std::array::from_fn(|c| -s.mean[c] / s.std[c]);
        Ok(Pipeline {
            net: Net { plan, weights, slot, slots, outputs },
            gpu,
            encoder,
            mul,
            add,
            bank: None,
            bufs: HashMap::new(),
            tables: HashMap::new(),
            pool_bufs: Vec::new(),
            qt_bufs: Vec::new(),
            dist_bufs: Vec::new(),
        })
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// What runs the encoder.
    pub fn encoder(&self) -> DeviceEncoder {
        self.encoder
    }

    /// The device buffer the preprocessing writes the NCHW batch into: slot 0 of the kernels' plan,
    /// or the input tensor bound to ONNX Runtime.
    fn input_buffer(&mut self, enc: &mut Encoder, n: usize, h: usize, w: usize) -> Result<u64, GpuError> {
        match self.encoder {
            DeviceEncoder::Kernels => {
                self.net.slots[0].ensure(&self.gpu, n * 3 * w * h * 4)?;
                Ok(self.net.slots[0].ptr())
            }
            DeviceEncoder::Onnxruntime => {
                let memory = Memory::Cuda(self.gpu.ctx.ordinal());
                Ok(enc.bound_input(memory, [n, 3, h, w]).map_err(|e| GpuError::Unsupported(e.to_string()))?)
            }
        }
    }

    /// Encodes the batch in [`Self::input_buffer`]: every manifest output, in manifest order, as its
    /// device pointer and `(channels, height, width)`. ONNX Runtime's outputs stay valid until its
    /// next run, which only comes after this batch's work has finished.
    fn run_encoder(&mut self, enc: &mut Encoder, n: usize, h: usize, w: usize) -> Result<Vec<Part>, GpuError> {
        match self.encoder {
            DeviceEncoder::Kernels => {
                let shapes = self.run_net(n, h, w)?;
                Ok(self.net.outputs.iter().map(|&v| (self.net.slots[self.net.slot[v]].ptr(), shapes[v])).collect())
            }
            DeviceEncoder::Onnxruntime => {
                // ONNX Runtime runs on its own stream: the input must be complete before it starts.
                self.gpu.sync()?;
                let outs = enc.run_bound().map_err(|e| GpuError::Unsupported(e.to_string()))?;
                // Its provider binds the thread to the same (primary) context; make sure of it.
                self.gpu.ctx.bind_to_thread()?;
                Ok(outs.iter().map(|o| (o.ptr, (o.shape[1], o.shape[2], o.shape[3]))).collect())
            }
        }
    }

    fn buf(&mut self, name: &'static str, bytes: usize) -> Result<u64, GpuError> {
        let gpu = &self.gpu;
        let b = self.bufs.entry(name).or_insert_with(|| DevBuf::empty(gpu));
        b.ensure(gpu, bytes.max(4))?;
        Ok(b.ptr())
    }

    /// Copies `data` into the named buffer; returns its pointer.
    fn upload<T: Copy>(&mut self, name: &'static str, data: &[T]) -> Result<u64, GpuError> {
        let gpu = &self.gpu;
        let b = self.bufs.entry(name).or_insert_with(|| DevBuf::empty(gpu));
        b.upload(gpu, data)?;
        Ok(b.ptr())
    }

    /// A small host-computed table (taps, weights), uploaded once per key.
    fn table<T: Copy>(&mut self, key: String, make: impl FnOnce() -> Vec<T>) -> Result<u64, GpuError> {
        if let Some(b) = self.tables.get(&key) {
            return Ok(b.ptr());
        }
        // Texture inputs vary in size; keep the table cache bounded.
        if self.tables.len() > 512 {
            self.gpu.sync()?;
            self.tables.clear();
        }
        let b = DevBuf::from_slice(&self.gpu, &make())?;
        let p = b.ptr();
        self.tables.insert(key, b);
        Ok(p)
    }

    /// Bilinear taps (i0, i1, t) of a resize from `inp` to `out` positions, as three device arrays.
    fn bilinear(&mut self, out: usize, inp: usize) -> Result<[u64; 3], GpuError> {
        let taps = map::bilinear_taps(out, inp);
        Ok([
            self.table(format!("bl0-{out}-{inp}"), || taps.iter().map(|t| t.0 as i32).collect())?,
            self.table(format!("bl1-{out}-{inp}"), || taps.iter().map(|t| t.1 as i32).collect())?,
            self.table(format!("blt-{out}-{inp}"), || taps.iter().map(|t| t.2).collect())?,
        ])
    }

    /// Bilinear resize of `n` grids of `from` (w, h) into `dst` of `to` (w, h), added to it when
    /// `accumulate` (as `Grid::resize`, then `average`'s sum).
    fn resize_grid(
        &mut self,
        n: usize,
        src: u64,
        (sw, sh): (usize, usize),
        dst: u64,
        (dw, dh): (usize, usize),
        accumulate: bool,
    ) -> Result<(), GpuError> {
        let [ya, yb, yt] = self.bilinear(dh, sh)?;
        let [xa, xb, xt] = self.bilinear(dw, sw)?;
        let i = |v: usize| Arg::I(v as i32);
        self.gpu.launch_n(
            "grid_resize",
            n * dw * dh,
            &[
                Arg::P(src),
                i(sh),
                i(sw),
                Arg::P(dst),
                i(dh),
                i(dw),
                i(n),
                Arg::P(ya),
                Arg::P(yb),
                Arg::P(yt),
                Arg::P(xa),
                Arg::P(xb),
                Arg::P(xt),
                Arg::I(i32::from(accumulate)),
            ],
        )
    }

    /// Triangle-filter taps of image's resize from `src` to `dst` lines: left, count, offset, weights.
    fn triangle(&mut self, src: u32, dst: u32) -> Result<[u64; 4], GpuError> {
        let t = crate::util::imageio::triangle_taps(src, dst);
        let offsets: Vec<i32> = t.offsets.iter().map(|&o| o as i32).collect();
        Ok([
            self.table(format!("trl-{src}-{dst}"), || t.left.iter().map(|&v| v as i32).collect())?,
            self.table(format!("trc-{src}-{dst}"), || t.count.iter().map(|&v| v as i32).collect())?,
            self.table(format!("tro-{src}-{dst}"), || offsets)?,
            self.table(format!("trw-{src}-{dst}"), || t.weights.clone())?,
        ])
    }

    /// Uploads an enrolment's bank once (keyed by the enrolment's identity).
    fn ensure_bank(&mut self, uid: u64, banks: &[Bank], distances: &[Distance]) -> Result<(), GpuError> {
        if self.bank.as_ref().is_some_and(|(u, _)| *u == uid) {
            return Ok(());
        }
        self.bank = None;
        let mut dev = Vec::new();
        for (b, m) in banks.iter().zip(distances) {
            if b.is_empty() {
                return Err(GpuError::Unsupported("an empty bank layer cannot be searched".into()));
            }
            let pos: Vec<f32> = b.pos.iter().flatten().copied().collect();
            let sq = match m {
                Distance::L2 => {
                    let sq: Vec<f32> = b.rows.chunks_exact(b.dim).map(|r| r.iter().map(|v| v * v).sum()).collect();
                    Some(DevBuf::from_slice(&self.gpu, &sq)?)
                }
                Distance::Cosine => None,
            };
            dev.push(DevBank {
                rows: DevBuf::from_slice(&self.gpu, &b.rows)?,
                pos: DevBuf::from_slice(&self.gpu, &pos)?,
                sq,
                len: b.len(),
                dim: b.dim,
            });
        }
        self.bank = Some((uid, dev));
        Ok(())
    }

    /// Runs the encoder on the NCHW batch already in slot 0; returns the shapes of every value.
    fn run_net(&mut self, batch: usize, h: usize, w: usize) -> Result<crate::engine::netplan::Shapes, GpuError> {
        let shapes = self.net.plan.shapes(h, w)?;
        let mut need = vec![0usize; self.net.slots.len()];
        for (v, &(c, vh, vw)) in shapes.iter().enumerate() {
            let s = self.net.slot[v];
            need[s] = need[s].max(batch * c * vh * vw * 4);
        }
        for (s, bytes) in need.iter().enumerate().skip(1) {
            self.net.slots[s].ensure(&self.gpu, *bytes)?;
        }
        let ptr = |net: &Net, v: usize| net.slots[net.slot[v]].ptr();
        for (i, l) in self.net.plan.layers.iter().enumerate() {
            let Layer::Conv(c) = l else {
                return Err(GpuError::Unsupported(format!("layer {i} is not a convolution after fusion")));
            };
            let (_, ih, iw) = shapes[c.input];
            let (_, oh, ow) = shapes[c.output];
            let (act, lo, hi) = match c.act {
                Act::None => (0, 0.0, 0.0),
                Act::Clip { lo, hi } => (1, lo, hi),
            };
            let (x, y) = (ptr(&self.net, c.input), ptr(&self.net, c.output));
            let res = c.residual.map(|r| ptr(&self.net, r));
            let (wt, bias) = (self.net.weights[i].0.ptr(), self.net.weights[i].1.ptr());
            if c.is_pointwise() {
                let hw = ih * iw;
                self.gpu.gemm(
                    wt,
                    x,
                    y,
                    c.cout,
                    hw,
                    c.cin,
                    batch,
                    [0, c.cin * hw, c.cout * hw],
                    Some(bias),
                    res,
                    (act, lo, hi),
                )?;
            } else {
                let g = c.geometry(ih, iw).ok_or(crate::engine::netplan::PlanError::TooSmall { h, w, layer: i })?;
                let i32_ = |v: usize| Arg::I(v as i32);
                self.gpu.launch_n(
                    "conv_direct",
                    batch * c.cout * oh * ow,
                    &[
                        Arg::P(x),
                        Arg::P(wt),
                        Arg::P(bias),
                        Arg::P(res.unwrap_or(0)),
                        Arg::P(y),
                        i32_(batch),
                        i32_(c.cin),
                        i32_(ih),
                        i32_(iw),
                        i32_(c.cout),
                        i32_(oh),
                        i32_(ow),
                        i32_(c.kernel[0]),
                        i32_(c.kernel[1]),
                        i32_(c.stride[0]),
                        i32_(c.stride[1]),
                        i32_(c.dilation[0]),
                        i32_(c.dilation[1]),
                        i32_(g.pad_top),
                        i32_(g.pad_left),
                        i32_(c.groups),
                        Arg::I(act),
                        Arg::F(lo),
                        Arg::F(hi),
                    ],
                )?;
            }
        }
        Ok(shapes)
    }

    /// The encoder alone on one normalised NCHW image: the requested manifest outputs (the parity
    /// tests and the load-time self-check hold these against ONNX Runtime's ordinary run).
    pub fn encode(
        &mut self,
        enc: &mut Encoder,
        chw: &[f32],
        h: usize,
        w: usize,
        outputs: &[usize],
    ) -> Result<Vec<FeatureMap>, GpuError> {
        // The detector may have moved to another thread since the last call.
        self.gpu.ctx.bind_to_thread()?;
        if chw.len() != 3 * h * w {
            return Err(GpuError::Unsupported(format!("{} values for a 3 x {h} x {w} image", chw.len())));
        }
        let input = self.input_buffer(enc, 1, h, w)?;
        // SAFETY: the input buffer holds a 3 x h x w batch of one (checked above).
        unsafe { upload(&self.gpu, input, chw) }?;
        let feats = self.run_encoder(enc, 1, h, w)?;
        let mut maps = Vec::new();
        for &o in outputs {
            let &(src, (c, mh, mw)) = feats.get(o).ok_or_else(|| GpuError::Unsupported(format!("no output #{o}")))?;
            let mut data = vec![0.0f32; c * mh * mw];
            // SAFETY: the encoder's output of that shape, valid until its next run.
            unsafe { download(&self.gpu, src, &mut data) }?;
            maps.push(FeatureMap { c, h: mh, w: mw, data });
        }
        Ok(maps)
    }

    /// Scores a batch of frames (original size, all with the same encoder-input size) against an
    /// enrolment's banks; `uid` identifies the enrolment so its bank is uploaded once.
    pub fn score(
        &mut self,
        enc: &mut Encoder,
        meta: &EnrolmentMeta,
        banks: &[Bank],
        uid: u64,
        frames: &[&RgbImage],
    ) -> Result<Vec<Scored>, GpuError> {
        let Some(first) = frames.first() else {
            return Ok(Vec::new());
        };
        let (iw, ih) = meta.geometry.input_size(first.width(), first.height());
        if frames.iter().any(|f| meta.geometry.input_size(f.width(), f.height()) != (iw, ih)) {
            return Err(GpuError::Unsupported("a batch must share one encoder-input size".into()));
        }
        if banks.len() != meta.groups.len() || meta.distances.len() != meta.groups.len() {
            return Err(GpuError::Unsupported("enrolment banks do not match its layers".into()));
        }
        let n = frames.len();
        let (w, h) = (iw as usize, ih as usize);
        // The detector may have moved to another thread since the last call.
        self.gpu.ctx.bind_to_thread()?;
        self.ensure_bank(uid, banks, &meta.distances)?;
        let t0 = self.gpu.mark()?;

        let prepared = self.preprocess(enc, frames, (iw, ih))?;
        let t1 = self.gpu.mark()?;
        let feats = self.run_encoder(enc, n, h, w)?;
        let t2 = self.gpu.mark()?;

        let pooled = self.pool(meta, &feats, n)?;
        let grids = self.layer_distances(meta, &pooled, prepared, n, (w, h))?;
        let (patch_grid, pgw, pgh) = self.patch_grid(meta, &grids, n)?;
        let scores = self.image_scores(meta, &grids, (patch_grid, pgw, pgh), n)?;
        let map_ptr = self.smoothed_map(meta, (patch_grid, pgw, pgh), n, (w, h))?;
        let t3 = self.gpu.mark()?;

        // Back to the host: the maps, the patch grids and the scores.
        let mut maps = vec![0.0f32; n * w * h];
        let mut pgrids = vec![0.0f32; n * pgw * pgh];
        let mut s = vec![0.0f32; n];
        let stream = self.gpu.stream.cu_stream();
        // SAFETY: each source holds at least the destination's bytes; synchronised below.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(&mut maps, map_ptr, stream)?;
            cudarc::driver::result::memcpy_dtoh_async(&mut pgrids, patch_grid, stream)?;
            cudarc::driver::result::memcpy_dtoh_async(&mut s, scores, stream)?;
        }
        self.gpu.sync()?;
        let ms = |a: &cudarc::driver::CudaEvent, b: &cudarc::driver::CudaEvent| a.elapsed_ms(b).unwrap_or(f32::NAN);
        let timings = Timings { preprocess_ms: ms(&t0, &t1), encoder_ms: ms(&t1, &t2), decoder_ms: ms(&t2, &t3) };
        Ok((0..n)
            .map(|i| Scored {
                patch_grid: Grid::new(pgw, pgh, pgrids[i * pgw * pgh..(i + 1) * pgw * pgh].to_vec()),
                map: Grid::new(w, h, maps[i * w * h..(i + 1) * w * h].to_vec()),
                score: s[i],
                timings,
            })
            .collect())
    }

    /// Uploads each frame, resizes it to the encoder input (the CPU's triangle filter) and normalises it
    /// into the encoder's input. Returns the resized RGB8 frames (the background mask reads them).
    fn preprocess(&mut self, enc: &mut Encoder, frames: &[&RgbImage], (iw, ih): (u32, u32)) -> Result<u64, GpuError> {
        let n = frames.len();
        let (w, h) = (iw as usize, ih as usize);
        // Preprocessing: upload, resize (image's triangle filter), normalise into slot 0.
        let prepared = self.buf("prepared", n * w * h * 3)?;
        let input = self.input_buffer(enc, n, h, w)?;
        for (i, f) in frames.iter().enumerate() {
            let (fw, fh) = (f.width() as usize, f.height() as usize);
            let dst = prepared + (i * w * h * 3) as u64;
            let src = self.upload("frame", f.as_raw())?;
            if (fw, fh) == (w, h) {
                copy(&self.gpu, dst, src, w * h * 3)?;
            } else {
                let [vl, vc, vo, vw] = self.triangle(fh as u32, ih)?;
                let [hl, hc, ho, hw] = self.triangle(fw as u32, iw)?;
                let tmp = self.buf("resize_tmp", h * fw * 3 * 4)?;
                let w3 = fw * 3;
                self.gpu.launch(
                    "resize_v",
                    (w3.div_ceil(256) as u32, h as u32, 1),
                    256,
                    &[
                        Arg::P(src),
                        Arg::I(w3 as i32),
                        Arg::I(h as i32),
                        Arg::P(vl),
                        Arg::P(vc),
                        Arg::P(vo),
                        Arg::P(vw),
                        Arg::P(tmp),
                    ],
                )?;
                self.gpu.launch(
                    "resize_h",
                    (w.div_ceil(256) as u32, h as u32, 1),
                    256,
                    &[
                        Arg::P(tmp),
                        Arg::I(fw as i32),
                        Arg::I(w as i32),
                        Arg::I(h as i32),
                        Arg::P(hl),
                        Arg::P(hc),
                        Arg::P(ho),
                        Arg::P(hw),
                        Arg::P(dst),
                    ],
                )?;
            }
            let [m0, m1, m2] = self.mul;
            let [a0, a1, a2] = self.add;
            self.gpu.launch_n(
                "to_nchw",
                w * h,
                &[
                    Arg::P(dst),
                    Arg::I((w * h) as i32),
                    Arg::F(m0),
                    Arg::F(m1),
                    Arg::F(m2),
                    Arg::F(a0),
                    Arg::F(a1),
                    Arg::F(a2),
                    Arg::P(input + (i * 3 * w * h * 4) as u64),
                ],
            )?;
        }
        Ok(prepared)
    }

    /// Pools each encoder output the enrolment's layers need, once: raw for L2 layers, unit rows for
    /// cosine ones.
    fn pool(
        &mut self,
        meta: &EnrolmentMeta,
        feats: &[Part],
        n: usize,
    ) -> Result<HashMap<(usize, bool), Part>, GpuError> {
        // Patches: each needed output pooled once (raw for L2 layers, unit rows for cosine ones).
        let mut outputs: Vec<usize> = meta.groups.iter().flatten().copied().collect();
        outputs.sort_unstable();
        outputs.dedup();
        while self.pool_bufs.len() < 2 * outputs.len() {
            self.pool_bufs.push(DevBuf::empty(&self.gpu));
        }
        let mut pooled: HashMap<(usize, bool), Part> = HashMap::new();
        for (j, &o) in outputs.iter().enumerate() {
            let &(src, (c, ph, pw)) = feats.get(o).ok_or_else(|| GpuError::Unsupported(format!("no output #{o}")))?;
            let len = n * c * ph * pw;
            self.pool_bufs[2 * j].ensure(&self.gpu, len * 4)?;
            let raw = self.pool_bufs[2 * j].ptr();
            let r = (meta.pool / 2) as i32;
            let norm = 1.0 / ((2 * r + 1) * (2 * r + 1)) as f32;
            self.gpu.launch_n(
                "box_pool",
                len,
                &[
                    Arg::P(src),
                    Arg::P(raw),
                    Arg::L((n * c) as i64),
                    Arg::I(ph as i32),
                    Arg::I(pw as i32),
                    Arg::I(r),
                    Arg::F(norm),
                ],
            )?;
            pooled.insert((o, false), (raw, (c, ph, pw)));
            let cosine_user =
                meta.groups.iter().zip(&meta.distances).any(|(g, m)| *m == Distance::Cosine && g.contains(&o));
            if cosine_user {
                self.pool_bufs[2 * j + 1].ensure(&self.gpu, len * 4)?;
                let unit = self.pool_bufs[2 * j + 1].ptr();
                copy(&self.gpu, unit, raw, len * 4)?;
                self.gpu.launch_n(
                    "normalize_positions",
                    n * ph * pw,
                    &[Arg::P(unit), Arg::I(n as i32), Arg::I(c as i32), Arg::I((ph * pw) as i32)],
                )?;
                pooled.insert((o, true), (unit, (c, ph, pw)));
            }
        }
        Ok(pooled)
    }

    /// Per bank layer: the query matrix, its nearest neighbours in the bank, and the distance grid
    /// (masked to the foreground on a plain backdrop). Returns each layer's grid and its size.
    fn layer_distances(
        &mut self,
        meta: &EnrolmentMeta,
        pooled: &HashMap<(usize, bool), Part>,
        prepared: u64,
        n: usize,
        (w, h): (usize, usize),
    ) -> Result<Vec<(u64, usize, usize)>, GpuError> {
        let groups = meta.groups.len();
        while self.qt_bufs.len() < groups {
            self.qt_bufs.push(DevBuf::empty(&self.gpu));
            self.dist_bufs.push(DevBuf::empty(&self.gpu));
        }
        let mut grids: Vec<(u64, usize, usize)> = Vec::new();
        for g in 0..groups {
            grids.push(self.layer_distance(meta, g, pooled, prepared, n, (w, h))?);
        }
        Ok(grids)
    }

    /// Bank layer `g`: its query matrix from the pooled parts (bilinear to the layer's grid), the
    /// nearest bank row of each query (GEMM in chunks, fused row-min, positional window), and the
    /// distance grid, masked to the foreground on a plain backdrop and to the operator's zones.
    fn layer_distance(
        &mut self,
        meta: &EnrolmentMeta,
        g: usize,
        pooled: &HashMap<(usize, bool), Part>,
        prepared: u64,
        n: usize,
        (w, h): (usize, usize),
    ) -> Result<(u64, usize, usize), GpuError> {
        let cosine = meta.distances[g] == Distance::Cosine;
        let parts: Vec<Part> = meta.groups[g]
            .iter()
            .map(|o| pooled.get(&(*o, cosine)).copied().ok_or_else(|| GpuError::Unsupported("missing part".into())))
            .collect::<Result<_, _>>()?;
        // The layer's grid is its finest part's (the last of equal size, as max_by_key).
        let (_, (_, gh, gw)) = *parts.iter().rev().max_by_key(|(_, (_, ph, pw))| ph * pw).expect("a group has parts");
        let dim: usize = parts.iter().map(|(_, (c, _, _))| c).sum();
        let nq = n * gh * gw;
        self.qt_bufs[g].ensure(&self.gpu, dim * nq * 4)?;
        let qt = self.qt_bufs[g].ptr();
        let mut offset = 0usize;
        let mut seg = vec![0i32];
        for &(p, (c, ph, pw)) in &parts {
            let [y0, y1, ty] = self.bilinear(gh, ph)?;
            let [x0, x1, tx] = self.bilinear(gw, pw)?;
            self.gpu.launch_n(
                "gather_part",
                n * c * gh * gw,
                &[
                    Arg::P(p),
                    Arg::I(c as i32),
                    Arg::I(ph as i32),
                    Arg::I(pw as i32),
                    Arg::P(qt),
                    Arg::L(nq as i64),
                    Arg::I(offset as i32),
                    Arg::I(gh as i32),
                    Arg::I(gw as i32),
                    Arg::I(n as i32),
                    Arg::P(y0),
                    Arg::P(y1),
                    Arg::P(ty),
                    Arg::P(x0),
                    Arg::P(x1),
                    Arg::P(tx),
                ],
            )?;
            offset += c;
            seg.push(offset as i32);
        }
        if cosine && parts.len() > 1 {
            let segs = self.table(format!("seg-{seg:?}"), || seg.clone())?;
            self.gpu.launch_n(
                "normalize_segments",
                nq,
                &[Arg::P(qt), Arg::L(nq as i64), Arg::P(segs), Arg::I(parts.len() as i32)],
            )?;
        }
        let (bank_rows, bank_pos, bank_sq, nb, bdim) = {
            let (_, dev) = self.bank.as_ref().expect("bank uploaded above");
            let b = &dev[g];
            (b.rows.ptr(), b.pos.ptr(), b.sq.as_ref().map(|s| s.ptr()), b.len, b.dim)
        };
        if bdim != dim {
            return Err(GpuError::Unsupported(format!("bank layer {g} has {bdim} dims, the patches {dim}")));
        }
        let qsq = match bank_sq {
            Some(_) => {
                let q = self.buf("qsq", nq * 4)?;
                self.gpu.launch_n("column_sq", nq, &[Arg::P(qt), Arg::L(nq as i64), Arg::I(dim as i32), Arg::P(q)])?;
                Some(q)
            }
            None => None,
        };
        let chunk = nb.min((SIM_FLOATS / nq.max(1)).max(256));
        let nsplit = chunk.div_ceil(128).clamp(1, 32);
        let per_split = chunk.div_ceil(nsplit);
        let sims = self.buf("sims", chunk * nq * 4)?;
        let pbest = self.buf("pbest", 2 * nsplit * nq * 4)?;
        let parg = self.buf("parg", 2 * nsplit * nq * 4)?;
        let best = self.buf("best", 2 * nq * 4)?;
        let arg = self.buf("arg", 2 * nq * 4)?;
        let nearest = self.buf("nearest", nq * 4)?;
        let use_window = i32::from(meta.window < 1.0);
        for (ci, b0) in (0..nb).step_by(chunk).enumerate() {
            let nbc = chunk.min(nb - b0);
            self.gpu.matmul(bank_rows + (b0 * dim * 4) as u64, qt, sims, nbc, nq, dim)?;
            let splits = nbc.div_ceil(per_split) as u32;
            self.gpu.launch(
                "knn_partial",
                (nq.div_ceil(256) as u32, splits, 1),
                256,
                &[
                    Arg::P(sims),
                    Arg::L(nq as i64),
                    Arg::I(nbc as i32),
                    Arg::I(b0 as i32),
                    Arg::I(per_split as i32),
                    Arg::P(bank_sq.unwrap_or(0)),
                    Arg::P(bank_pos),
                    Arg::I(gw as i32),
                    Arg::I(gh as i32),
                    Arg::I(use_window),
                    Arg::F(meta.window),
                    Arg::P(pbest),
                    Arg::P(parg),
                ],
            )?;
            self.gpu.launch_n(
                "knn_merge",
                nq,
                &[
                    Arg::P(pbest),
                    Arg::P(parg),
                    Arg::I(splits as i32),
                    Arg::L(nq as i64),
                    Arg::P(best),
                    Arg::P(arg),
                    Arg::I(i32::from(ci == 0)),
                ],
            )?;
        }
        self.dist_bufs[g].ensure(&self.gpu, nq * 4)?;
        let dist = self.dist_bufs[g].ptr();
        self.gpu.launch_n(
            "knn_finish",
            nq,
            &[
                Arg::P(best),
                Arg::P(arg),
                Arg::P(qsq.unwrap_or(0)),
                Arg::L(nq as i64),
                Arg::I(use_window),
                Arg::P(dist),
                Arg::P(nearest),
            ],
        )?;
        if let Some(bg) = &meta.background {
            self.gpu.launch_n(
                "mask_background",
                nq,
                &[
                    Arg::P(dist),
                    Arg::I(gw as i32),
                    Arg::I(gh as i32),
                    Arg::I(n as i32),
                    Arg::P(prepared),
                    Arg::I(w as i32),
                    Arg::I(h as i32),
                    Arg::F(bg.rgb[0]),
                    Arg::F(bg.rgb[1]),
                    Arg::F(bg.rgb[2]),
                    Arg::F(bg.tolerance),
                ],
            )?;
        }
        if !meta.zones.is_empty() {
            let zones = &meta.zones;
            let key = format!("zones-{:x}-{gw}x{gh}", crate::detect::zones::key(zones));
            let keep = self.table(key, || crate::detect::zones::cell_mask(zones, gw, gh).unwrap_or_default())?;
            self.gpu.launch_n(
                "mask_cells",
                nq,
                &[Arg::P(dist), Arg::I((gw * gh) as i32), Arg::I(n as i32), Arg::P(keep)],
            )?;
        }
        Ok((dist, gw, gh))
    }

    /// The map's patch grid: the mean of the non-score layers on the finest of them.
    fn patch_grid(
        &mut self,
        meta: &EnrolmentMeta,
        grids: &[(u64, usize, usize)],
        n: usize,
    ) -> Result<(u64, usize, usize), GpuError> {
        // The map's grid: the mean of the non-score layers on the finest of them.
        let map_layers: Vec<(u64, usize, usize)> =
            grids.iter().enumerate().filter(|(i, _)| Some(*i) != meta.score_group).map(|(_, g)| *g).collect();
        let &(_, pgw, pgh) = map_layers
            .iter()
            .rev()
            .max_by_key(|(_, gw, gh)| gw * gh)
            .ok_or_else(|| GpuError::Unsupported("the enrolment has no map layer".into()))?;
        let patch_grid = if map_layers.len() == 1 {
            map_layers[0].0
        } else {
            let acc = self.buf("patch_grid", n * pgw * pgh * 4)?;
            for (i, &(src, gw, gh)) in map_layers.iter().enumerate() {
                self.resize_grid(n, src, (gw, gh), acc, (pgw, pgh), i > 0)?;
            }
            self.gpu.launch_n(
                "divide",
                n * pgw * pgh,
                &[Arg::P(acc), Arg::L((n * pgw * pgh) as i64), Arg::F(map_layers.len() as f32)],
            )?;
            acc
        };
        Ok((patch_grid, pgw, pgh))
    }

    /// Each image's score: the mean of the top fraction of the score layer's (or the map's) patch scores.
    fn image_scores(
        &mut self,
        meta: &EnrolmentMeta,
        grids: &[(u64, usize, usize)],
        (patch_grid, pgw, pgh): (u64, usize, usize),
        n: usize,
    ) -> Result<u64, GpuError> {
        // Image score: the top fraction of the score layer's (or the map's) patch scores.
        let (score_src, sgw, sgh) = match meta.score_group {
            Some(s) => grids[s],
            None => (patch_grid, pgw, pgh),
        };
        let len = sgw * sgh;
        let k = ((len as f32 * meta.top_fraction).ceil() as usize).clamp(1, len);
        let scores = self.buf("scores", n * 4)?;
        self.gpu.launch(
            "top_mean",
            (n as u32, 1, 1),
            256,
            &[Arg::P(score_src), Arg::I(len as i32), Arg::I(k as i32), Arg::P(scores)],
        )?;
        Ok(scores)
    }

    /// The anomaly map: the patch grid bilinear to the input size, then the Gaussian (sigma scaled with
    /// the input).
    fn smoothed_map(
        &mut self,
        meta: &EnrolmentMeta,
        (patch_grid, pgw, pgh): (u64, usize, usize),
        n: usize,
        (w, h): (usize, usize),
    ) -> Result<u64, GpuError> {
        // The map: bilinear to the input size, then the Gaussian (sigma scaled with the input).
        let up = self.buf("map_up", n * w * h * 4)?;
        self.resize_grid(n, patch_grid, (pgw, pgh), up, (w, h), false)?;
        let sigma = meta.sigma * ((w * h) as f32).sqrt() / 256.0;
        let map_ptr = if sigma > 0.0 {
            let kernel = map::gaussian_weights(sigma);
            let r = (kernel.len() / 2) as i32;
            let kp = self.table(format!("gauss-{}", sigma.to_bits()), || kernel.clone())?;
            let tmp = self.buf("map_tmp", n * w * h * 4)?;
            let out = self.buf("map", n * w * h * 4)?;
            for (src, dst, vertical) in [(up, tmp, 0), (tmp, out, 1)] {
                self.gpu.launch_n(
                    "blur",
                    n * w * h,
                    &[
                        Arg::P(src),
                        Arg::P(dst),
                        Arg::I(h as i32),
                        Arg::I(w as i32),
                        Arg::I(n as i32),
                        Arg::P(kp),
                        Arg::I(r),
                        Arg::I(vertical),
                    ],
                )?;
            }
            out
        } else {
            up
        };
        Ok(map_ptr)
    }
}

/// Gives every plan value a buffer slot, reusing the slots of values no later layer reads. The
/// input is slot 0; graph outputs keep theirs to the end.
fn assign_slots(plan: &Plan) -> Vec<usize> {
    let mut last = vec![0usize; plan.values];
    for (i, l) in plan.layers.iter().enumerate() {
        for v in l.inputs() {
            last[v] = i;
        }
    }
    for (_, v) in &plan.outputs {
        last[*v] = usize::MAX;
    }
    last[0] = usize::MAX;
    let mut slot = vec![0usize; plan.values];
    let mut free: Vec<usize> = Vec::new();
    let mut next = 1usize;
    for (i, l) in plan.layers.iter().enumerate() {
        slot[l.output()] = free.pop().unwrap_or_else(|| {
            next += 1;
            next - 1
        });
        for v in l.inputs() {
            if last[v] == i && !free.contains(&slot[v]) {
                free.push(slot[v]);
            }
        }
    }
    slot
}

/// Largest relative difference the GPU encoder may show against ONNX Runtime at start-up.
pub const GPU_ENCODER_TOLERANCE: f32 = 1e-3;

/// The same for TensorRT in fp16 through IO binding, held against its own ordinary run (fp16 has a
/// relative precision of about 1e-3, and TensorRT may pick other kernels per input shape).
pub const GPU_ENCODER_TOLERANCE_FP16: f32 = 1e-2;

/// GPU start-up for a detector: its GPU pipeline on GPU `ordinal`, its encoder checked against ONNX Runtime.
/// Starts the GPU pipeline on GPU `ordinal` and checks its encoder against ONNX Runtime.
pub fn start(encoder: &mut Encoder, ordinal: usize, cfg: &EngineConfig) -> Result<Pipeline, DetectError> {
    use crate::config::engine::GpuEncoder;
    let cache = cfg.kernel_cache.clone().unwrap_or_else(crate::engine::gpu::default_cache_dir);
    let t = Instant::now();
    let gpu = crate::engine::gpu::Gpu::open(ordinal, Some(&cache))?;
    let (name, arch, cached, blas) = (gpu.name.clone(), gpu.arch, gpu.ptx_cached, gpu.has_blas());
    let provider = encoder.provider();
    let which = match (cfg.gpu_encoder, encoder.on_gpu_provider()) {
        (GpuEncoder::Kernels, _) | (GpuEncoder::Auto, false) => DeviceEncoder::Kernels,
        (GpuEncoder::Onnxruntime | GpuEncoder::Auto, true) => DeviceEncoder::Onnxruntime,
        (GpuEncoder::Onnxruntime, false) => {
            return Err(crate::engine::gpu::GpuError::Unsupported(format!(
                "engine.gpu_encoder = \"onnxruntime\" but ONNX Runtime runs the encoder on its {provider} \
                 provider; install onnxruntime-gpu (or JetPack's) and list \"tensorrt\" or \"cuda\" in \
                 engine.providers, or use gpu_encoder = \"kernels\""
            ))
            .into());
        }
    };
    let described = match which {
        DeviceEncoder::Kernels => "anomalyd kernels".to_string(),
        DeviceEncoder::Onnxruntime => format!("onnxruntime {provider} with IO binding"),
    };
    let mut pipe = Pipeline::new(gpu, encoder.model_bytes(), encoder.manifest(), which)?;
    let err = encoder_error(encoder, &mut pipe)?;
    // TensorRT runs in fp16, and the reference it is held against is the same session's ordinary
    // run; anything else is checked against fp32.
    let limit = if which == DeviceEncoder::Onnxruntime && provider == crate::config::engine::Provider::Tensorrt {
        GPU_ENCODER_TOLERANCE_FP16
    } else {
        GPU_ENCODER_TOLERANCE
    };
    if err.is_nan() || err > limit {
        return Err(crate::engine::gpu::GpuError::Unsupported(format!(
            "the GPU encoder ({described}) differs from ONNX Runtime by {err:.2e} of the feature range (limit \
             {limit:.0e}); this model is not supported on the GPU path"
        ))
        .into());
    }
    tracing::info!(
        device = %format!("cuda:{ordinal}"),
        gpu = %name,
        encoder = %described,
        kernels = if cached { "cache hit" } else { "compiled (cache miss)" },
        "inspection runs on cuda:{ordinal} ({name}, sm_{}{}): encoder on {described}, decoder on anomalyd \
         kernels, {}, encoder within {err:.1e} of ONNX Runtime; ready in {:.0} ms",
        arch.0,
        arch.1,
        if blas { "cuBLAS GEMM" } else { "own GEMM" },
        t.elapsed().as_secs_f64() * 1e3
    );
    Ok(pipe)
}

/// Largest difference between the GPU encoder's outputs and ONNX Runtime's on a probe image,
/// relative to the largest feature magnitude.
pub fn encoder_error(encoder: &mut Encoder, pipe: &mut Pipeline) -> Result<f32, DetectError> {
    let probe =
        RgbImage::from_fn(128, 96, |x, y| image::Rgb([(x * 2) as u8, (y * 2 + x) as u8, ((x * y) % 251) as u8]));
    let spec = &encoder.manifest().input;
    let t = imageio::to_tensor(&probe, spec.scale, spec.mean, spec.std);
    let outputs: Vec<usize> = (0..encoder.manifest().outputs.len()).collect();
    let cpu = encoder.run(t.clone(), 96, 128, &outputs)?;
    let gpu = pipe.encode(encoder, &t, 96, 128, &outputs)?;
    Ok(relative_error(&cpu, &gpu))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_reused_but_never_while_a_value_is_live() {
        let plan = Plan::from_onnx(include_bytes!("../../models/efficientnet_lite0_s16.onnx")).unwrap();
        let slot = assign_slots(&plan);
        let n = slot.iter().max().unwrap() + 1;
        assert!(n < plan.values / 2, "{n} slots for {} values", plan.values);
        // Replay: a slot holds one live value at a time.
        let mut holder: Vec<Option<usize>> = vec![None; n];
        holder[0] = Some(0);
        let mut last = vec![0usize; plan.values];
        for (i, l) in plan.layers.iter().enumerate() {
            l.inputs().iter().for_each(|&v| last[v] = i);
        }
        let outs: Vec<usize> = plan.outputs.iter().map(|(_, v)| *v).collect();
        for (i, l) in plan.layers.iter().enumerate() {
            for v in l.inputs() {
                assert_eq!(holder[slot[v]], Some(v), "layer {i} reads value {v} after its slot was reused");
            }
            holder[slot[l.output()]] = Some(l.output());
            for v in l.inputs() {
                if last[v] == i && !outs.contains(&v) && v != 0 && holder[slot[v]] == Some(v) {
                    holder[slot[v]] = None;
                }
            }
        }
        for v in outs {
            assert_eq!(holder[slot[v]], Some(v), "output {v} was overwritten");
        }
    }
}
