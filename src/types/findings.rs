//! What an inspection found, in the terms every later stage uses: connected regions placed in a 3 x 3
//! grid, and the verdict's answer sentence in AnomalyGPT's format.

use serde::{Deserialize, Serialize};

/// One cell of the 3 x 3 grid over the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cell {
    TopLeft,
    Top,
    TopRight,
    Left,
    Center,
    Right,
    BottomLeft,
    Bottom,
    BottomRight,
}

impl Cell {
    /// The cell holding point `(x, y)` of a `w x h` image.
    pub fn of(x: f32, y: f32, w: f32, h: f32) -> Cell {
        let third = |v: f32, n: f32| ((v / n * 3.0).floor() as i32).clamp(0, 2);
        const CELLS: [Cell; 9] = [
            Cell::TopLeft,
            Cell::Top,
            Cell::TopRight,
            Cell::Left,
            Cell::Center,
            Cell::Right,
            Cell::BottomLeft,
            Cell::Bottom,
            Cell::BottomRight,
        ];
        CELLS[(third(y, h) * 3 + third(x, w)) as usize]
    }

    pub fn words(self) -> &'static str {
        match self {
            Cell::TopLeft => "top left",
            Cell::Top => "top",
            Cell::TopRight => "top right",
            Cell::Left => "left",
            Cell::Center => "center",
            Cell::Right => "right",
            Cell::BottomLeft => "bottom left",
            Cell::Bottom => "bottom",
            Cell::BottomRight => "bottom right",
        }
    }
}

/// A connected anomalous region, in the coordinates of the original image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Region {
    /// Bounding box `[x, y, width, height]` in original-image pixels.
    pub bbox: [u32; 4],
    /// Share of the image area, in percent.
    pub area_pct: f32,
    /// Grid cell of the region's peak.
    pub cell: Cell,
    /// Highest anomaly score inside the region.
    pub peak: f32,
    /// The defect class the product's labelled regions give it (`crate::detect::classes`); absent when
    /// the product has none, or the region is like none of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The share of its nearest labelled regions' weight that votes for `label` (0 to 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_confidence: Option<f32>,
}

/// What the detector found on one frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Findings {
    pub anomalous: bool,
    pub score: f32,
    pub threshold: f32,
    pub regions: Vec<Region>,
    /// The product, in the operator's words (camera config), e.g. "a machined steel bracket".
    pub product: Option<String>,
    /// The defect classes the product's labelled regions know (for the answer check: a class the
    /// regions were not given is a claim without evidence).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<String>,
}

/// The verdict in AnomalyGPT's answer format.
pub fn answer(anomalous: bool, regions: &[Region]) -> String {
    if !anomalous {
        return "No, there is no anomaly in the image.".into();
    }
    let mut cells: Vec<Cell> = regions.iter().map(|r| r.cell).collect();
    cells.sort();
    cells.dedup();
    let place = |cells: &[Cell]| -> String {
        let words: Vec<&str> = cells.iter().map(|c| c.words()).collect();
        match words.as_slice() {
            [] => String::new(),
            [one] => one.to_string(),
            [init @ .., last] => format!("{} and {last}", init.join(", ")),
        }
    };
    match regions.len() {
        0 => "Yes, there is an anomaly in the image.".into(),
        1 => format!("Yes, there is an anomaly in the image, at the {} of the image.", place(&cells)),
        n => format!("Yes, there are {n} anomalies in the image, they are at the {} of the image.", place(&cells)),
    }
}

impl Findings {
    /// The verdict's one answer text, used by `anomalyd inspect`, the MQTT verdict and the describer's
    /// fallback: AnomalyGPT's answer sentence, then one sentence of evidence (area, largest region, and
    /// the score against the automatic threshold).
    pub fn answer_text(&self) -> String {
        let answer = answer(self.anomalous, &self.regions);
        let versus = if self.score >= self.threshold { "above" } else { "below" };
        let score = format!(
            "The anomaly score is {:.2}, {versus} the automatic threshold of {:.2}.",
            self.score, self.threshold
        );
        if !self.anomalous || self.regions.is_empty() {
            return format!("{answer} {score}");
        }
        let total: f32 = self.regions.iter().map(|r| r.area_pct).sum();
        let largest = self.regions.iter().max_by(|a, b| a.area_pct.total_cmp(&b.area_pct)).map(|r| r.bbox);
        let size = largest.map(|[_, _, w, h]| format!(", the largest {w} x {h} pixels")).unwrap_or_default();
        format!("{answer} It covers {} of the image{size}. {score}", pct(total))
    }
}

/// A share of the image in words: `3.2%`, or `less than 0.1%`.
pub fn pct(v: f32) -> String {
    if v < 0.1 { "less than 0.1%".into() } else { format!("{v:.1}%") }
}
