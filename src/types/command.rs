//! What a PLC or an operator may ask of the daemon (over MQTT or HTTP), and the bounds every request is
//! checked against at the edge, before anything acts on it: a payload of at most [`MAX_PAYLOAD`]
//! bytes, a part id of at most [`MAX_PART_ID`] bytes, a question of at most [`MAX_QUESTION`] bytes, and
//! no control characters where a value ends up in a topic, a log line or a verdict. A request that
//! breaks a bound is refused with a [`Refusal`] that says which, and is never acted on in part.

use serde::Deserialize;

/// Largest command or chat payload taken from the broker or an HTTP body.
pub const MAX_PAYLOAD: usize = 64 << 10;
/// Longest part id: barcodes and PLC ids fit many times over, and it is copied into every verdict.
pub const MAX_PART_ID: usize = 128;
/// Longest question about a frame.
pub const MAX_QUESTION: usize = 2 << 10;
/// Longest camera name, frame id or request id.
pub const MAX_ID: usize = 128;

/// A command received on the command topic (or its HTTP twin).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Command {
    /// Inspect the camera's next frame under this part id (and with the recipe of `product`, on a
    /// mixed-model line; unset: the recipe in use).
    Trigger {
        camera: String,
        part_id: String,
        #[serde(default)]
        product: Option<String>,
    },
    /// Inspect the camera's frames with the recipe of `product` from now on (frames already captured
    /// keep theirs). Answered on the command response topic.
    Recipe {
        camera: String,
        product: String,
        #[serde(default)]
        request_id: Option<String>,
    },
    /// Reload the configuration and enrolments (as SIGHUP does).
    Reload,
    /// A question about a frame; the answer goes to the chat response topic with the same request id.
    Chat {
        frame_id: String,
        question: String,
        #[serde(default)]
        request_id: Option<String>,
    },
}

impl Command {
    /// The command's name as it is written in the payload.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Trigger { .. } => "trigger",
            Command::Recipe { .. } => "recipe",
            Command::Reload => "reload",
            Command::Chat { .. } => "chat",
        }
    }

    /// Checks every field against its bound.
    pub fn check(&self) -> Result<(), Refusal> {
        match self {
            Command::Trigger { camera, part_id, product } => {
                field("camera", camera, MAX_ID)?;
                check_part_id(part_id)?;
                product.as_deref().map_or(Ok(()), check_product)
            }
            Command::Recipe { camera, product, request_id } => {
                field("camera", camera, MAX_ID)?;
                check_product(product)?;
                request_id.as_deref().map_or(Ok(()), |r| field("request_id", r, MAX_ID))
            }
            Command::Reload => Ok(()),
            Command::Chat { frame_id, question, request_id } => {
                field("frame_id", frame_id, MAX_ID)?;
                check_question(question)?;
                request_id.as_deref().map_or(Ok(()), |r| field("request_id", r, MAX_ID))
            }
        }
    }
}

/// A command as it arrived: the command, and the request id and token that may come with any command.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub command: Command,
    /// Echoed on the response topic, so a PLC can match the reply to its request.
    pub request_id: Option<String>,
    /// The command token (`mqtt.command_token_file`), when the command carries one.
    pub token: Option<String>,
}

/// Why a request was refused. [`Refusal::kind`] is the metric label.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error("payload of {0} bytes is over the limit of {MAX_PAYLOAD} bytes")]
    TooLarge(usize),
    #[error("{0}")]
    Invalid(String),
    #[error("{field} {why}")]
    Field { field: &'static str, why: String },
    #[error("missing or wrong command token")]
    Unauthorized,
    #[error("{0}")]
    RateLimited(String),
    /// A camera or product that is not configured.
    #[error("{0}")]
    Unknown(String),
}

impl Refusal {
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::TooLarge(_) => "too_large",
            Refusal::Invalid(_) => "invalid",
            Refusal::Field { .. } => "bad_field",
            Refusal::Unauthorized => "unauthorized",
            Refusal::RateLimited(_) => "rate_limited",
            Refusal::Unknown(_) => "unknown",
        }
    }
}

