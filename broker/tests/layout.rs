//! The broker's files import one another in one direction: no file reaches
//! back to a file that reaches it (an import circle), and the network paths
//! (`net/`) sit at the bottom, importing nothing of sessions, shards or
//! state. Read from the sources, so a new circle fails here with its path.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every module of the crate by path (`crate::shard::core`), with its file.
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).expect("under src");
            let mut parts: Vec<String> = rel
                .iter()
                .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_owned())
                .collect();
            match parts.last().map(String::as_str) {
                Some("main") if parts.len() == 1 => continue, // the binary
                Some("lib") if parts.len() == 1 => parts.clear(),
                Some("mod") => {
                    parts.pop();
                }
                _ => {}
            }
            let name = std::iter::once("crate".to_owned())
                .chain(parts)
                .collect::<Vec<_>>()
                .join("::");
            out.insert(name, path);
        }
    }
    out
}

/// The source without comments (doc links name paths that are not
/// imports) and without its inline test module (where `super` is the file
/// itself; by convention it closes the file).
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests {") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Paths a file names: `use` trees expanded, and inline `crate::a::b`.
fn named_paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    // `use` items start a line (`use`, `pub use`, `pub(crate) use`...).
    let mut offset = 0;
    for line in code.split_inclusive('\n') {
        let t = line.trim_start();
        let t = t.strip_prefix("pub").map_or(t, |r| {
            r.trim_start_matches(|c: char| c == '(' || c.is_alphanumeric() || c == ')')
                .trim_start()
        });
        if let Some(tree) = t.strip_prefix("use ") {
            let start = offset + (line.len() - tree.len());
            let item = code[start..].find(';').map(|end| &code[start..start + end]);
            // Not an item: the word "use" at the start of a string's line.
            if let Some(item) =
                item.filter(|i| !i.contains('"') && i.starts_with(char::is_alphabetic))
            {
                let tree: String = item.replace(" as ", "@").split_whitespace().collect();
                expand("", &tree, &mut out);
            }
        }
        offset += line.len();
    }
    let bytes = code.as_bytes();
    for root in ["crate::", "super::", "self::"] {
        let mut at = 0;
        while let Some(i) = code[at..].find(root) {
            let start = at + i;
            at = start + root.len();
            if start > 0
                && (bytes[start - 1].is_ascii_alphanumeric()
                    || bytes[start - 1] == b'_'
                    || bytes[start - 1] == b':')
            {
                continue;
            }
            let end = code[start..]
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .map_or(code.len(), |e| start + e);
            out.push(code[start..end].trim_end_matches(':').to_owned());
        }
    }
    out
}

/// Expands a `use` tree (`a::{b, c::{d}}`) into whole paths.
fn expand(prefix: &str, tree: &str, out: &mut Vec<String>) {
    let join = |p: &str, s: &str| {
        if p.is_empty() {
            s.to_owned()
        } else {
            format!("{p}::{s}")
        }
    };
    match tree.find('{') {
        None => out.push(join(prefix, tree.split('@').next().unwrap_or(tree))),
        Some(open) => {
            let head = tree[..open].trim_end_matches("::");
            let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
            let (mut depth, mut from) = (0, 0);
            let mut items = Vec::new();
            for (i, c) in inner.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        items.push(&inner[from..i]);
                        from = i + 1;
                    }
                    _ => {}
                }
            }
            items.push(&inner[from..]);
            let p = join(prefix, head);
            for item in items.into_iter().filter(|s| !s.is_empty()) {
                if item == "self" {
                    out.push(p.clone());
                } else {
                    expand(&p, item, out);
                }
            }
        }
    }
}

/// The module a path names, relative to module `me` (the longest prefix
/// that is a module of the crate).
fn resolve(me: &str, path: &str, mods: &BTreeMap<String, PathBuf>) -> Option<String> {
    let mut segs: Vec<&str> = me.split("::").collect();
    let mut parts = path.split("::").peekable();
    match parts.peek().copied() {
        Some("crate") => {
            parts.next();
            segs = vec!["crate"];
        }
        Some("super") => {
            while parts.peek() == Some(&"super") {
                parts.next();
                segs.pop();
            }
        }
        Some("self") => {
            parts.next();
        }
        _ => return None, // an external crate or a local name
    }
    let mut best = None;
    let mut cur: Vec<&str> = segs.clone();
    if mods.contains_key(&cur.join("::")) {
        best = Some(cur.join("::"));
    }
    for p in parts {
        cur.push(p);
        let name = cur.join("::");
        if mods.contains_key(&name) {
            best = Some(name);
        }
    }
    best
}

fn edges() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mods = modules(&src);
    assert!(
        mods.contains_key("crate::shard::messages"),
        "the layout moved: {mods:?}"
    );
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (me, file) in &mods {
        let text = code(&std::fs::read_to_string(file).expect("read"));
        let deps = out.entry(me.clone()).or_default();
        for path in named_paths(&text) {
            if let Some(target) = resolve(me, &path, &mods) {
                if &target != me {
                    deps.insert(target);
                }
            }
        }
    }
    out
}

/// A circle through `start`, if there is one.
fn circle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut c = path[i..].to_vec();
            c.push(n.to_owned());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_owned());
        for m in edges.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for n in edges.keys() {
        if let Some(c) = visit(n, edges, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

#[test]
fn no_file_of_the_broker_imports_in_a_circle() {
    let edges = edges();
    if let Some(c) = circle(&edges) {
        panic!("import circle: {}", c.join(" -> "));
    }
}

#[test]
fn the_network_paths_import_nothing_above_them() {
    for (m, deps) in edges() {
        if m == "crate::net" || m.starts_with("crate::net::") {
            for d in deps {
                assert!(
                    d.starts_with("crate::net"),
                    "{m} imports {d}: the network paths sit below sessions, shards and state"
                );
            }
        }
    }
}

#[test]
fn the_checker_sees_a_circle_when_there_is_one() {
    // The reader of the sources itself: a circle of two, and none in a line.
    let mut e: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    e.entry("a".into()).or_default().insert("b".into());
    e.entry("b".into()).or_default().insert("c".into());
    assert_eq!(circle(&e), None);
    e.entry("c".into()).or_default().insert("a".into());
    assert_eq!(circle(&e).map(|c| c.len()), Some(4));
    let mut paths = Vec::new();
    expand("", "crate::shard::{messages::{A,B},route,self}", &mut paths);
    assert_eq!(
        paths,
        [
            "crate::shard::messages::A",
            "crate::shard::messages::B",
            "crate::shard::route",
            "crate::shard"
        ]
    );
}
