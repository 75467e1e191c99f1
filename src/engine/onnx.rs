//! A minimal reader of ONNX model files: just enough of the protobuf wire format to list a graph's
//! nodes (operator, inputs, outputs, attributes), its initializers and Constant tensors as f32/i64, and
//! its inputs and outputs. Used by [`crate::engine::netplan`] to run the encoder with anomalyd's own kernels.

use std::collections::HashMap;

#[derive(Debug, thiserror::Error)]
#[error("ONNX model: {0}")]
pub struct OnnxError(pub String);

fn err<T>(m: impl Into<String>) -> Result<T, OnnxError> {
    Err(OnnxError(m.into()))
}

/// A tensor's shape and values, converted to f32 (float) or kept as i64 (integers).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorData {
    pub dims: Vec<usize>,
    pub floats: Vec<f32>,
    pub ints: Vec<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    Float(f32),
    Int(i64),
    Bytes(Vec<u8>),
    Tensor(TensorData),
    Floats(Vec<f32>),
    Ints(Vec<i64>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub op: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attrs: HashMap<String, Attr>,
}

impl Node {
    pub fn ints(&self, name: &str) -> Option<&[i64]> {
        match self.attrs.get(name) {
            Some(Attr::Ints(v)) => Some(v),
            _ => None,
        }
    }

    pub fn int(&self, name: &str) -> Option<i64> {
        match self.attrs.get(name) {
            Some(Attr::Int(v)) => Some(*v),
            _ => None,
        }
    }
}

/// The graph of a model: nodes in file order (ONNX requires topological order), initializers and
/// Constant-node tensors by name, and the graph's input and output names.
#[derive(Debug, Clone, Default)]
pub struct Graph {
    pub nodes: Vec<Node>,
    pub constants: HashMap<String, TensorData>,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
}

/// Parses a serialised `ModelProto`.
pub fn parse(bytes: &[u8]) -> Result<Graph, OnnxError> {
    let mut graph = None;
    for f in Fields::new(bytes) {
        let f = f?;
        if f.number == 7 {
            graph = Some(parse_graph(f.bytes()?)?);
        }
    }
    let mut g = graph.ok_or_else(|| OnnxError("no graph in the file".into()))?;
    for n in &g.nodes {
        if n.op == "Constant"
            && let (Some(Attr::Tensor(t)), Some(out)) = (n.attrs.get("value"), n.outputs.first())
        {
            g.constants.insert(out.clone(), t.clone());
        }
    }
    Ok(g)
}

fn parse_graph(b: &[u8]) -> Result<Graph, OnnxError> {
    let mut g = Graph::default();
    for f in Fields::new(b) {
        let f = f?;
        match f.number {
            1 => g.nodes.push(parse_node(f.bytes()?)?),
            5 => {
                let (name, t) = parse_tensor(f.bytes()?)?;
                g.constants.insert(name, t);
            }
            11 => g.inputs.push(value_info_name(f.bytes()?)?),
            12 => g.outputs.push(value_info_name(f.bytes()?)?),
            _ => {}
        }
    }
    Ok(g)
}

fn value_info_name(b: &[u8]) -> Result<String, OnnxError> {
    for f in Fields::new(b) {
        let f = f?;
        if f.number == 1 {
            return string(f.bytes()?);
        }
    }
    err("a graph input or output has no name")
}

fn parse_node(b: &[u8]) -> Result<Node, OnnxError> {
    let mut n = Node { op: String::new(), inputs: vec![], outputs: vec![], attrs: HashMap::new() };
    for f in Fields::new(b) {
        let f = f?;
        match f.number {
            1 => n.inputs.push(string(f.bytes()?)?),
            2 => n.outputs.push(string(f.bytes()?)?),
            4 => n.op = string(f.bytes()?)?,
            5 => {
                let (name, a) = parse_attr(f.bytes()?)?;
                if let Some(a) = a {
                    n.attrs.insert(name, a);
                }
            }
            _ => {}
        }
    }
    Ok(n)
}

