//! The encoder as a plan of layers anomalyd can run with its own kernels: ONNX convolutions with
//! their padding, activation and residual add fused, read from the model file with [`crate::engine::onnx`].
//!
//! Only the image path matters: nodes that compute padding amounts from the input's shape (timm's
//! TF-"SAME" padding exports `Shape -> ... -> Pad`) are recognised as SAME padding of the convolution
//! that follows. Operators on the image path other than Conv, Clip, Relu, Add and constant-zero Pad
//! are refused, and the model then runs on ONNX Runtime only. [`Plan::run_cpu`] is the plain-Rust
//! reference the tests hold against ONNX Runtime, and the GPU plan is held against both.

use std::collections::HashMap;

use crate::engine::onnx::{self, Attr, Graph, OnnxError};

/// Activation fused after a layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Act {
    None,
    /// `min(max(x, lo), hi)`: ReLU6 is `Clip(0, 6)`, ReLU `Clip(0, inf)`.
    Clip {
        lo: f32,
        hi: f32,
    },
}

impl Act {
    pub fn apply(self, v: f32) -> f32 {
        match self {
            Act::None => v,
            Act::Clip { lo, hi } => v.max(lo).min(hi),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Padding {
    /// Top, left, bottom, right.
    Fixed([usize; 4]),
    /// TensorFlow SAME: output `ceil(in / stride)`, the extra pixel at the bottom/right.
    Same,
}

/// A 2-D convolution with bias, then the activation, then an optional residual value added.
#[derive(Debug, Clone, PartialEq)]
pub struct Conv {
    pub input: usize,
    pub output: usize,
    pub cin: usize,
    pub cout: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub dilation: [usize; 2],
    pub padding: Padding,
    pub groups: usize,
    /// `[cout, cin / groups, kh, kw]`.
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub act: Act,
    pub residual: Option<usize>,
}

/// Output size and top/left padding of a convolution over an `h x w` input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    pub ho: usize,
    pub wo: usize,
    pub pad_top: usize,
    pub pad_left: usize,
}

impl Conv {
    pub fn geometry(&self, h: usize, w: usize) -> Option<ConvGeometry> {
        let span = |k: usize, d: usize| (k - 1) * d + 1;
        let (sh, sw) = (self.stride[0], self.stride[1]);
        let (eh, ew) = (span(self.kernel[0], self.dilation[0]), span(self.kernel[1], self.dilation[1]));
        match self.padding {
            Padding::Same => {
                let (ho, wo) = (h.div_ceil(sh), w.div_ceil(sw));
                let th = ((ho - 1) * sh + eh).saturating_sub(h);
                let tw = ((wo - 1) * sw + ew).saturating_sub(w);
                Some(ConvGeometry { ho, wo, pad_top: th / 2, pad_left: tw / 2 })
            }
            Padding::Fixed([t, l, b, r]) => {
                let (ph, pw) = (h + t + b, w + l + r);
                if ph < eh || pw < ew {
                    return None;
                }
                Some(ConvGeometry { ho: (ph - eh) / sh + 1, wo: (pw - ew) / sw + 1, pad_top: t, pad_left: l })
            }
        }
    }

    /// Whether this is a plain matrix product: 1 x 1, stride 1, no padding, one group.
    pub fn is_pointwise(&self) -> bool {
        self.kernel == [1, 1] && self.stride == [1, 1] && self.groups == 1 && self.padding == Padding::Fixed([0; 4])
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Layer {
    Conv(Conv),
    /// `act(a + b)`.
    Add {
        a: usize,
        b: usize,
        output: usize,
        act: Act,
    },
    /// A standalone activation (one that could not be fused).
    Act {
        input: usize,
        output: usize,
        act: Act,
    },
}

impl Layer {
    pub fn output(&self) -> usize {
        match self {
            Layer::Conv(c) => c.output,
            Layer::Add { output, .. } | Layer::Act { output, .. } => *output,
        }
    }

    pub fn inputs(&self) -> Vec<usize> {
        match self {
            Layer::Conv(c) => std::iter::once(c.input).chain(c.residual).collect(),
            Layer::Add { a, b, .. } => vec![*a, *b],
            Layer::Act { input, .. } => vec![*input],
        }
    }
}

/// The encoder's layers in execution order. Value 0 is the NCHW input image (3 channels).
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub layers: Vec<Layer>,
    pub values: usize,
    /// The graph's outputs: name and value.
    pub outputs: Vec<(String, usize)>,
}

/// Shape of every value for one input size: `(channels, height, width)`.
pub type Shapes = Vec<(usize, usize, usize)>;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Onnx(#[from] OnnxError),
    #[error("encoder graph: {0}")]
    Unsupported(String),
    #[error("encoder input {h}x{w} is too small for layer {layer}")]
    TooSmall { h: usize, w: usize, layer: usize },
}

fn unsupported<T>(m: impl Into<String>) -> Result<T, PlanError> {
    Err(PlanError::Unsupported(m.into()))
}

/// What a graph tensor on the image path is.
#[derive(Debug, Clone, Copy)]
enum Tensor {
    Value(usize),
    /// The output of a constant-zero Pad whose amounts come from the shape: SAME padding of `value`.
    SamePadded(usize),
}

impl Plan {
    /// Reads an ONNX model and builds the fused plan of its image path.
    pub fn from_onnx(bytes: &[u8]) -> Result<Plan, PlanError> {
        Self::from_graph(&onnx::parse(bytes)?)
    }

    pub fn from_graph(g: &Graph) -> Result<Plan, PlanError> {
        let [input] = g.inputs.iter().filter(|i| !g.constants.contains_key(*i)).collect::<Vec<_>>()[..] else {
            return unsupported(format!("expected one image input, found {:?}", g.inputs));
        };
        let mut tensors: HashMap<&str, Tensor> = HashMap::from([(input.as_str(), Tensor::Value(0))]);
        let mut layers = Vec::new();
        let mut values = 1usize;
        let scalar =
            |name: &str| -> Option<f32> { g.constants.get(name).filter(|t| t.floats.len() == 1).map(|t| t.floats[0]) };
        for (i, n) in g.nodes.iter().enumerate() {
            let on_path: Vec<Option<Tensor>> = n.inputs.iter().map(|x| tensors.get(x.as_str()).copied()).collect();
            if n.op == "Shape" || on_path.iter().all(Option::is_none) {
                continue;
            }
            let what = format!("node {i} ({} -> {:?})", n.op, n.outputs.first());
            let value_in = |k: usize| -> Result<usize, PlanError> {
                match on_path.get(k).copied().flatten() {
                    Some(Tensor::Value(v)) => Ok(v),
                    Some(Tensor::SamePadded(_)) => unsupported(format!("{what}: a padded tensor feeds a non-Conv")),
                    None => unsupported(format!("{what}: input {k} is not on the image path")),
                }
            };
            let out = n.outputs.first().ok_or_else(|| PlanError::Unsupported(format!("{what}: no output")))?;
            let mut new_value = || {
                values += 1;
                values - 1
            };
            match n.op.as_str() {
                "Pad" => {
                    let v = value_in(0)?;
                    if on_path.iter().skip(1).any(Option::is_some) {
                        return unsupported(format!("{what}: padding amounts depend on the image"));
                    }
                    let mode = match n.attrs.get("mode") {
                        Some(Attr::Bytes(b)) => String::from_utf8_lossy(b).to_string(),
                        _ => "constant".into(),
                    };
                    let fill = n.inputs.get(2).filter(|s| !s.is_empty()).map(|s| scalar(s));
                    if mode != "constant" || matches!(fill, Some(f) if f != Some(0.0)) {
                        return unsupported(format!("{what}: only zero constant padding is supported"));
                    }
                    tensors.insert(out, Tensor::SamePadded(v));
                }
                "Conv" => {
                    let (input, same) = match on_path[0] {
                        Some(Tensor::Value(v)) => (v, false),
                        Some(Tensor::SamePadded(v)) => (v, true),
                        None => return unsupported(format!("{what}: no image input")),
                    };
                    let conv = conv_layer(g, n, input, new_value(), same).map_err(|e| match e {
                        PlanError::Unsupported(m) => PlanError::Unsupported(format!("{what}: {m}")),
                        e => e,
                    })?;
                    tensors.insert(out, Tensor::Value(conv.output));
                    layers.push(Layer::Conv(conv));
                }
                "Clip" | "Relu" => {
                    let input = value_in(0)?;
                    let act = if n.op == "Relu" {
                        Act::Clip { lo: 0.0, hi: f32::INFINITY }
                    } else {
                        let bound = |k: usize, attr: &str, default: f32| -> Result<f32, PlanError> {
                            match n.inputs.get(k).filter(|s| !s.is_empty()) {
                                Some(s) => scalar(s)
                                    .ok_or_else(|| PlanError::Unsupported(format!("{what}: bound is not a constant"))),
                                None => Ok(match n.attrs.get(attr) {
                                    Some(Attr::Float(f)) => *f,
                                    _ => default,
                                }),
                            }
                        };
                        Act::Clip { lo: bound(1, "min", f32::NEG_INFINITY)?, hi: bound(2, "max", f32::INFINITY)? }
                    };
                    let output = new_value();
                    tensors.insert(out, Tensor::Value(output));
                    layers.push(Layer::Act { input, output, act });
                }
                "Add" => {
                    let (a, b) = (value_in(0)?, value_in(1)?);
                    let output = new_value();
                    tensors.insert(out, Tensor::Value(output));
                    layers.push(Layer::Add { a, b, output, act: Act::None });
                }
                op => return unsupported(format!("operator {op} on the image path ({what}) is not supported")),
            }
        }
        let mut outputs = Vec::new();
        for name in &g.outputs {
            match tensors.get(name.as_str()) {
                Some(Tensor::Value(v)) => outputs.push((name.clone(), *v)),
                _ => return unsupported(format!("graph output `{name}` is not computed from the image")),
            }
        }
        let mut plan = Plan { layers, values, outputs };
        plan.fuse();
        Ok(plan)
    }

    /// Folds an activation, or a residual Add, into the convolution that feeds it when nothing else
    /// reads the convolution's own output.
    fn fuse(&mut self) {
        loop {
            let mut readers = vec![0usize; self.values];
            for l in &self.layers {
                l.inputs().iter().for_each(|&v| readers[v] += 1);
            }
            self.outputs.iter().for_each(|(_, v)| readers[*v] += 1);
            let producer = |layers: &[Layer], v: usize| layers.iter().position(|l| l.output() == v);
            let mut fused = None;
            for (i, l) in self.layers.iter().enumerate() {
                match *l {
                    Layer::Act { input, output, act } if readers[input] == 1 => {
                        if let Some(p) = producer(&self.layers, input)
                            && let Layer::Conv(c) = &self.layers[p]
                            && c.act == Act::None
                            && c.residual.is_none()
                        {
                            fused = Some((i, p, output, Some(act), None));
                            break;
                        }
                    }
                    Layer::Add { a, b, output, act: Act::None } => {
                        let conv_of = |v: usize| {
                            producer(&self.layers, v).filter(|&p| {
                                readers[v] == 1
                                    && matches!(&self.layers[p], Layer::Conv(c) if c.act == Act::None && c.residual.is_none())
                            })
                        };
                        // The other operand must exist before the convolution runs.
                        let before = |other: usize, p: usize| producer(&self.layers, other).is_none_or(|q| q < p);
                        if let Some(p) = conv_of(a).filter(|&p| before(b, p)) {
                            fused = Some((i, p, output, None, Some(b)));
                            break;
                        }
                        if let Some(p) = conv_of(b).filter(|&p| before(a, p)) {
                            fused = Some((i, p, output, None, Some(a)));
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let Some((i, p, output, act, residual)) = fused else {
                return;
            };
            if let Layer::Conv(c) = &mut self.layers[p] {
                c.output = output;
                if let Some(a) = act {
                    c.act = a;
                }
                c.residual = residual.or(c.residual);
            }
            self.layers.remove(i);
        }
    }

    /// Every value's `(c, h, w)` for an `h x w` input.
    pub fn shapes(&self, h: usize, w: usize) -> Result<Shapes, PlanError> {
        let mut s = vec![(0, 0, 0); self.values];
        s[0] = (3, h, w);
        for (i, l) in self.layers.iter().enumerate() {
            let shape = match l {
                Layer::Conv(c) => {
                    let (_, ih, iw) = s[c.input];
                    let g = c.geometry(ih, iw).ok_or(PlanError::TooSmall { h, w, layer: i })?;
                    (c.cout, g.ho, g.wo)
                }
                Layer::Add { a, b, .. } if s[*a] != s[*b] => return Err(PlanError::TooSmall { h, w, layer: i }),
                Layer::Add { a, .. } => s[*a],
                Layer::Act { input, .. } => s[*input],
            };
            if let Layer::Conv(c) = l
                && c.residual.is_some_and(|r| s[r] != shape)
            {
                return Err(PlanError::TooSmall { h, w, layer: i });
            }
            s[l.output()] = shape;
        }
        Ok(s)
    }

    /// Runs the plan on one NCHW image (batch 1) in plain Rust; returns every graph output's data.
    pub fn run_cpu(&self, image: &[f32], h: usize, w: usize) -> Result<Vec<Vec<f32>>, PlanError> {
        let shapes = self.shapes(h, w)?;
        let mut vals: Vec<Vec<f32>> = vec![Vec::new(); self.values];
        vals[0] = image.to_vec();
        for l in &self.layers {
            let out = match l {
                Layer::Conv(c) => {
                    conv_cpu(c, &vals[c.input], shapes[c.input], shapes[c.output], c.residual.map(|r| &vals[r][..]))
                }
                Layer::Add { a, b, act, .. } => vals[*a].iter().zip(&vals[*b]).map(|(x, y)| act.apply(x + y)).collect(),
                Layer::Act { input, act, .. } => vals[*input].iter().map(|&x| act.apply(x)).collect(),
            };
            vals[l.output()] = out;
        }
        Ok(self.outputs.iter().map(|(_, v)| vals[*v].clone()).collect())
    }
}

fn conv_layer(g: &Graph, n: &onnx::Node, input: usize, output: usize, same: bool) -> Result<Conv, PlanError> {
    let weight = n.inputs.get(1).and_then(|w| g.constants.get(w));
    let Some(weight) = weight.filter(|w| w.dims.len() == 4) else {
        return unsupported("weights are not a constant 4-D tensor");
    };
    let [cout, cig, kh, kw] = [weight.dims[0], weight.dims[1], weight.dims[2], weight.dims[3]];
    let bias = match n.inputs.get(2).filter(|s| !s.is_empty()) {
        Some(b) => match g.constants.get(b) {
            Some(t) if t.floats.len() == cout => t.floats.clone(),
            _ => return unsupported("bias is not a constant of the output channels"),
        },
        None => vec![0.0; cout],
    };
    let pair = |name: &str, default: usize| -> Result<[usize; 2], PlanError> {
        match n.ints(name) {
            None => Ok([default; 2]),
            Some([a, b]) if *a >= 1 && *b >= 1 => Ok([*a as usize, *b as usize]),
            Some(v) => unsupported(format!("{name} {v:?} is not 2-D")),
        }
    };
    let groups = n.int("group").unwrap_or(1).max(1) as usize;
    let pads = match n.ints("pads") {
        None => [0; 4],
        Some([t, l, b, r]) if [t, l, b, r].iter().all(|v| **v >= 0) => {
            [*t as usize, *l as usize, *b as usize, *r as usize]
        }
        Some(v) => return unsupported(format!("pads {v:?}")),
    };
    let auto = match n.attrs.get("auto_pad") {
        Some(Attr::Bytes(b)) => String::from_utf8_lossy(b).to_string(),
        _ => "NOTSET".into(),
    };
    let padding = match (same, auto.as_str()) {
        (true, "NOTSET" | "VALID") if pads == [0; 4] => Padding::Same,
        (false, "SAME_UPPER") => Padding::Same,
        (false, "NOTSET") => Padding::Fixed(pads),
        (false, "VALID") => Padding::Fixed([0; 4]),
        _ => return unsupported(format!("padding {auto} {pads:?} after a Pad: {same}")),
    };
    let cin = cig * groups;
    if cout % groups != 0 || weight.floats.len() != cout * cig * kh * kw {
        return unsupported("weights do not match the groups");
    }
    if let Some(k) = n.ints("kernel_shape")
        && k != [kh as i64, kw as i64]
    {
        return unsupported(format!("kernel_shape {k:?} differs from the weights"));
    }
    Ok(Conv {
        input,
        output,
        cin,
        cout,
        kernel: [kh, kw],
        stride: pair("strides", 1)?,
        dilation: pair("dilations", 1)?,
        padding,
        groups,
        weight: weight.floats.clone(),
        bias,
        act: Act::None,
        residual: None,
    })
}

/// Direct convolution (the reference: plain loops, no tricks).
fn conv_cpu(
    c: &Conv,
    x: &[f32],
    (_, h, w): (usize, usize, usize),
    (_, ho, wo): (usize, usize, usize),
    residual: Option<&[f32]>,
) -> Vec<f32> {
    let g = c.geometry(h, w).expect("shapes were checked");
    let (cig, cog) = (c.cin / c.groups, c.cout / c.groups);
    let [kh, kw] = c.kernel;
    let mut out = vec![0.0f32; c.cout * ho * wo];
    for co in 0..c.cout {
        let grp = co / cog;
        for oy in 0..ho {
            for ox in 0..wo {
                let mut s = c.bias[co];
                for ci in 0..cig {
                    let plane = &x[(grp * cig + ci) * h * w..(grp * cig + ci + 1) * h * w];
                    for ky in 0..kh {
                        let iy = (oy * c.stride[0] + ky * c.dilation[0]) as isize - g.pad_top as isize;
                        if iy < 0 || iy >= h as isize {
                            continue;
                        }
                        for kx in 0..kw {
                            let ix = (ox * c.stride[1] + kx * c.dilation[1]) as isize - g.pad_left as isize;
                            if ix < 0 || ix >= w as isize {
                                continue;
                            }
                            s += c.weight[((co * cig + ci) * kh + ky) * kw + kx] * plane[iy as usize * w + ix as usize];
                        }
                    }
                }
                let i = (co * ho + oy) * wo + ox;
                out[i] = c.act.apply(s) + residual.map_or(0.0, |r| r[i]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lite0_plan_fuses_into_convolutions() {
        let plan = Plan::from_onnx(include_bytes!("../../models/efficientnet_lite0_s16.onnx")).unwrap();
        // 33 convolutions; every Clip and every residual Add is folded into one.
        assert_eq!(plan.layers.len(), 33, "{:#?}", plan.layers.iter().map(std::mem::discriminant).collect::<Vec<_>>());
        assert!(plan.layers.iter().all(|l| matches!(l, Layer::Conv(_))));
        let residuals = plan.layers.iter().filter(|l| matches!(l, Layer::Conv(c) if c.residual.is_some())).count();
        assert_eq!(residuals, 6);
        let same = plan.layers.iter().filter(|l| matches!(l, Layer::Conv(c) if c.padding == Padding::Same)).count();
        assert_eq!(same, 4);
        let names: Vec<&str> = plan.outputs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["feat_s4", "feat_s8", "feat_s16"]);
        let s = plan.shapes(224, 288).unwrap();
        let dims: Vec<_> = plan.outputs.iter().map(|(_, v)| s[*v]).collect();
        assert_eq!(dims, [(24, 56, 72), (40, 28, 36), (112, 14, 18)]);
    }

    #[test]
    fn same_padding_matches_tensorflow() {
        let conv = |k: usize, s: usize| Conv {
            input: 0,
            output: 1,
            cin: 1,
            cout: 1,
            kernel: [k, k],
            stride: [s, s],
            dilation: [1, 1],
            padding: Padding::Same,
            groups: 1,
            weight: vec![1.0; k * k],
            bias: vec![0.0],
            act: Act::None,
            residual: None,
        };
        // TF: in 224, k 3, s 2 -> out 112, pad total 1 (0 before); in 225 -> 113, total 2 (1 before).
        assert_eq!(conv(3, 2).geometry(224, 224).unwrap(), ConvGeometry { ho: 112, wo: 112, pad_top: 0, pad_left: 0 });
        assert_eq!(conv(3, 2).geometry(225, 225).unwrap(), ConvGeometry { ho: 113, wo: 113, pad_top: 1, pad_left: 1 });
        assert_eq!(conv(5, 2).geometry(28, 28).unwrap(), ConvGeometry { ho: 14, wo: 14, pad_top: 1, pad_left: 1 });
    }

    #[test]
    fn unsupported_operators_are_named() {
        let mut g = crate::engine::onnx::parse(include_bytes!("../../models/efficientnet_lite0_s16.onnx")).unwrap();
        // The first activation on the image path (Clips also appear in the padding arithmetic).
        let conv_out = g.nodes.iter().find(|n| n.op == "Conv").unwrap().outputs[0].clone();
        let i = g.nodes.iter().position(|n| n.op == "Clip" && n.inputs[0] == conv_out).unwrap();
        g.nodes[i].op = "HardSwish".into();
        let Err(e) = Plan::from_graph(&g) else { panic!("a HardSwish on the image path was accepted") };
        let e = e.to_string();
        assert!(e.contains("HardSwish"), "{e}");
    }
}
