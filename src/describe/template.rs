//! Words for a verdict. The detector decides OK/NG and where; this module turns those findings into
//! text, and keeps any language model honest:
//! - [`template`]: the always-on describer: deterministic, instant, AnomalyGPT's answer sentence plus
//!   the numbers behind it (count, cells, area, score against the automatic threshold);
//! - [`prompt`]: the findings as a language model's system prompt, as AnomalyGPT's prompt learner feeds
//!   the localisation to its LLM;
//! - [`check`]: refuses a model answer that contradicts the verdict (says "no anomaly" on NG, names a
//!   grid cell where there is no region, or a defect class the labelled regions do not give), so the
//!   caller can fall back to the template;
//! - [`reply`]: the template answer to an operator's follow-up question (where, how large, how many,
//!   what kind, how sure, and whether it is the same place as the camera's previous NG), from the
//!   findings alone: the answer when there is no model, and the replacement for a refused one;
//! - [`Past`]: this frame against the camera's previous NG, as facts for the prompt and for [`reply`].

use serde::{Deserialize, Serialize};

use crate::types::findings::{self, Cell, Findings, Region};

/// A chat message in the OpenAI format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// The system prompt: the verdict's answer text and the findings behind it (and, when known, how they
/// compare with the camera's previous NG) as facts the model must not contradict.
pub fn prompt(f: &Findings, past: Option<&Past>) -> Message {
    // The verdict's one answer text (the same words `inspect` prints and MQTT publishes), then the
    // measurements behind it.
    let mut facts = vec![
        format!("Verdict: {}.", if f.anomalous { "defective (NG)" } else { "good (OK)" }),
        format!("The detector's answer: {}", f.answer_text()),
    ];
    if let Some(p) = &f.product {
        facts.insert(0, format!("Product: {p}."));
    }
    if f.anomalous {
        facts.push(format!("Defect regions: {}.", f.regions.len()));
        for (i, r) in f.regions.iter().enumerate() {
            let [x, y, w, h] = r.bbox;
            facts.push(format!(
                "Region {}: at the {} of the image, box x={x} y={y} width={w} height={h} pixels, {} of the image.{}",
                i + 1,
                r.cell.words(),
                findings::pct(r.area_pct),
                class_fact(r, &f.classes)
            ));
        }
    }
    if let Some(p) = past {
        facts.push(p.sentence());
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

/// What the labelled regions say of a region's class, as a sentence after its facts (empty when the
/// product has no labelled classes).
fn class_fact(r: &Region, classes: &[String]) -> String {
    match (&r.label, r.label_confidence) {
        (Some(l), c) => format!(
            " Its defect class is {l} (confidence {:.0}%, from the regions an operator labelled).",
            100.0 * c.unwrap_or(0.0)
        ),
        (None, _) if !classes.is_empty() => {
            format!(" It is like none of the defect classes labelled for this product ({}).", classes.join(", "))
        }
        (None, _) => String::new(),
    }
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
    #[error("the answer calls the defect a {0}, which the labelled regions do not say")]
    WrongClass(String),
    #[error("the answer puts the score on the wrong side of the threshold")]
    WrongScore,
}

impl Disagreement {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Disagreement::DeniesAnomaly => "denies_anomaly",
            Disagreement::ClaimsAnomaly => "claims_anomaly",
            Disagreement::WrongPlace(_) => "wrong_place",
            Disagreement::WrongClass(_) => "wrong_class",
            Disagreement::WrongScore => "wrong_score",
        }
    }
}

/// Phrases that say a part is fine: a contradiction on NG (unless negated: "not good enough to ship").
const DENIALS: [&str; 17] = [
    "no anomaly",
    "not a defect",
    "no anomalies",
    "no defect",
    "not defective",
    "is normal",
    "looks normal",
    "looks good",
    "nothing wrong",
    "good enough",
    "ready to ship",
    "can be shipped",
    "ok to ship",
    "fit to ship",
    "passes inspection",
    "meets the inspection",
    "is acceptable",
];
/// Phrases that say a part is defective: a contradiction on OK (unless negated). Guessing what the
/// defect "could be" presumes one: on a good part there is none to name.
const CLAIMS: [&str; 12] = [
    "there is an anomaly",
    "there are anomalies",
    "is defective",
    "has a defect",
    "the defect is",
    "the anomaly is",
    "anomaly detected",
    "defect detected",
    "defect is located",
    "anomaly is located",
    "the defect could be",
    "the anomaly could be",
];