fn parse_attr(b: &[u8]) -> Result<(String, Option<Attr>), OnnxError> {
    let mut name = String::new();
    let (mut floats, mut ints) = (Vec::new(), Vec::new());
    let mut kind: Option<i64> = None;
    let mut single: Option<Attr> = None;
    for f in Fields::new(b) {
        let f = f?;
        match f.number {
            1 => name = string(f.bytes()?)?,
            2 => single = Some(Attr::Float(f32::from_bits(f.fixed32()?))),
            3 => single = Some(Attr::Int(f.varint()? as i64)),
            4 => single = Some(Attr::Bytes(f.bytes()?.to_vec())),
            5 => single = Some(Attr::Tensor(parse_tensor(f.bytes()?)?.1)),
            7 => f.repeated_fixed32(&mut |v| floats.push(f32::from_bits(v)))?,
            8 => f.repeated_varint(&mut |v| ints.push(v as i64))?,
            20 => kind = Some(f.varint()? as i64),
            _ => {}
        }
    }
    // AttributeProto.type: 1 FLOAT, 2 INT, 3 STRING, 4 TENSOR, 6 FLOATS, 7 INTS.
    let attr = match kind {
        Some(6) => Some(Attr::Floats(floats)),
        Some(7) => Some(Attr::Ints(ints)),
        _ if single.is_some() => single,
        _ if !ints.is_empty() => Some(Attr::Ints(ints)),
        _ if !floats.is_empty() => Some(Attr::Floats(floats)),
        // An empty list attribute (type 7 with no values) is still a list.
        _ => None,
    };
    Ok((name, attr))
}

/// TensorProto: dims 1, data_type 2, float_data 4, int32_data 5, int64_data 7, name 8, raw_data 9,
/// double_data 10.
fn parse_tensor(b: &[u8]) -> Result<(String, TensorData), OnnxError> {
    let mut name = String::new();
    let mut dims = Vec::new();
    let mut dtype = 0u64;
    let (mut floats, mut ints) = (Vec::new(), Vec::new());
    let mut raw: Option<&[u8]> = None;
    for f in Fields::new(b) {
        let f = f?;
        match f.number {
            1 => f.repeated_varint(&mut |v| dims.push(v as usize))?,
            2 => dtype = f.varint()?,
            4 => f.repeated_fixed32(&mut |v| floats.push(f32::from_bits(v)))?,
            5 | 7 => f.repeated_varint(&mut |v| ints.push(v as i64))?,
            8 => name = string(f.bytes()?)?,
            9 => raw = Some(f.bytes()?),
            _ => {}
        }
    }
    if let Some(raw) = raw {
        // TensorProto.DataType: 1 FLOAT, 6 INT32, 7 INT64, 11 DOUBLE.
        match dtype {
            1 => floats = raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            6 => ints = raw.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).collect(),
            7 => ints = raw.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect(),
            11 => {
                floats =
                    raw.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32).collect()
            }
            _ => {}
        }
    }
    let count: usize = dims.iter().product();
    let have = floats.len().max(ints.len());
    if (raw.is_some() || have > 0) && have != count && !(dims.is_empty() && have == 1) {
        return err(format!("tensor `{name}` has {have} values for shape {dims:?}"));
    }
    Ok((name, TensorData { dims, floats, ints }))
}

fn string(b: &[u8]) -> Result<String, OnnxError> {
    String::from_utf8(b.to_vec()).or_else(|_| err("a name is not UTF-8"))
}

/// One protobuf field: its number and its payload.
struct Field<'a> {
    number: u64,
    wire: u8,
    value: u64,
    data: &'a [u8],
}

