//! Words for a verdict. The detector decides OK/NG and where; this module turns those findings into
//! text, and keeps any language model honest:
//! - [`template`]: the always-on describer: deterministic, instant, AnomalyGPT's answer sentence plus
//!   the numbers behind it (count, cells, area, score against the automatic threshold);
//! - [`prompt`]: the findings as a language model's system prompt, as AnomalyGPT's prompt learner feeds
//!   the localisation to its LLM;
//! - [`check`]: refuses a model answer that contradicts the verdict (says "no anomaly" on NG, or names a
//!   grid cell where there is no region), so the caller can fall back to the template.

use serde::{Deserialize, Serialize};

use crate::regions::{self, Cell, Region};

/// What the detector found on one frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Findings {
    pub anomalous: bool,
    pub score: f32,
    pub threshold: f32,
    pub regions: Vec<Region>,
    /// The product, in the operator's words (camera config), e.g. "a machined steel bracket".
    pub product: Option<String>,
}

/// The template describer: AnomalyGPT's answer, then one sentence of evidence.
pub fn template(f: &Findings) -> String {
    let answer = regions::answer(f.anomalous, &f.regions);
    let versus = if f.score >= f.threshold { "above" } else { "below" };
    let score = format!("The anomaly score is {:.2}, {versus} the automatic threshold of {:.2}.", f.score, f.threshold);
    if !f.anomalous || f.regions.is_empty() {
        return format!("{answer} {score}");
    }
    let total: f32 = f.regions.iter().map(|r| r.area_pct).sum();
    let largest = f.regions.iter().max_by(|a, b| a.area_pct.total_cmp(&b.area_pct)).map(|r| r.bbox);
    let size = largest.map(|[_, _, w, h]| format!(", the largest {w} x {h} pixels")).unwrap_or_default();
    format!("{answer} It covers {} of the image{size}. {score}", pct(total))
}

fn pct(v: f32) -> String {
    if v < 0.1 { "less than 0.1%".into() } else { format!("{v:.1}%") }
}

/// A chat message in the OpenAI format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// The system prompt: the findings as facts the model must not contradict.
pub fn prompt(f: &Findings) -> Message {
    let mut facts = vec![format!(
        "Verdict: {}. Anomaly score {:.2}; the automatic threshold is {:.2}.",
        if f.anomalous { "defective (NG)" } else { "good (OK)" },
        f.score,
        f.threshold
    )];
    if let Some(p) = &f.product {
        facts.insert(0, format!("Product: {p}."));
    }
    if f.anomalous {
        facts.push(format!("Defect regions: {}.", f.regions.len()));
        for (i, r) in f.regions.iter().enumerate() {
            let [x, y, w, h] = r.bbox;
            facts.push(format!(
                "Region {}: at the {} of the image, box x={x} y={y} width={w} height={h} pixels, {} of the image.",
                i + 1,
                r.cell.words(),
                pct(r.area_pct)
            ));
        }
    }
    let content = format!(
        "You are the assistant of an industrial visual inspection station. An anomaly detector has inspected one \
         part; its findings below are measurements and are correct. Answer the operator's questions about this \
         part briefly, using only these findings and general knowledge of manufacturing defects. Never contradict \
         the verdict or invent defect locations.\n{}",
        facts.join("\n")
    );
    Message { role: "system".into(), content }
}

/// Why a model's answer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Disagreement {
    #[error("the answer denies the anomaly the detector found")]
    DeniesAnomaly,
    #[error("the answer claims an anomaly on a part the detector found good")]
    ClaimsAnomaly,
    #[error("the answer puts a defect at the {0}, where the detector found none")]
    WrongPlace(&'static str),
}

const DENIALS: [&str; 8] = [
    "no anomaly",
    "no anomalies",
    "no defect",
    "not defective",
    "is normal",
    "looks normal",
    "looks good",
    "nothing wrong",
];
const CLAIMS: [&str; 4] = ["there is an anomaly", "there are anomalies", "is defective", "has a defect"];