/// True when `text` contains `phrase` somewhere not negated ("not", "n't", "never" just before it, or
/// "not" just after it: "the defect is not visible").
fn says(text: &str, phrase: &str) -> bool {
    text.match_indices(phrase).any(|(i, _)| {
        let before = &text[..i];
        let after = text[i + phrase.len()..].trim_start();
        let negated_before = ["not ", "n't ", "never ", "no longer "].iter().any(|n| before.ends_with(n));
        !(negated_before || after.starts_with("not ") || after.starts_with("no "))
    })
}

/// True when the question asks whether there is an anomaly, so that a leading "Yes"/"No" answers that.
/// The description's question does; "Is the part good enough to ship?" does not ("No" agrees with NG).
pub fn asks_presence(question: &str) -> bool {
    let q = question.to_lowercase();
    ["anomal", "defect", "wrong", "damage", "flaw"].iter().any(|w| q.contains(w))
        && ["is there", "are there", "any ", "do you see", "can you see", "does it have", "is it", "is this"]
            .iter()
            .any(|w| q.contains(w))
}

/// Checks a model's answer against the findings. `question` is what it answers: a leading "Yes"/"No"
/// is read as about the anomaly only when the question asks about one ([`asks_presence`]).
pub fn check(answer: &str, f: &Findings, question: &str) -> Result<(), Disagreement> {
    let a = answer.to_lowercase();
    let head = a.trim_start();
    let wrong_side = if f.score >= f.threshold { "below the" } else { "above the" };
    if a.match_indices(wrong_side).any(|(i, _)| a[i..].split_whitespace().take(4).any(|w| w.starts_with("threshold"))) {
        return Err(Disagreement::WrongScore);
    }
    let leading = |w: &str| {
        asks_presence(question)
            && head.strip_prefix(w).is_some_and(|r| r.is_empty() || r.starts_with([',', '.', ' ', '!']))
    };
    if f.anomalous {
        if DENIALS.iter().any(|d| says(&a, d)) || leading("no") {
            return Err(Disagreement::DeniesAnomaly);
        }
        for cell in cells_named(&a) {
            if !f.regions.iter().any(|r| r.cell == cell) {
                return Err(Disagreement::WrongPlace(cell.words()));
            }
        }
        if let Some(class) = wrong_class(&a, f) {
            return Err(Disagreement::WrongClass(class));
        }
    } else if CLAIMS.iter().any(|c| says(&a, c)) || leading("yes") {
        return Err(Disagreement::ClaimsAnomaly);
    }
    Ok(())
}

/// Defect names a model may use besides the product's own classes.
const COMMON_CLASSES: [&str; 12] = [
    "scratch",
    "dent",
    "crack",
    "stain",
    "hole",
    "contamination",
    "chip",
    "burr",
    "rust",
    "missing material",
    "deformation",
    "discoloration",
];