impl<'a> Field<'a> {
    fn bytes(&self) -> Result<&'a [u8], OnnxError> {
        if self.wire == 2 { Ok(self.data) } else { err(format!("field {} is not length-delimited", self.number)) }
    }

    fn varint(&self) -> Result<u64, OnnxError> {
        if self.wire == 0 { Ok(self.value) } else { err(format!("field {} is not a varint", self.number)) }
    }

    fn fixed32(&self) -> Result<u32, OnnxError> {
        if self.wire == 5 { Ok(self.value as u32) } else { err(format!("field {} is not fixed32", self.number)) }
    }

    /// A repeated varint field, packed or not.
    fn repeated_varint(&self, push: &mut dyn FnMut(u64)) -> Result<(), OnnxError> {
        match self.wire {
            0 => push(self.value),
            2 => {
                let mut p = 0;
                while p < self.data.len() {
                    push(read_varint(self.data, &mut p)?);
                }
            }
            _ => return err(format!("field {} is not a varint list", self.number)),
        }
        Ok(())
    }

    /// A repeated fixed32 field, packed or not.
    fn repeated_fixed32(&self, push: &mut dyn FnMut(u32)) -> Result<(), OnnxError> {
        match self.wire {
            5 => push(self.value as u32),
            2 if self.data.len().is_multiple_of(4) => {
                self.data.chunks_exact(4).for_each(|c| push(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            }
            _ => return err(format!("field {} is not a fixed32 list", self.number)),
        }
        Ok(())
    }
}

struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Fields<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn next_field(&mut self) -> Result<Field<'a>, OnnxError> {
        let key = read_varint(self.buf, &mut self.pos)?;
        let (number, wire) = (key >> 3, (key & 7) as u8);
        let mut field = Field { number, wire, value: 0, data: &[] };
        match wire {
            0 => field.value = read_varint(self.buf, &mut self.pos)?,
            1 => {
                let end = self.pos.checked_add(8).filter(|&e| e <= self.buf.len());
                let end = end.ok_or_else(|| OnnxError("truncated fixed64".into()))?;
                field.value = u64::from_le_bytes(self.buf[self.pos..end].try_into().expect("8 bytes"));
                self.pos = end;
            }
            2 => {
                let len = read_varint(self.buf, &mut self.pos)? as usize;
                let end = self.pos.checked_add(len).filter(|&e| e <= self.buf.len());
                let end = end.ok_or_else(|| OnnxError("truncated length-delimited field".into()))?;
                field.data = &self.buf[self.pos..end];
                self.pos = end;
            }
            5 => {
                let end = self.pos.checked_add(4).filter(|&e| e <= self.buf.len());
                let end = end.ok_or_else(|| OnnxError("truncated fixed32".into()))?;
                field.value = u32::from_le_bytes(self.buf[self.pos..end].try_into().expect("4 bytes")) as u64;
                self.pos = end;
            }
            w => return err(format!("unsupported protobuf wire type {w}")),
        }
        Ok(field)
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<Field<'a>, OnnxError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.buf.len() {
            return None;
        }
        let f = self.next_field();
        if f.is_err() {
            self.pos = self.buf.len();
        }
        Some(f)
    }
}

fn read_varint(buf: &[u8], pos: &mut usize) -> Result<u64, OnnxError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let Some(&b) = buf.get(*pos) else {
            return err("truncated varint");
        };
        *pos += 1;
        v |= ((b & 0x7f) as u64) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    err("varint longer than 10 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_encoder_parses() {
        let g = parse(include_bytes!("../../models/efficientnet_lite0_s16.onnx")).unwrap();
        assert_eq!(g.inputs, vec!["image".to_string()]);
        assert_eq!(g.outputs, vec!["feat_s4", "feat_s8", "feat_s16"]);
        let convs: Vec<&Node> = g.nodes.iter().filter(|n| n.op == "Conv").collect();
        assert_eq!(convs.len(), 33);
        let stem = &g.constants[&convs[0].inputs[1]];
        assert_eq!(stem.dims, vec![32, 3, 3, 3]);
        assert_eq!(stem.floats.len(), 32 * 27);
        assert_eq!(convs[0].ints("strides"), Some(&[2i64, 2][..]));
    }

    #[test]
    fn truncated_and_garbage_files_are_errors_not_panics() {
        let bytes = include_bytes!("../../models/efficientnet_lite0_s16.onnx");
        for cut in [1usize, 7, 100, 5000, bytes.len() / 2] {
            let _ = parse(&bytes[..cut]);
        }
        assert!(parse(b"not a model at all").is_err());
        assert!(parse(&[0xff; 32]).is_err());
    }
}