/// Parses and checks a command payload: `{"cmd":"trigger","camera":"c1","part_id":"P-1"}`, with an
/// optional `"request_id"` and `"token"` on any command.
pub fn parse_command(payload: &[u8]) -> Result<Envelope, Refusal> {
    let (mut obj, request_id, token) = envelope(payload)?;
    if let Some(id) = &request_id {
        obj.insert("request_id".into(), serde_json::Value::String(id.clone()));
    }
    let mut command: Command = match serde_json::from_value(serde_json::Value::Object(obj.clone())) {
        Ok(c) => c,
        // Only chat and recipe take a request id as a field: parse the others without it.
        Err(_) if request_id.is_some() => {
            obj.remove("request_id");
            serde_json::from_value(serde_json::Value::Object(obj)).map_err(|e| Refusal::Invalid(e.to_string()))?
        }
        Err(e) => return Err(Refusal::Invalid(e.to_string())),
    };
    if let Command::Chat { request_id: r, .. } | Command::Recipe { request_id: r, .. } = &mut command {
        r.clone_from(&request_id);
    }
    command.check()?;
    Ok(Envelope { command, request_id, token })
}

/// Parses and checks a question on the chat request topic: `{"frame_id":"…","question":"…","request_id":"…"}`.
pub fn parse_chat(payload: &[u8]) -> Result<Envelope, Refusal> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Ask {
        frame_id: String,
        question: String,
    }
    let (obj, request_id, token) = envelope(payload)?;
    let ask: Ask =
        serde_json::from_value(serde_json::Value::Object(obj)).map_err(|e| Refusal::Invalid(e.to_string()))?;
    let command = Command::Chat { frame_id: ask.frame_id, question: ask.question, request_id: request_id.clone() };
    command.check()?;
    Ok(Envelope { command, request_id, token })
}

/// The payload as a JSON object, with `request_id` and `token` taken out and checked.
type Parts = (serde_json::Map<String, serde_json::Value>, Option<String>, Option<String>);

fn envelope(payload: &[u8]) -> Result<Parts, Refusal> {
    if payload.len() > MAX_PAYLOAD {
        return Err(Refusal::TooLarge(payload.len()));
    }
    let value: serde_json::Value = serde_json::from_slice(payload).map_err(|e| Refusal::Invalid(e.to_string()))?;
    let serde_json::Value::Object(mut obj) = value else {
        return Err(Refusal::Invalid("expected a JSON object".into()));
    };
    let mut text = |key: &'static str| match obj.remove(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => field(key, &s, MAX_ID).map(|()| Some(s)),
        Some(_) => Err(Refusal::Field { field: key, why: "must be a string".into() }),
    };
    let request_id = text("request_id")?;
    let token = text("token")?;
    Ok((obj, request_id, token))
}

/// The `request_id` of a refused payload, when it has a usable one: a payload over [`MAX_PAYLOAD`] is
/// not parsed again for it.
pub fn request_id_of(payload: &[u8]) -> Option<String> {
    if payload.len() > MAX_PAYLOAD {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let id = v.get("request_id")?.as_str()?;
    field("request_id", id, MAX_ID).ok().map(|()| id.to_string())
}

/// The answer on the command response topic: `{"request_id":…,"cmd":…,"accepted":…,"error":…,"reason":…}`
/// (`refusal` None: accepted).
pub fn reply(request_id: Option<&str>, cmd: Option<&str>, refusal: Option<&Refusal>) -> serde_json::Value {
    serde_json::json!({
        "request_id": request_id,
        "cmd": cmd,
        "accepted": refusal.is_none(),
        "error": refusal.map(|r| r.to_string()),
        "reason": refusal.map(Refusal::kind),
    })
}

/// A part id: 1 to [`MAX_PART_ID`] bytes, no control characters.
pub fn check_part_id(part_id: &str) -> Result<(), Refusal> {
    field("part_id", part_id, MAX_PART_ID)
}

/// A product (recipe) name: 1 to 64 letters, digits, `-` or `_`, as `[[camera.recipe]]` names are.
pub fn check_product(product: &str) -> Result<(), Refusal> {
    let ok = !product.is_empty()
        && product.len() <= 64
        && product.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        return Ok(());
    }
    let shown: String = product.chars().take(40).flat_map(char::escape_default).collect();
    Err(Refusal::Field { field: "product", why: format!("\"{shown}\" is not 1-64 letters, digits, '-' or '_'") })
}

/// A question: 1 to [`MAX_QUESTION`] bytes; line breaks and tabs are allowed, other control
/// characters are not.
pub fn check_question(q: &str) -> Result<(), Refusal> {
    let why = if q.trim().is_empty() {
        "is empty".to_string()
    } else if q.len() > MAX_QUESTION {
        format!("is {} bytes, over the limit of {MAX_QUESTION}", q.len())
    } else if q.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        "holds a control character".into()
    } else {
        return Ok(());
    };
    Err(Refusal::Field { field: "question", why })
}

