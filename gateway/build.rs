//! Embeds the gateway's own editor extensions (`static/extensions/**`) into
//! the binary, so a deployed gateway needs no files beside it. Generates
//! `OWN_EXTENSIONS: &[(&str, &[u8])]` (path relative to `static/extensions`,
//! with `/`; file bytes), read by `src/editor.rs`.

use std::path::{Path, PathBuf};

fn walk(dir: &Path, prefix: &str, out: &mut Vec<(String, PathBuf)>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let rel = if prefix.is_empty() { name.clone() } else { format!("{prefix}/{name}") };
        let path = entry.path();
        if path.is_dir() {
            walk(&path, &rel, out);
        } else if path.is_file() {
            out.push((rel, path));
        }
    }
}

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let dir = root.join("static").join("extensions");
    // `static` too, so that creating `static/extensions` later is noticed.
    println!("cargo:rerun-if-changed={}", root.join("static").display());
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut files = Vec::new();
    walk(&dir, "", &mut files);
    files.sort();
    let mut code = String::from("/// The gateway's own editor extensions: (path, bytes).\npub static OWN_EXTENSIONS: &[(&str, &[u8])] = &[\n");
    for (rel, path) in files {
        code.push_str(&format!("    ({rel:?}, include_bytes!({:?})),\n", path.display().to_string()));
    }
    code.push_str("];\n");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("own_extensions.rs");
    std::fs::write(out, code).expect("cannot write own_extensions.rs");
}
