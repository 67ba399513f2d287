//! The layout rule, checked: data flows one way through `src/`, and a module may only use the
//! modules above it in [`ORDER`] (leaves first, `commands` last); there is no import cycle between
//! any two modules. Leaves may use one another, but not in a cycle.
//!
//! A plain-text scan, no compiler: comments and string literals are blanked, items behind
//! `#[cfg(test)]` are left out (test code may import anything), and every `crate::…` path that
//! remains (in `use` or inline) is an edge from the file's top-level module to the module it
//! names. A new top-level module must be placed in [`ORDER`] before it can pass.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The flow, upstream first. Modules of one rank (the leaves) may use each other.
const ORDER: &[&[&str]] = &[
    &[
        "clock", "error", "url", "event", "counters", "retry", "http", "memory", "secret", "text",
    ],
    &["source"],
    &["spool"],
    &["cluster"],
    &["delivery"],
    &["pipeline"],
    &["actions"],
    &["notify"],
    &["server"],
    &["config"],
    &["service"],
    &["cli"],
    &["commands"],
];

/// Imports against the flow that the tree has today, each with why and what ends it. Listed
/// here, printed on every run, and an entry that no longer occurs fails the test, so this
/// list only shrinks. Cycles are never excused.
const KNOWN_EXCEPTIONS: &[(&str, &str, &str)] = &[];

/// Files that are not modules in the flow: the crate root declares the modules, and `main.rs`
/// (its own crate, using the library as `smee_relay::`) sits above them all.
const ROOTS: &[&str] = &["lib.rs", "main.rs"];

/// One `crate::` path found in a file.
#[derive(Debug)]
struct Use {
    /// The file, relative to the crate (`src/spool/writer.rs`).
    file: String,
    /// 1-based line of the path.
    line: usize,
    /// The top-level module the file belongs to.
    from: String,
    /// The top-level module the path names.
    to: String,
    /// The path as written, up to the item (`crate::delivery::Sink`).
    path: String,
}

fn rank(module: &str) -> Option<usize> {
    ORDER.iter().position(|rank| rank.contains(&module))
}

