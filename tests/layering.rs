//! The source tree is layered (see `src/lib.rs` and docs/ARCHITECTURE.md): a module may use only the
//! layers below it, and no two files use each other, directly or around a loop. Both are read from
//! the `crate::` paths in the code (doc comments and `//` comments do not count).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers from the bottom up; a module may use its own layer and those listed before it.
const LAYERS: &[&[&str]] = &[
    &["util"],
    &["types"],
    &["config"],
    &["telemetry"],
    &["engine"],
    &["detect"],
    &["enrol"],
    &["describe"],
    &["source"],
    &["sink"],
    &["control"],
    &["daemon"],
    &["commands"],
    &["cli", "app", "fuzzing", "lib", "main"],
];

fn layer_of(top: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&top))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `src/detect/gpu.rs` -> `["detect", "gpu"]`; `src/detect/mod.rs` -> `["detect"]`; `src/lib.rs` -> `["lib"]`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if parts.len() > 1 && parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// Every `crate::a::b::...` path in the code of `text`, as its segments (lower-case ones only: the
/// modules, then at most one item).
fn crate_paths(text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for line in text.lines() {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        let code = code.split(" //").next().unwrap_or(code);
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let before = rest[..i].chars().last();
            rest = &rest[i + "crate::".len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')).unwrap_or(rest.len());
            let segs: Vec<String> = rest[..end].split("::").filter(|s| !s.is_empty()).map(str::to_string).collect();
            if !segs.is_empty() {
                out.push(segs.clone());
            }
            // `use crate::x::{a, b::c}`: the names inside braces are modules or items of `x`.
            if rest[end..].starts_with('{')
                && let Some(close) = rest[end..].find('}')
            {
                let base = segs.clone();
                for name in rest[end + 1..end + close].split(',') {
                    let name = name.trim().split(" as ").next().unwrap_or("").trim();
                    if name.is_empty() || name == "self" {
                        continue;
                    }
                    let mut p = base.clone();
                    p.extend(name.split("::").map(str::to_string));
                    out.push(p);
                }
            }
        }
    }
    out
}

#[test]
fn no_module_uses_a_layer_above_it_and_no_files_use_each_other() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeMap<Vec<String>, PathBuf> = files.iter().map(|f| (module_of(&src, f), f.clone())).collect();
    let mut upward = Vec::new();
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (module, file) in &modules {
        let text = std::fs::read_to_string(file).unwrap();
        let own = layer_of(&module[0]).unwrap_or_else(|| panic!("{}: add its module to LAYERS", file.display()));
        for path in crate_paths(&text) {
            let Some(layer) = layer_of(&path[0]) else { continue };
            if layer > own {
                upward.push(format!("{} uses crate::{}", file.display(), path.join("::")));
            }
            // The file a path lands in: its longest prefix that is a module.
            let target = (1..=path.len()).rev().map(|n| path[..n].to_vec()).find(|p| modules.contains_key(p));
            if let Some(t) = target
                && &t != module
                && !module.starts_with(&t)
            {
                edges.entry(module.clone()).or_default().insert(t);
            }
        }
    }
    assert!(upward.is_empty(), "upward uses ({}):\n{}", upward.len(), upward.join("\n"));

    // Cycles between files: depth-first search for a back edge.
    let mut cycles = Vec::new();
    let mut state: BTreeMap<&Vec<String>, u8> = BTreeMap::new();
    fn visit<'a>(
        m: &'a Vec<String>,
        edges: &'a BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        state: &mut BTreeMap<&'a Vec<String>, u8>,
        stack: &mut Vec<&'a Vec<String>>,
        cycles: &mut Vec<String>,
    ) {
        state.insert(m, 1);
        stack.push(m);
        for t in edges.get(m).into_iter().flatten() {
            match state.get(t).copied().unwrap_or(0) {
                0 => visit(t, edges, state, stack, cycles),
                1 => {
                    let from = stack.iter().position(|s| *s == t).unwrap_or(0);
                    let ring: Vec<String> = stack[from..].iter().map(|s| s.join("::")).collect();
                    cycles.push(format!("{} -> {}", ring.join(" -> "), t.join("::")));
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(m, 2);
    }
    for m in modules.keys() {
        if !state.contains_key(m) {
            visit(m, &edges, &mut state, &mut Vec::new(), &mut cycles);
        }
    }
    assert!(cycles.is_empty(), "files that use each other ({}):\n{}", cycles.len(), cycles.join("\n"));
    eprintln!(
        "layering: {} files, {} file-to-file uses, no upward use, no cycle",
        modules.len(),
        edges.values().map(BTreeSet::len).sum::<usize>()
    );
}

#[test]
fn the_path_reader_sees_grouped_and_inline_uses_but_not_comments() {
    let text =
        "use crate::detect::{map, regions::find};\n// crate::daemon::x\nlet a = crate::sink::store::Store::new();\n";
    let paths: Vec<String> = crate_paths(text).iter().map(|p| p.join("::")).collect();
    assert_eq!(paths, ["detect", "detect::map", "detect::regions::find", "sink::store::Store::new"]);
}

/// The code (not comments) of every file under `src/`, with its path.
fn sources() -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    rust_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut files);
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(&f).unwrap();
            let code: Vec<&str> = text.lines().filter(|l| !l.trim_start().starts_with("//")).collect();
            (f, code.join("\n"))
        })
        .collect()
}

#[test]
fn anyhow_is_used_only_by_the_app() {
    let users: Vec<String> = sources()
        .into_iter()
        .filter(|(f, code)| code.contains("anyhow") && !f.ends_with("src/app.rs"))
        .map(|(f, _)| f.display().to_string())
        .collect();
    assert!(users.is_empty(), "library code must return thiserror types, not anyhow: {users:?}");
}

#[test]
fn metrics_move_only_through_telemetry_methods() {
    let raw = [".get_or_create(", ".inc()", ".inc_by(", ".dec_by(", ".observe("];
    let users: Vec<String> = sources()
        .into_iter()
        .filter(|(f, code)| !f.ends_with("src/telemetry.rs") && raw.iter().any(|r| code.contains(r)))
        .map(|(f, _)| f.display().to_string())
        .collect();
    assert!(users.is_empty(), "each metric event is one method in src/telemetry.rs: {users:?}");
}
