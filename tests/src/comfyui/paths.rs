//! ComfyUI's `folder_paths` rules: the input/output/temp directories,
//! `name [output]` annotations, the `<prefix>_<counter>_.png` naming and the
//! checks that keep `/view`, `/upload/image` and `SaveImage` inside their
//! directories.
//!
//! Why it exists: these rules decide file names that other parts of the
//! project rely on (the counter counts up per prefix across the server,
//! derived from the files on disk, exactly as ComfyUI derives it).

use std::path::{Component, Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The three directories a ComfyUI server serves files from.
#[derive(Clone, Debug)]
pub struct Dirs {
    /// `output/`: SaveImage results.
    pub output: PathBuf,
    /// `input/`: uploads and LoadImage sources.
    pub input: PathBuf,
    /// `temp/`: PreviewImage results; private to one server and removed with it.
    pub temp: PathBuf,
}

impl Dirs {
    /// The directory for a `type` query/form value (`output`, `input`, `temp`).
    pub fn by_type(&self, kind: &str) -> Option<&Path> {
        match kind {
            "output" => Some(&self.output),
            "input" => Some(&self.input),
            "temp" => Some(&self.temp),
            _ => None,
        }
    }

    /// `folder_paths.annotated_filepath`: strips a ` [output]` / ` [input]` /
    /// ` [temp]` suffix and says which directory it named.
    pub fn annotated<'a>(&self, name: &'a str) -> (&'a str, Option<&Path>) {
        for (suffix, dir) in [("[output]", &self.output), ("[input]", &self.input), ("[temp]", &self.temp)] {
            if let Some(head) = name.strip_suffix(suffix) {
                // ComfyUI cuts one more character: the space before the tag.
                let mut head = head.chars();
                head.next_back();
                return (head.as_str(), Some(dir.as_path()));
            }
        }
        (name, None)
    }

    /// `folder_paths.get_annotated_filepath(name)` with the input directory as default.
    pub fn annotated_filepath(&self, name: &str) -> PathBuf {
        let (name, dir) = self.annotated(name);
        join(dir.unwrap_or(&self.input), name)
    }
}

/// `os.path.join(base, name)`: an absolute `name` replaces `base`.
pub fn join(base: &Path, name: &str) -> PathBuf {
    base.join(name)
}

/// `os.path.normpath` for POSIX paths, as text.
pub fn normpath(path: &str) -> String {
    if path.is_empty() {
        return ".".into();
    }
    let absolute = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|p| *p != "..") {
                    parts.pop();
                } else if !absolute {
                    parts.push("..");
                }
            }
            p => parts.push(p),
        }
    }
    let body = parts.join("/");
    match (absolute, body.is_empty()) {
        (true, _) => format!("/{body}"),
        (false, true) => ".".into(),
        (false, false) => body,
    }
}

/// `os.path.dirname` / `os.path.basename` for POSIX paths.
pub fn split(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(i) => {
            let head = &path[..=i];
            let trimmed = head.trim_end_matches('/');
            (if trimmed.is_empty() { head } else { trimmed }, &path[i + 1..])
        }
        None => ("", path),
    }
}

/// `base` joined with `rel` and normalized lexically (`os.path.abspath`
/// without touching the file system).
pub fn lexical_join(base: &Path, rel: &str) -> PathBuf {
    let joined = base.join(rel);
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// Whether `path` is `base` or below it, compared lexically by component.
pub fn is_within(base: &Path, path: &Path) -> bool {
    path.starts_with(base)
}

/// What `folder_paths.get_save_image_path` computes.
#[derive(Debug, Clone, PartialEq)]
pub struct SavePath {
    /// The folder the files go to.
    pub folder: PathBuf,
    /// The file name stem (may contain `%batch_num%`).
    pub filename: String,
    /// The first free counter.
    pub counter: u64,
    /// The subfolder as reported to clients.
    pub subfolder: String,
}

/// `folder_paths.get_save_image_path(prefix, output_dir, width, height)`.
///
/// Errors with ComfyUI's message when the prefix leaves `output_dir`.
/// Date variables use UTC (ComfyUI uses the server's local time).
pub fn save_image_path(prefix: &str, output_dir: &Path, width: usize, height: usize) -> Result<SavePath, String> {
    let prefix = if prefix.contains('%') { compute_vars(prefix, width, height) } else { prefix.to_string() };
    let normalized = normpath(&prefix);
    let (subfolder, filename) = split(&normalized);
    let folder = lexical_join(output_dir, subfolder);
    if !is_within(output_dir, &folder) {
        let common = common_path(output_dir, &folder);
        return Err(format!(
            "**** ERROR: Saving image outside the output folder is not allowed.\n full_output_folder: {}\n         output_dir: {}\n         commonpath: {}",
            folder.display(),
            output_dir.display(),
            common.display()
        ));
    }
    // ComfyUI measures the prefix length on the basename of the prefix as given.
    let prefix_len = split(&prefix).1.chars().count();
    let counter = match std::fs::read_dir(&folder) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .filter_map(|name| {
                let chars: Vec<char> = name.chars().collect();
                let head: String = chars.iter().take(prefix_len + 1).collect();
                let tail: String = chars.iter().skip(prefix_len + 1).collect();
                let digits: u64 = tail.split('_').next().unwrap_or("").trim().parse().unwrap_or(0);
                let (stem, last) = (head.get(..head.len().saturating_sub(1)).unwrap_or(""), head.chars().last());
                (stem == filename && last == Some('_')).then_some(digits)
            })
            .max()
            .map_or(1, |d| d + 1),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(&folder).map_err(|e| format!("[Errno {}] {}", e.raw_os_error().unwrap_or(0), e))?;
            1
        }
        Err(e) => return Err(format!("[Errno {}] {}", e.raw_os_error().unwrap_or(0), e)),
    };
    Ok(SavePath { folder, filename: filename.to_string(), counter, subfolder: subfolder.to_string() })
}