fn field(name: &'static str, value: &str, max: usize) -> Result<(), Refusal> {
    let why = if value.is_empty() {
        "is empty".to_string()
    } else if value.len() > max {
        format!("is {} bytes, over the limit of {max}", value.len())
    } else if value.chars().any(char::is_control) {
        "holds a control character".into()
    } else {
        return Ok(());
    };
    Err(Refusal::Field { field: name, why })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_and_unknown_ones_are_refused() {
        let e = parse_command(br#"{"cmd":"trigger","camera":"c1","part_id":"P-7"}"#).unwrap();
        assert_eq!(e.command, Command::Trigger { camera: "c1".into(), part_id: "P-7".into(), product: None });
        let e = parse_command(br#"{"cmd":"trigger","camera":"c1","part_id":"P-8","product":"bracket-b"}"#).unwrap();
        assert_eq!(
            e.command,
            Command::Trigger { camera: "c1".into(), part_id: "P-8".into(), product: Some("bracket-b".into()) }
        );
        let e = parse_command(br#"{"cmd":"recipe","camera":"c1","product":"bracket-b","request_id":"r-2"}"#).unwrap();
        assert_eq!(
            e.command,
            Command::Recipe { camera: "c1".into(), product: "bracket-b".into(), request_id: Some("r-2".into()) }
        );
        for bad in ["", "a/b", "x y", "../etc", "prod\nuct"] {
            let p = serde_json::json!({"cmd":"recipe","camera":"c1","product":bad}).to_string();
            assert_eq!(parse_command(p.as_bytes()).unwrap_err().kind(), "bad_field", "{bad:?}");
        }
        assert_eq!(parse_command(br#"{"cmd":"reload"}"#).unwrap().command, Command::Reload);
        assert_eq!(parse_command(br#"{"cmd":"format-disk"}"#).unwrap_err().kind(), "invalid");
        assert_eq!(parse_command(br#"{"cmd":"trigger","camera":"c1"}"#).unwrap_err().kind(), "invalid");
        assert_eq!(parse_command(b"[1]").unwrap_err().kind(), "invalid");
    }

    #[test]
    fn request_ids_and_tokens_ride_on_any_command() {
        let e = parse_command(br#"{"cmd":"reload","request_id":"r-1","token":"s3cret"}"#).unwrap();
        assert_eq!(
            (e.command, e.request_id.as_deref(), e.token.as_deref()),
            (Command::Reload, Some("r-1"), Some("s3cret"))
        );
        let e = parse_command(br#"{"cmd":"chat","frame_id":"f","question":"where?","request_id":"q"}"#).unwrap();
        assert_eq!(
            e.command,
            Command::Chat { frame_id: "f".into(), question: "where?".into(), request_id: Some("q".into()) }
        );
        let e = parse_chat(br#"{"frame_id":"f","question":"why?","request_id":"q2"}"#).unwrap();
        assert_eq!(e.request_id.as_deref(), Some("q2"));
        assert_eq!(parse_command(br#"{"cmd":"reload","request_id":7}"#).unwrap_err().kind(), "bad_field");
        assert_eq!(request_id_of(br#"{"cmd":"nope","request_id":"r-9"}"#).as_deref(), Some("r-9"));
        assert_eq!(request_id_of(br#"{"cmd":"nope","request_id":"r\n9"}"#), None, "an unusable id is not echoed");
    }

    #[test]
    fn every_bound_is_enforced_at_the_edge() {
        let trigger = |part: &str| {
            parse_command(serde_json::json!({"cmd":"trigger","camera":"c","part_id":part}).to_string().as_bytes())
        };
        assert!(trigger(&"A".repeat(MAX_PART_ID)).is_ok());
        let e = trigger(&"A".repeat(MAX_PART_ID + 1)).unwrap_err();
        assert_eq!(e.kind(), "bad_field");
        assert!(e.to_string().starts_with("part_id is 129 bytes"), "{e}");
        assert_eq!(trigger("P-1\nforged log line").unwrap_err().kind(), "bad_field");
        assert_eq!(trigger("").unwrap_err().kind(), "bad_field");
        assert!(trigger("Prüfling-Ø12").is_ok(), "printable Unicode is a part id");
        let huge = serde_json::json!({"cmd":"trigger","camera":"c","part_id":"A".repeat(1_048_000)}).to_string();
        assert_eq!(parse_command(huge.as_bytes()).unwrap_err(), Refusal::TooLarge(huge.len()));
        let ask = |q: &str| parse_chat(serde_json::json!({"frame_id":"f","question":q}).to_string().as_bytes());
        assert!(ask("Where exactly?\nAnd why?").is_ok());
        assert_eq!(ask(&"?".repeat(MAX_QUESTION + 1)).unwrap_err().kind(), "bad_field");
        assert_eq!(ask("why\u{1b}[2J").unwrap_err().kind(), "bad_field");
    }
}