#[test]
fn no_module_uses_one_downstream_of_it_and_there_is_no_cycle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    files.sort();
    assert!(!files.is_empty(), "no sources under src/");

    let test_files: BTreeSet<PathBuf> = files.iter().flat_map(|f| test_only_files(f)).collect();
    let mut uses = Vec::new();
    let mut problems = Vec::new();
    let mut modules = BTreeSet::new();
    for file in files.iter().filter(|f| !test_files.contains(*f)) {
        let relative = file.strip_prefix(root).unwrap();
        let in_src = file.strip_prefix(root.join("src")).unwrap();
        let Some(from) = top_module(in_src) else {
            continue;
        };
        if rank(&from).is_none() {
            problems.push(format!(
                "{}: module `{from}` is not in the layout order (tests/layout.rs ORDER): \
                 place it where the data flow puts it",
                relative.display()
            ));
        }
        modules.insert(from.clone());
        let text = std::fs::read_to_string(file).unwrap();
        for (line, path) in crate_paths(&text, in_src) {
            let to = path
                .trim_start_matches("crate::")
                .split("::")
                .next()
                .unwrap_or_default()
                .to_string();
            if to.is_empty() || to == from || to.starts_with(char::is_uppercase) {
                // The module itself, or an item of the crate root (a re-export in lib.rs).
                continue;
            }
            uses.push(Use {
                file: relative.display().to_string(),
                line,
                from: from.clone(),
                to,
                path,
            });
        }
    }

    // Downstream imports.
    let excused = |u: &Use| {
        KNOWN_EXCEPTIONS
            .iter()
            .any(|(from, to, _)| u.from == *from && u.to == *to)
    };
    for (from, to, why) in KNOWN_EXCEPTIONS {
        let count = uses
            .iter()
            .filter(|u| u.from == *from && u.to == *to)
            .count();
        if count == 0 {
            problems.push(format!(
                "`{from}` no longer imports `{to}`: remove the entry from KNOWN_EXCEPTIONS"
            ));
        } else {
            println!("known exception: {from} -> {to} ({count} paths): {why}");
        }
    }
    for u in uses.iter().filter(|u| !excused(u)) {
        match (rank(&u.from), rank(&u.to)) {
            (_, None) if !modules.contains(&u.to) => problems.push(format!(
                "{}:{}: `{}` names `{}`, which is not a module of src/",
                u.file, u.line, u.path, u.to
            )),
            (Some(from), Some(to)) if to > from => problems.push(format!(
                "{}:{}: `{}` imports `{}` ({}), which is downstream of `{}`",
                u.file, u.line, u.from, u.path, u.to, u.from
            )),
            _ => {}
        }
    }

    // Cycles, among any modules (leaves included).
    let mut graph: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for u in &uses {
        graph.entry(&u.from).or_default().insert(&u.to);
    }
    for cycle in cycles(&graph) {
        let mut lines = vec![format!("import cycle: {}", cycle.join(" -> "))];
        for pair in cycle.windows(2) {
            for u in uses.iter().filter(|u| u.from == pair[0] && u.to == pair[1]) {
                lines.push(format!("  {}:{}: {}", u.file, u.line, u.path));
            }
        }
        problems.push(lines.join("\n"));
    }

    // What each module uses, for the reader of a failure (or of `--nocapture`).
    for (from, to) in &graph {
        let to: Vec<&str> = to.iter().copied().collect();
        println!("{from} -> {}", to.join(", "));
    }
    assert!(
        problems.is_empty(),
        "the layout rule is broken ({} problems):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The files of modules that `file` declares behind `#[cfg(test)]` (`mod tests;`): test code.
fn test_only_files(file: &Path) -> Vec<PathBuf> {
    let code = blank_comments_and_literals(&std::fs::read_to_string(file).unwrap());
    let stem = file.file_stem().unwrap().to_string_lossy();
    let dir = file.parent().unwrap();
    let children = match &*stem {
        "mod" | "lib" | "main" => dir.to_path_buf(),
        _ => dir.join(&*stem),
    };
    let mut found = Vec::new();
    for (at, _) in code.match_indices("#[cfg(test)]") {
        let words: Vec<&str> = code[at + "#[cfg(test)]".len()..]
            .split_whitespace()
            .take(3)
            .collect();
        let declared = match words.as_slice() {
            ["mod", name, ..] | [_, "mod", name] => name.strip_suffix(';'),
            _ => None,
        };
        if let Some(name) = declared {
            found.push(children.join(format!("{name}.rs")));
            found.push(children.join(name).join("mod.rs"));
        }
    }
    found
}

/// The top-level module of a file under `src/` (`spool/writer.rs` -> `spool`), or `None` for
/// the roots.
fn top_module(in_src: &Path) -> Option<String> {
    let first = in_src.components().next()?.as_os_str().to_str()?;
    if ROOTS.contains(&first) {
        return None;
    }
    Some(first.trim_end_matches(".rs").to_string())
}

/// The module path of a file under `src/` (`spool/writer.rs` -> [spool, writer];
/// `spool/mod.rs` -> [spool]), to resolve `super::`.
fn module_path(in_src: &Path) -> Vec<String> {
    let mut parts: Vec<String> = in_src
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap_or_default();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" {
        parts.push(stem.to_string());
    }
    parts
}