/// Checks a model's answer against the findings.
pub fn check(answer: &str, f: &Findings) -> Result<(), Disagreement> {
    let a = answer.to_lowercase();
    if f.anomalous {
        if DENIALS.iter().any(|d| a.contains(d)) || a.trim_start().starts_with("no,") || a.trim_start() == "no" {
            return Err(Disagreement::DeniesAnomaly);
        }
        for cell in cells_named(&a) {
            if !f.regions.iter().any(|r| r.cell == cell) {
                return Err(Disagreement::WrongPlace(cell.words()));
            }
        }
    } else if CLAIMS.iter().any(|c| a.contains(c)) || a.trim_start().starts_with("yes,") {
        return Err(Disagreement::ClaimsAnomaly);
    }
    Ok(())
}

/// The 3 x 3 grid cells a text names ("top left" is one cell, not "top" and "left").
pub fn cells_named(text: &str) -> Vec<Cell> {
    const ALL: [Cell; 9] = [
        Cell::TopLeft,
        Cell::TopRight,
        Cell::BottomLeft,
        Cell::BottomRight,
        Cell::Top,
        Cell::Bottom,
        Cell::Left,
        Cell::Right,
        Cell::Center,
    ];
    let mut t = format!(" {} ", text.to_lowercase().replace(['-', ',', '.', ';', ':', '!', '?'], " "));
    t = t.replace("upper", "top").replace("lower", "bottom").replace("centre", "center").replace("middle", "center");
    let mut found = Vec::new();
    for cell in ALL {
        let needle = format!(" {} ", cell.words());
        if t.contains(&needle) {
            found.push(cell);
            t = t.replace(&needle, " ");
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ng() -> Findings {
        Findings {
            anomalous: true,
            score: 42.56,
            threshold: 40.54,
            regions: vec![Region { bbox: [212, 160, 61, 52], area_pct: 2.93, cell: Cell::BottomRight, peak: 61.2 }],
            product: Some("a machined steel plate".into()),
        }
    }

    #[test]
    fn the_template_states_place_size_and_score_against_threshold() {
        assert_eq!(
            template(&ng()),
            "Yes, there is an anomaly in the image, at the bottom right of the image. It covers 2.9% of the image, \
             the largest 61 x 52 pixels. The anomaly score is 42.56, above the automatic threshold of 40.54."
        );
        let ok = Findings { anomalous: false, score: 27.1, regions: vec![], ..ng() };
        assert_eq!(
            template(&ok),
            "No, there is no anomaly in the image. The anomaly score is 27.10, below the automatic threshold of 40.54."
        );
    }

    #[test]
    fn the_prompt_carries_every_finding() {
        let p = prompt(&ng()).content;
        for fact in ["a machined steel plate", "defective (NG)", "42.56", "40.54", "bottom right", "width=61", "2.9%"] {
            assert!(p.contains(fact), "{fact} missing from {p}");
        }
    }

    #[test]
    fn contradicting_answers_are_refused() {
        let f = ng();
        assert_eq!(check("No, there is no anomaly in the image.", &f), Err(Disagreement::DeniesAnomaly));
        assert_eq!(check("The part looks good to me.", &f), Err(Disagreement::DeniesAnomaly));
        assert_eq!(check("There is a scratch at the top left.", &f), Err(Disagreement::WrongPlace("top left")));
        assert_eq!(check("A dent in the upper-left corner.", &f), Err(Disagreement::WrongPlace("top left")));
        assert!(check("Yes: a bright stain at the bottom right, about 3% of the part.", &f).is_ok());
        assert!(check("It is probably contamination; clean the fixture.", &f).is_ok());
        let ok = Findings { anomalous: false, regions: vec![], ..f };
        assert_eq!(check("Yes, there is an anomaly at the top.", &ok), Err(Disagreement::ClaimsAnomaly));
        assert!(check("No, the part is fine.", &ok).is_ok());
    }

    #[test]
    fn cells_are_read_as_whole_phrases() {
        assert_eq!(cells_named("at the top left and the bottom"), [Cell::TopLeft, Cell::Bottom]);
        assert_eq!(cells_named("in the centre"), [Cell::Center]);
        assert!(cells_named("stop the line; topology").is_empty());
    }
}
