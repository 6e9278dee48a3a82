//! A small Dockerfile reader for the deployment checks: logical lines (continuations joined,
//! comments dropped), stages, ARG expansion, and the forms of ENV, COPY and CMD that this
//! Dockerfile uses, so the image can be checked without a container engine.

use std::collections::BTreeMap;

use super::read;

#[derive(Debug)]
pub(crate) struct Stage {
    pub(crate) base: String,
    pub(crate) name: Option<String>,
    /// (KEYWORD, arguments with ARG values expanded)
    instructions: Vec<(String, String)>,
}

#[derive(Debug)]
pub(crate) struct Dockerfile {
    pub(crate) global_args: BTreeMap<String, String>,
    pub(crate) stages: Vec<Stage>,
}

#[derive(Debug)]
pub(crate) struct CopyInstr {
    pub(crate) from: Option<String>,
    pub(crate) sources: Vec<String>,
    pub(crate) dest: String,
}

fn logical_lines(text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut current = String::new();
    for raw in text.lines() {
        let trimmed = raw.trim();
        // Comment lines are dropped, also inside a continuation (as Docker does).
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                lines.push(std::mem::take(&mut current));
            }
        }
    }
    assert!(
        current.trim().is_empty(),
        "Dockerfile ends inside a continuation"
    );
    lines
}