/// Each `crate::a::b` path in code outside `#[cfg(test)]` items, with its line, expanded from
/// `use crate::{a, b::c}` groups, and with `super::` paths that climb to the crate root
/// rewritten as `crate::`.
fn crate_paths(text: &str, in_src: &Path) -> Vec<(usize, String)> {
    let code = without_tests(&blank_comments_and_literals(text));
    let bytes = code.as_bytes();
    let module = module_path(in_src);
    let mut found = Vec::new();
    let line_of = |at: usize| code[..at].matches('\n').count() + 1;
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut at = 0;
    while at < bytes.len() {
        let starts_word = at == 0 || !(is_ident(bytes[at - 1]) || bytes[at - 1] == b'$');
        if !starts_word {
            at += 1;
            continue;
        }
        // `crate::`, or `super::` climbing (from a nested file) to the crate root.
        let (prefix_len, climbed) = if code[at..].starts_with("crate::") {
            (7, true)
        } else if code[at..].starts_with("super::") {
            let mut len = 0;
            let mut levels = 0;
            while code[at + len..].starts_with("super::") {
                len += 7;
                levels += 1;
            }
            (len, levels >= module.len())
        } else {
            at += 1;
            continue;
        };
        let start = at + prefix_len;
        if !climbed {
            at = start;
            continue;
        }
        let rest = &code[start..];
        if rest.starts_with('{') {
            // A group: the first segment of each member.
            let end = matching(rest, 0).unwrap_or(rest.len());
            for member in split_top_level(&rest[1..end]) {
                let member = member.trim();
                if !member.is_empty() && member != "self" {
                    found.push((line_of(start), format!("crate::{member}")));
                }
            }
            at = start + end;
        } else {
            let len = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(rest.len());
            let path = rest[..len].trim_end_matches(':');
            found.push((line_of(start), format!("crate::{path}")));
            at = start + len;
        }
    }
    found
}

/// `code` with every item that follows a `#[cfg(test)]` attribute (a module, a function, a
/// `use`) blanked, newlines kept.
fn without_tests(code: &str) -> String {
    let mut out = code.to_string();
    let mut from = 0;
    while let Some(found) = out[from..].find("#[cfg(test)]") {
        let attr = from + found;
        let item = attr + "#[cfg(test)]".len();
        let rest = &out[item..];
        let end = match (rest.find('{'), rest.find(';')) {
            (Some(brace), semi) if semi.is_none_or(|s| brace < s) => {
                matching(rest, brace).map_or(rest.len(), |e| e + 1)
            }
            (_, Some(semi)) => semi + 1,
            _ => rest.len(),
        };
        let blanked: String = out[attr..item + end]
            .chars()
            .map(|c| if c == '\n' { '\n' } else { ' ' })
            .collect();
        out.replace_range(attr..item + end, &blanked);
        from = item + end;
    }
    out
}

/// The index of the `}` that closes the `{` at `open` (comments and literals already blank).
fn matching(code: &str, open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in code[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(open + i);
                }
            }
            _ => {}
        }
    }
    None
}

/// `a, b::{c, d}, e` -> [a, b::{c, d}, e].
fn split_top_level(group: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0;
    let mut start = 0;
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&group[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&group[start..]);
    parts
}