/// A defect class the (lower-case) answer claims without the evidence of the labelled regions: when a
/// region has a label, any other class named; when none has, one of the product's labelled classes
/// (the library says the regions are like none of them). A class named only to be negated ("not a
/// scratch") claims nothing; with no labelled classes at all, naming a kind is the model's general
/// knowledge, as before.
fn wrong_class(answer: &str, f: &Findings) -> Option<String> {
    let given: Vec<&str> = f.regions.iter().filter_map(|r| r.label.as_deref()).collect();
    let named = |c: &str| {
        answer.match_indices(c).any(|(i, _)| {
            let before = &answer[..i];
            let word_start = before.chars().last().is_none_or(|ch| !ch.is_alphanumeric());
            // The whole word, or its plural: "scratches" names a scratch, "stainless" no stain.
            let rest = &answer[i + c.len()..];
            let rest = rest.strip_prefix("es").or_else(|| rest.strip_prefix('s')).unwrap_or(rest);
            let word_end = rest.chars().next().is_none_or(|ch| !ch.is_alphanumeric());
            let negated = ["not a ", "not an ", "no ", "not ", "isn't a ", "rather than a ", "instead of a "]
                .iter()
                .any(|n| before.ends_with(n));
            word_start && word_end && !negated
        })
    };
    let related = |a: &str, b: &str| a.contains(b) || b.contains(a);
    let mut vocabulary: Vec<&str> = f.classes.iter().map(String::as_str).collect();
    if !given.is_empty() {
        vocabulary.extend(COMMON_CLASSES);
    }
    vocabulary.into_iter().filter(|c| named(c)).find(|c| !given.iter().any(|g| related(g, c))).map(str::to_string)
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
    let words: String = text.to_lowercase().chars().map(|c| if c.is_alphanumeric() { c } else { ' ' }).collect();
    let mut t = format!(" {words} ");
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

/// How this frame's defects compare with the previous NG of the same camera.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Past {
    /// No earlier NG on this camera since the daemon started.
    First { camera: String },
    Previous {
        camera: String,
        frame_id: String,
        /// This frame's capture time minus the previous one's.
        seconds_before: f64,
        previous: Vec<Region>,
        /// Best overlap (intersection over union) of a box of this frame with one of the previous.
        best_iou: f32,
        /// Grid cells both frames have a region in.
        shared_cells: Vec<Cell>,
    },
}

impl Past {
    /// Compares `now` (this frame's regions) with the previous NG's.
    pub fn compare(camera: &str, frame_id: &str, seconds_before: f64, previous: &[Region], now: &[Region]) -> Past {
        let mut best_iou = 0.0f32;
        let mut shared_cells = Vec::new();
        for a in now {
            for b in previous {
                best_iou = best_iou.max(iou(a.bbox, b.bbox));
                if a.cell == b.cell && !shared_cells.contains(&a.cell) {
                    shared_cells.push(a.cell);
                }
            }
        }
        Past::Previous {
            camera: camera.into(),
            frame_id: frame_id.into(),
            seconds_before,
            previous: previous.to_vec(),
            best_iou,
            shared_cells,
        }
    }

    /// True when a defect of this frame overlaps one of the previous NG's, or shares its grid cell.
    pub fn same_place(&self) -> bool {
        match self {
            Past::First { .. } => false,
            Past::Previous { best_iou, shared_cells, .. } => *best_iou >= 0.1 || !shared_cells.is_empty(),
        }
    }

    /// The comparison as one sentence.
    pub fn sentence(&self) -> String {
        match self {
            Past::First { camera } => {
                format!("This is the first NG part on camera {camera} since the inspection started.")
            }
            Past::Previous { camera, frame_id, seconds_before, previous, best_iou, shared_cells } => {
                let cells: Vec<Cell> = previous.iter().map(|r| r.cell).collect();
                let when = ago(*seconds_before);
                let head = format!(
                    "The previous NG part on camera {camera} was frame {frame_id}, {when} earlier, with {} at the {}.",
                    if previous.len() == 1 {
                        "one defect region".to_string()
                    } else {
                        format!("{} defect regions", previous.len())
                    },
                    list(&cells)
                );
                let verdict = if self.same_place() {
                    let how = if *best_iou >= 0.1 {
                        format!("the boxes overlap, intersection over union {best_iou:.2}")
                    } else {
                        format!("both are at the {}", list(shared_cells))
                    };
                    format!("This part's defect is at the same place ({how}).")
                } else {
                    "This part's defect is at a different place (no box overlaps and no grid cell is shared).".into()
                };
                format!("{head} {verdict}")
            }
        }
    }
}