/// `${NAME}` and `$NAME` replaced from `vars`; unknown names are left as written.
fn expand(text: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, len) = if let Some(braced) = after.strip_prefix('{') {
            let end = braced.find('}').expect("unterminated ${");
            (&braced[..end], end + 2)
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        match vars.get(name) {
            Some(value) if !name.is_empty() => out.push_str(value),
            _ => out.push_str(&rest[i..i + 1 + len]),
        }
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

/// Whitespace-separated words as a shell splits them: '...' is literal, "..." allows
/// backslash escapes; the quotes themselves are removed.
pub(crate) fn words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quote: Option<char> = None;
    let mut in_word = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') => word.extend(chars.next()),
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (_, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    assert!(quote.is_none(), "unbalanced quotes in {text:?}");
    if in_word {
        words.push(word);
    }
    words
}

impl Dockerfile {
    fn parse(text: &str) -> Dockerfile {
        let mut global_args = BTreeMap::new();
        let mut stages: Vec<Stage> = Vec::new();
        let mut stage_args = BTreeMap::new();
        for line in logical_lines(text) {
            let (keyword, args) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
            let keyword = keyword.to_ascii_uppercase();
            let args = args.trim();
            if keyword == "FROM" {
                let w: Vec<String> = words(&expand(args, &global_args))
                    .into_iter()
                    .filter(|w| !w.starts_with("--"))
                    .collect();
                let name = match w.as_slice() {
                    [_] => None,
                    [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some(name.clone()),
                    _ => panic!("cannot read FROM {args}"),
                };
                stages.push(Stage {
                    base: w[0].clone(),
                    name,
                    instructions: Vec::new(),
                });
                stage_args = BTreeMap::new();
                continue;
            }
            if keyword == "ARG" {
                let (name, default) = match args.split_once('=') {
                    Some((n, v)) => (n.trim().to_string(), Some(words(v).concat())),
                    None => (args.to_string(), None),
                };
                if stages.is_empty() {
                    global_args.insert(name, default.unwrap_or_default());
                } else if let Some(value) = default.or_else(|| global_args.get(&name).cloned()) {
                    stage_args.insert(name, value);
                }
                continue;
            }
            let stage = stages
                .last_mut()
                .unwrap_or_else(|| panic!("{keyword} before the first FROM"));
            stage
                .instructions
                .push((keyword, expand(args, &stage_args)));
        }
        assert!(!stages.is_empty(), "Dockerfile has no FROM");
        Dockerfile {
            global_args,
            stages,
        }
    }

    pub(crate) fn stage(&self, name: &str) -> &Stage {
        self.stages
            .iter()
            .find(|s| s.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("Dockerfile has no stage named {name}"))
    }

    /// The stage `docker build` (or fly's builder) produces for a build target.
    pub(crate) fn target(&self, target: Option<&str>) -> &Stage {
        match target {
            Some(name) => self.stage(name),
            None => self.stages.last().unwrap(),
        }
    }
}

impl Stage {
    pub(crate) fn label(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.base)
    }

    pub(crate) fn all<'a>(&'a self, keyword: &str) -> impl Iterator<Item = &'a str> + 'a {
        let keyword = keyword.to_string();
        self.instructions
            .iter()
            .filter(move |(k, _)| *k == keyword)
            .map(|(_, args)| args.as_str())
    }

    /// The last instruction of a kind (the one that counts for CMD, USER, STOPSIGNAL).
    pub(crate) fn last(&self, keyword: &str) -> Option<&str> {
        self.all(keyword).last()
    }

    pub(crate) fn env(&self) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        for args in self.all("ENV") {
            let w = words(args);
            if !w[0].contains('=') {
                // Legacy `ENV NAME value with spaces`.
                let (name, value) = args.split_once(char::is_whitespace).unwrap();
                env.insert(name.to_string(), value.trim().to_string());
                continue;
            }
            for pair in w {
                let (name, value) = pair
                    .split_once('=')
                    .unwrap_or_else(|| panic!("ENV word without '=': {pair}"));
                env.insert(name.to_string(), value.to_string());
            }
        }
        env
    }

    /// CMD in exec (JSON array) form: the process gets SIGTERM itself, not through `sh -c`.
    pub(crate) fn cmd(&self) -> Vec<String> {
        let cmd = self
            .last("CMD")
            .unwrap_or_else(|| panic!("stage {} has no CMD", self.label()));
        serde_json::from_str(cmd).unwrap_or_else(|_| {
            panic!(
                "stage {}: CMD must be in exec form [\"...\"] so that SIGTERM reaches streamserve, got {cmd}",
                self.label()
            )
        })
    }

    pub(crate) fn copies(&self) -> Vec<CopyInstr> {
        self.all("COPY")
            .map(|args| {
                let w = words(args);
                let mut from = None;
                let mut paths = Vec::new();
                for word in w {
                    if let Some(stage) = word.strip_prefix("--from=") {
                        from = Some(stage.to_string());
                    } else if !word.starts_with("--") {
                        paths.push(word);
                    }
                }
                let dest = paths.pop().expect("COPY without destination");
                assert!(!paths.is_empty(), "COPY without source: {args}");
                CopyInstr {
                    from,
                    sources: paths,
                    dest,
                }
            })
            .collect()
    }

    /// The path a file copied by `copy` has in the image.
    pub(crate) fn copied_to(copy: &CopyInstr, source: &str) -> String {
        if copy.dest.ends_with('/') {
            let file = source.rsplit('/').next().unwrap();
            format!("{}{file}", copy.dest)
        } else {
            copy.dest.clone()
        }
    }

    pub(crate) fn exposed_ports(&self) -> Vec<u16> {
        self.all("EXPOSE")
            .flat_map(words)
            .map(|p| {
                let port = p.split('/').next().unwrap();
                port.parse()
                    .unwrap_or_else(|_| panic!("EXPOSE {p} is not a port"))
            })
            .collect()
    }
}

/// The port the image's server listens for gRPC on: its environment's, else the server's
/// default (the image leaves it at that).
pub(crate) fn grpc_port(env: &BTreeMap<String, String>) -> u16 {
    env.get("STREAMSERVE_GRPC_PORT")
        .map(|p| p.parse().expect("STREAMSERVE_GRPC_PORT is a port"))
        .unwrap_or(streamserve::config::DEFAULT_GRPC_PORT)
}

pub(crate) fn dockerfile() -> Dockerfile {
    Dockerfile::parse(&read("Dockerfile"))
}