/// `text` with comments and the insides of string and char literals replaced by spaces
/// (newlines kept, so line numbers hold), so that braces and paths in them do not count.
fn blank_comments_and_literals(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
        } else if c == 'r'
            && (next == Some('"') || next == Some('#'))
            && starts_literal(&chars[..i])
            && raw_string_hashes(&chars[i + 1..]).is_some()
        {
            // r"…", r#"…"#: ends at a quote followed by as many hashes.
            let hashes = raw_string_hashes(&chars[i + 1..]).unwrap();
            let open = 1 + hashes + 1;
            out.extend(std::iter::repeat_n(' ', open));
            i += open;
            while i < chars.len() {
                if chars[i] == '"' && chars[i + 1..].iter().take(hashes).all(|&h| h == '#') {
                    out.extend(std::iter::repeat_n(' ', 1 + hashes));
                    i += 1 + hashes;
                    break;
                }
                out.push(blank(chars[i]));
                i += 1;
            }
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < chars.len() {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' {
            // A char literal ('x', '\n', '\u{7b}'), not a lifetime ('a).
            let close = match (next, chars.get(i + 2)) {
                // The char after the backslash may itself be a quote ('\'').
                (Some('\\'), _) => chars
                    .get(i + 3..)
                    .and_then(|rest| rest.iter().position(|&c| c == '\''))
                    .map(|p| i + 3 + p),
                (Some(_), Some('\'')) => Some(i + 2),
                _ => None,
            };
            match close {
                Some(end) => {
                    out.extend(std::iter::repeat_n(' ', end - i + 1));
                    i = end + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// Whether an `r` after `before` opens a raw string (`r"`, `br"`) rather than ending a name.
fn starts_literal(before: &[char]) -> bool {
    let is_ident = |c: &char| c.is_alphanumeric() || *c == '_';
    match before {
        [.., p, 'b'] => !is_ident(p),
        ['b'] | [] => true,
        [.., p] => !is_ident(p),
    }
}

/// After `r`: `#…#"` -> the number of hashes, if this is a raw string's opening.
fn raw_string_hashes(after_r: &[char]) -> Option<usize> {
    let hashes = after_r.iter().take_while(|&&c| c == '#').count();
    (after_r.get(hashes) == Some(&'"')).then_some(hashes)
}

/// Every cycle in `graph` (one per strongly connected group), as a path that returns to its
/// start.
fn cycles<'a>(graph: &BTreeMap<&'a str, BTreeSet<&'a str>>) -> Vec<Vec<&'a str>> {
    let mut found: Vec<Vec<&str>> = Vec::new();
    let mut seen_groups: BTreeSet<BTreeSet<&str>> = BTreeSet::new();
    for &start in graph.keys() {
        // Shortest path from `start` back to itself, breadth first.
        let mut previous: BTreeMap<&str, &str> = BTreeMap::new();
        let mut queue = std::collections::VecDeque::from([start]);
        let mut closed = None;
        while let Some(node) = queue.pop_front() {
            for &next in graph.get(node).into_iter().flatten() {
                if next == start {
                    closed = Some(node);
                    break;
                }
                if !previous.contains_key(next) {
                    previous.insert(next, node);
                    queue.push_back(next);
                }
            }
            if closed.is_some() {
                break;
            }
        }
        let Some(mut node) = closed else { continue };
        let mut path = vec![start];
        let mut back = vec![node];
        while node != start {
            node = previous[node];
            if node != start {
                back.push(node);
            }
        }
        back.reverse();
        path.extend(back);
        path.push(start);
        let group: BTreeSet<&str> = path.iter().copied().collect();
        if seen_groups.insert(group) {
            found.push(path);
        }
    }
    found
}

#[test]
fn the_scan_sees_paths_and_skips_tests_comments_and_strings() {
    let text = r####"
use crate::spool::{Spool, writer::SpoolWriter};
use crate::{clock, retry::BackoffPolicy};
// use crate::cli::Cli;
/* crate::commands */
const S: &str = "crate::service";
const R: &str = r#"crate::config"#;
const C: char = '{';
fn f<'a>(x: &'a str) -> crate::http::Client { super::super::notify::send() }
#[cfg(test)]
mod tests {
    use crate::cli::Cli;
    fn g() { let _ = "}"; }
}
#[cfg(test)]
use crate::server::Serve;
fn h() -> crate::event::Event {}
"####;
    let paths: Vec<String> = crate_paths(text, Path::new("delivery/forward.rs"))
        .into_iter()
        .map(|(line, path)| format!("{line}:{path}"))
        .collect();
    assert_eq!(
        paths,
        [
            "2:crate::spool",
            "3:crate::clock",
            "3:crate::retry::BackoffPolicy",
            "9:crate::http::Client",
            "9:crate::notify::send",
            "17:crate::event::Event",
        ]
    );
}