fn common_path(a: &Path, b: &Path) -> PathBuf {
    a.components().zip(b.components()).take_while(|(x, y)| x == y).map(|(x, _)| x.as_os_str()).collect()
}

/// ComfyUI's `compute_vars`: `%width%`, `%height%`, `%year%` … `%second%`.
fn compute_vars(input: &str, width: usize, height: usize) -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    input
        .replace("%width%", &width.to_string())
        .replace("%height%", &height.to_string())
        .replace("%year%", &year.to_string())
        .replace("%month%", &format!("{month:02}"))
        .replace("%day%", &format!("{day:02}"))
        .replace("%hour%", &format!("{:02}", rem / 3600))
        .replace("%minute%", &format!("{:02}", rem % 3600 / 60))
        .replace("%second%", &format!("{:02}", rem % 60))
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The image files directly in `dir`, sorted: what LoadImage offers.
pub fn input_images(dir: &Path) -> Vec<String> {
    const IMAGE_EXTENSIONS: [&str; 12] =
        ["png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff", "ico", "avif", "heic", "heif"];
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|name| {
                    name.rsplit_once('.')
                        .is_some_and(|(_, ext)| IMAGE_EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str()))
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// The `Content-Type` ComfyUI's `/view` sends for a file name.
pub fn content_type(name: &str) -> &'static str {
    let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "bmp" => "image/bmp",
        "tif" | "tiff" => "image/tiff",
        "svg" => "image/svg+xml",
        "json" => "application/json",
        "txt" => "text/plain",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mp3" => "audio/mpeg",
        "wav" => "audio/x-wav",
        "flac" => "audio/flac",
        // html, js and css are forced to download, like ComfyUI does.
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normpath_and_split_like_python() {
        assert_eq!(normpath("a//b/./c/.."), "a/b");
        assert_eq!(normpath("../x"), "../x");
        assert_eq!(normpath("/../x"), "/x");
        assert_eq!(normpath(""), ".");
        assert_eq!(split("smoke"), ("", "smoke"));
        assert_eq!(split("sub/smoke"), ("sub", "smoke"));
        assert_eq!(split("/smoke"), ("/", "smoke"));
    }

    #[test]
    fn counter_counts_up_per_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        assert_eq!(save_image_path("smoke", out, 1, 1).unwrap().counter, 1);
        std::fs::write(out.join("smoke_00001_.png"), b"").unwrap();
        std::fs::write(out.join("smoke_00007_.png"), b"").unwrap();
        std::fs::write(out.join("smokey_00009_.png"), b"").unwrap();
        std::fs::write(out.join("other_00020_.png"), b"").unwrap();
        assert_eq!(save_image_path("smoke", out, 1, 1).unwrap().counter, 8);
        let sub = save_image_path("a/b", out, 1, 1).unwrap();
        assert_eq!((sub.subfolder.as_str(), sub.filename.as_str(), sub.counter), ("a", "b", 1));
        assert!(out.join("a").is_dir());
        assert!(save_image_path("../escape", out, 1, 1).unwrap_err().contains("outside the output folder"));
        assert!(save_image_path("/etc/escape", out, 1, 1).is_err());
        assert_eq!(save_image_path("%width%x%height%", out, 3, 4).unwrap().filename, "3x4");
    }

    #[test]
    fn annotations() {
        let dirs = Dirs { output: "/o".into(), input: "/i".into(), temp: "/t".into() };
        assert_eq!(dirs.annotated_filepath("a.png [output]"), PathBuf::from("/o/a.png"));
        assert_eq!(dirs.annotated_filepath("a.png"), PathBuf::from("/i/a.png"));
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
    }
}