fn ago(s: f64) -> String {
    match s {
        s if s < 1.0 => "less than a second".into(),
        s if s < 120.0 => format!("{s:.0} seconds"),
        s if s < 7200.0 => format!("{:.0} minutes", s / 60.0),
        s => format!("{:.1} hours", s / 3600.0),
    }
}

fn list(cells: &[Cell]) -> String {
    let mut words: Vec<&str> = cells.iter().map(|c| c.words()).collect();
    words.dedup();
    match words.as_slice() {
        [] => "no cell".into(),
        [one] => one.to_string(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// Intersection over union of two `[x, y, w, h]` boxes.
pub fn iou(a: [u32; 4], b: [u32; 4]) -> f32 {
    let (ax1, ay1, bx1, by1) = (a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]);
    let iw = ax1.min(bx1).saturating_sub(a[0].max(b[0])) as f32;
    let ih = ay1.min(by1).saturating_sub(a[1].max(b[1])) as f32;
    let inter = iw * ih;
    let union = (a[2] * a[3] + b[2] * b[3]) as f32 - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}

/// What an operator's question is about, read from its words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    Past,
    /// Whether the part may go on: ship, accept, pass, reject.
    Disposition,
    Size,
    Count,
    Place,
    Kind,
    Confidence,
    Other,
}

pub fn topic(question: &str) -> Topic {
    let q = format!(" {} ", question.to_lowercase().replace(['?', ',', '.', '!'], " "));
    let any = |words: &[&str]| words.iter().any(|w| q.contains(w));
    if any(&[
        " same place",
        " same spot",
        " same location",
        " same area",
        " previous",
        " last ng",
        " last one",
        " before",
        " again",
        " last time",
        " earlier",
    ]) {
        Topic::Past
    } else if any(&[
        " ship",
        " good enough",
        " accept",
        " pass ",
        " reject",
        " scrap",
        " ok to",
        " okay to",
        " release",
        " use it",
    ]) {
        Topic::Disposition
    } else if any(&[
        " how large",
        " how big",
        " size",
        " area",
        " how much",
        " dimension",
        " pixels",
        " wide",
        " long ",
    ]) {
        Topic::Size
    } else if any(&[" how many", " number of", " count"]) {
        Topic::Count
    } else if any(&[" where", " location", " which part", " position", " exactly", " place"]) {
        Topic::Place
    } else if any(&[
        " what kind",
        " what type",
        " which type",
        " cause",
        " what is it",
        " what could",
        " defect type",
        " scratch",
        " dent",
        " crack",
    ]) {
        Topic::Kind
    } else if any(&[" sure", " confiden", " certain", " score", " threshold", " false alarm", " reliable"]) {
        Topic::Confidence
    } else {
        Topic::Other
    }
}

/// The template answer to a follow-up question, from the findings (and the comparison with the
/// camera's previous NG, when known). Deterministic and never contradicts the verdict.
pub fn reply(question: &str, f: &Findings, past: Option<&Past>) -> String {
    let regions = &f.regions;
    let each = |what: &dyn Fn(usize, &Region) -> String| -> String {
        regions.iter().enumerate().map(|(i, r)| what(i, r)).collect::<Vec<_>>().join(" ")
    };
    let name = |i: usize, r: &Region| {
        if regions.len() == 1 {
            format!("The region at the {}", r.cell.words())
        } else {
            format!("Region {} (at the {})", i + 1, r.cell.words())
        }
    };
    let versus = format!(
        "the anomaly score is {:.2}, {} the automatic threshold of {:.2}",
        f.score,
        if f.score >= f.threshold { "above" } else { "below" },
        f.threshold
    );
    if !f.anomalous {
        return match topic(question) {
            Topic::Confidence => f.answer_text(),
            Topic::Disposition => format!("Yes, as far as this inspection goes: no anomaly was found, {versus}."),
            _ => format!(
                "{} There is no defect region to describe. {}",
                findings::answer(false, regions),
                f.answer_text().split_once(". ").map(|(_, s)| s).unwrap_or_default()
            ),
        };
    }
    match topic(question) {
        Topic::Disposition => {
            let mut cells: Vec<Cell> = regions.iter().map(|r| r.cell).collect();
            cells.sort();
            cells.dedup();
            let what = match regions.len() {
                0 => "an anomalous score".to_string(),
                1 => format!("one defect region at the {}", list(&cells)),
                n => format!("{n} defect regions at the {}", list(&cells)),
            };
            format!(
                "No. The inspection flagged this part as defective (NG): {what}; {versus}. Hold it until someone \
                 has looked at it."
            )
        }
        Topic::Past => match past {
            Some(p) => p.sentence(),
            None => "No earlier NG part of this camera is known to compare with.".into(),
        },
        Topic::Size => each(&|i, r| {
            let [_, _, w, h] = r.bbox;
            format!("{} is {w} x {h} pixels, {} of the image.", name(i, r), findings::pct(r.area_pct))
        }),
        Topic::Count => format!(
            "{} {}",
            findings::answer(true, regions),
            match regions.len() {
                1 => "There is one defect region.".to_string(),
                n => format!("There are {n} defect regions."),
            }
        ),
        Topic::Place => each(&|i, r| {
            let [x, y, w, h] = r.bbox;
            format!("{} spans x {x} to {} and y {y} to {} pixels.", name(i, r), x + w, y + h)
        }),
        Topic::Kind if regions.iter().any(|r| r.label.is_some()) => each(&|i, r| match &r.label {
            Some(l) => format!(
                "{} looks like a {l}: its shape and colour are nearest to the regions an operator labelled {l} \
                 ({:.0}% of the nearest examples' weight).",
                name(i, r),
                100.0 * r.label_confidence.unwrap_or(0.0)
            ),
            None => format!("{} is like none of the labelled defect classes.", name(i, r)),
        }),
        Topic::Kind => format!(
            "The detector measures how far each part of the image is from the normal reference; it does not \
             name defect types{}. {} Check it for a scratch, dent, crack, contamination or missing material.",
            if f.classes.is_empty() {
                String::new()
            } else {
                format!(
                    " beyond the classes labelled for this product ({}), which this one is like none of",
                    f.classes.join(", ")
                )
            },
            findings::answer(true, regions)
        ),
        Topic::Confidence => {
            let margin = if f.threshold > 0.0 { 100.0 * (f.score - f.threshold) / f.threshold } else { 0.0 };
            format!(
                "The anomaly score is {:.2}, {:.0}% above the automatic threshold of {:.2}, which was set from \
                 the normal references and simulated defects.",
                f.score, margin, f.threshold
            )
        }
        Topic::Other => f.answer_text(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ng() -> Findings {
        Findings {
            anomalous: true,
            score: 42.56,
            threshold: 40.54,
            regions: vec![Region {
                bbox: [212, 160, 61, 52],
                area_pct: 2.93,
                cell: Cell::BottomRight,
                peak: 61.2,
                label: None,
                label_confidence: None,
            }],
            product: Some("a machined steel plate".into()),
            classes: Vec::new(),
        }
    }

    /// The NG part with its region labelled from the product's classes `stain` and `scratch`.
    fn labelled() -> Findings {
        let mut f = ng();
        f.regions[0].label = Some("stain".into());
        f.regions[0].label_confidence = Some(0.9);
        f.classes = vec!["stain".into(), "scratch".into()];
        f
    }

    #[test]
    fn class_claims_are_held_to_the_labelled_regions() {
        let q = "What kind of defect is it?";
        let f = labelled();
        assert!(check("It is a stain at the bottom right.", &f, q).is_ok());
        assert!(check("Stains like this come from coolant; it is not a scratch.", &f, q).is_ok());
        assert!(check("The part is stainless steel with a stain.", &f, q).is_ok(), "stainless is no class word");
        assert_eq!(check("It is a scratch.", &f, q), Err(Disagreement::WrongClass("scratch".into())));
        assert_eq!(check("Probably a dent from handling.", &f, q), Err(Disagreement::WrongClass("dent".into())));
        assert_eq!(check("Two scratches.", &f, q), Err(Disagreement::WrongClass("scratch".into())));
        // A region like none of the classes: naming one of them is a claim without evidence; a common
        // defect name is the model's general knowledge.
        let mut none = labelled();
        none.regions[0].label = None;
        assert_eq!(check("It is a scratch.", &none, q), Err(Disagreement::WrongClass("scratch".into())));
        assert!(check("It could be a dent.", &none, q).is_ok());
        // Without labelled classes nothing changes.
        assert!(check("It could be a scratch or a dent.", &ng(), q).is_ok());
        // The prompt gives the model the class, and the template answers from it.
        let p = prompt(&labelled(), None).content;
        assert!(p.contains("Its defect class is stain (confidence 90%"), "{p}");
        assert!(prompt(&none, None).content.contains("like none of the defect classes labelled"));
        let r = reply(q, &labelled(), None);
        assert!(r.contains("looks like a stain") && r.contains("90%"), "{r}");
        assert!(check(&r, &labelled(), q).is_ok(), "the template's own answer passes: {r}");
    }

    #[test]
    fn the_template_states_place_size_and_score_against_threshold() {
        assert_eq!(
            ng().answer_text(),
            "Yes, there is an anomaly in the image, at the bottom right of the image. It covers 2.9% of the image, \
             the largest 61 x 52 pixels. The anomaly score is 42.56, above the automatic threshold of 40.54."
        );
        let ok = Findings { anomalous: false, score: 27.1, regions: vec![], ..ng() };
        assert_eq!(
            ok.answer_text(),
            "No, there is no anomaly in the image. The anomaly score is 27.10, below the automatic threshold of 40.54."
        );
    }

    #[test]
    fn the_prompt_carries_every_finding() {
        let p = prompt(&ng(), None).content;
        assert!(p.contains(&ng().answer_text()), "the answer text is missing from {p}");
        for fact in ["a machined steel plate", "defective (NG)", "42.56", "40.54", "bottom right", "width=61", "2.9%"] {
            assert!(p.contains(fact), "{fact} missing from {p}");
        }
    }

    #[test]
    fn contradicting_answers_are_refused() {
        let f = ng();
        let q = "Is there any anomaly in the image?";
        assert_eq!(check("No, there is no anomaly in the image.", &f, q), Err(Disagreement::DeniesAnomaly));
        assert_eq!(check("No.", &f, q), Err(Disagreement::DeniesAnomaly));
        assert_eq!(check("The part looks good to me.", &f, q), Err(Disagreement::DeniesAnomaly));
        assert_eq!(check("There is a scratch at the top left.", &f, q), Err(Disagreement::WrongPlace("top left")));
        assert_eq!(check("A dent in the upper-left corner.", &f, q), Err(Disagreement::WrongPlace("top left")));
        assert!(check("Yes: a bright stain at the bottom right, about 3% of the part.", &f, q).is_ok());
        assert!(check("It is probably contamination; clean the fixture.", &f, q).is_ok());
        // "No" to a question that is not about the anomaly's presence agrees with NG.
        let ship = "Is the part good enough to ship?";
        assert!(check("No, it should not be shipped: it has a defect.", &f, ship).is_ok());
        assert!(check("The part is not good enough to ship.", &f, ship).is_ok());
        assert_eq!(check("The part is good enough to ship.", &f, ship), Err(Disagreement::DeniesAnomaly));
        assert_eq!(check("Yes, it meets the inspection criteria.", &f, ship), Err(Disagreement::DeniesAnomaly));
        assert!(check("Nothing suggests it passes; it does not meet the spec.", &f, ship).is_ok());
        assert_eq!(
            check("No. The score 41.07 is below the automatic threshold of 40.54.", &f, ship),
            Err(Disagreement::WrongScore)
        );
        assert!(check("The score is above the automatic threshold.", &f, ship).is_ok());
        let ok = Findings { anomalous: false, regions: vec![], ..f };
        assert_eq!(check("Yes, there is an anomaly at the top.", &ok, q), Err(Disagreement::ClaimsAnomaly));
        assert_eq!(check("The anomaly detected is a small hole.", &ok, q), Err(Disagreement::ClaimsAnomaly));
        assert_eq!(check("The defect is likely in the part.", &ok, "Where is it?"), Err(Disagreement::ClaimsAnomaly));
        assert!(check("No, the part is fine.", &ok, q).is_ok());
        assert!(check("The defect is not visible in the image: there is none.", &ok, "Where is it?").is_ok());
        // Measured with Qwen2.5-Coder-1.5B on the demo's good part (docs/llm-quality/).
        let kind = "What kind of defect could it be?";
        assert_eq!(
            check("The defect could be a missing bolt hole or a misaligned bolt hole.", &ok, kind),
            Err(Disagreement::ClaimsAnomaly)
        );
        assert!(check("The defect could be a scratch or a dent.", &ng(), kind).is_ok());
        assert!(check("Yes, it can be shipped.", &ok, ship).is_ok());
    }

    #[test]
    fn cells_are_read_as_whole_phrases() {
        assert_eq!(cells_named("at the top left and the bottom"), [Cell::TopLeft, Cell::Bottom]);
        assert_eq!(cells_named("in the centre"), [Cell::Center]);
        assert_eq!(cells_named("Region 1 (at the top left) and (bottom-right)"), [Cell::TopLeft, Cell::BottomRight]);
        assert!(cells_named("stop the line; topology").is_empty());
    }

    #[test]
    fn follow_up_questions_get_answers_from_the_findings() {
        let f = ng();
        assert_eq!(topic("How large is it?"), Topic::Size);
        assert_eq!(topic("Where exactly?"), Topic::Place);
        assert_eq!(topic("What kind of defect could it be?"), Topic::Kind);
        assert_eq!(topic("Is this the same place as the last NG on this camera?"), Topic::Past);
        assert_eq!(
            reply("How large is it?", &f, None),
            "The region at the bottom right is 61 x 52 pixels, 2.9% of the image."
        );
        assert_eq!(
            reply("Where exactly?", &f, None),
            "The region at the bottom right spans x 212 to 273 and y 160 to 212 pixels."
        );
        for q in
            ["How large is it?", "Where exactly?", "What kind of defect could it be?", "How sure are you?", "hello"]
        {
            assert!(check(&reply(q, &f, None), &f, q).is_ok(), "{q}: {}", reply(q, &f, None));
        }
        let ok = Findings { anomalous: false, regions: vec![], ..f };
        assert!(check(&reply("Where is the defect?", &ok, None), &ok, "Where is the defect?").is_ok());
        assert!(reply("Can it be shipped?", &ok, None).starts_with("Yes, as far as this inspection goes"));
    }

    #[test]
    fn the_previous_ng_is_compared_by_box_overlap_and_cell() {
        let now = ng().regions;
        let near = Region { bbox: [220, 170, 50, 40], ..now[0].clone() };
        let far = Region { bbox: [10, 10, 20, 20], cell: Cell::TopLeft, ..now[0].clone() };
        let same = Past::compare("cam1", "cam1-1-7", 12.0, std::slice::from_ref(&near), &now);
        assert!(same.same_place());
        let s = same.sentence();
        assert!(s.contains("frame cam1-1-7") && s.contains("12 seconds") && s.contains("same place"), "{s}");
        let other = Past::compare("cam1", "cam1-1-7", 300.0, &[far], &now);
        assert!(!other.same_place());
        assert!(other.sentence().contains("different place") && other.sentence().contains("5 minutes"));
        assert_eq!(reply("Is this the same place as the last NG on this camera?", &ng(), Some(&same)), s);
        assert!((iou([0, 0, 10, 10], [5, 0, 10, 10]) - 1.0 / 3.0).abs() < 1e-6);
        assert_eq!(iou([0, 0, 10, 10], [20, 20, 5, 5]), 0.0);
    }
}
