//! Where participants' files live on disk, and which names are safe.
//!
//! Outputs of job J of user N are stored under
//! `<data_dir>/users/N/output/J/<file name ComfyUI gave it>` (temp previews,
//! from `PreviewImage`, under `users/N/temp/J/`), so two
//! participants whose prompts make the same file name on the GPU node never
//! collide, and `/user/N/api/view` can only ever reach user N's folder. Every
//! name that comes from outside goes through [`safe_name`] first.

use std::path::{Path, PathBuf};

use dispatcher::JobId;

use crate::error::ApiError;

/// The on-disk file store.
#[derive(Clone, Debug)]
pub struct Files {
    root: PathBuf,
}

/// Checks one path component sent by a client: no separators, no `..`, no
/// hidden or control characters, not too long; and the same once
/// percent-decoded (twice), so no layer that decodes it again can be led
/// out of the folder.
pub fn safe_name(name: &str) -> Result<&str, ApiError> {
    let plain = |n: &str| {
        !(n.is_empty()
            || n.len() > 255
            || n.starts_with('.')
            || n.chars().any(|c| c == '/' || c == '\\' || c.is_control() || c == ':'))
    };
    let once = urlencoding::decode_binary(name.as_bytes());
    let twice = urlencoding::decode_binary(&once);
    let decoded_plain = [&once, &twice].iter().all(|d| plain(&String::from_utf8_lossy(d)));
    if plain(name) && decoded_plain {
        Ok(name)
    } else {
        Err(ApiError::bad_request("invalid_filename", format!("{name:?} is not an allowed file or folder name")))
    }
}

/// Checks a `subfolder` (components separated by `/`, may be empty; never
/// absolute).
pub fn safe_subfolder(sub: &str) -> Result<PathBuf, ApiError> {
    if sub.starts_with('/') {
        return Err(ApiError::bad_request(
            "invalid_filename",
            format!("{sub:?} is not an allowed folder: it must be relative (inside your own files)"),
        ));
    }
    let mut path = PathBuf::new();
    for part in sub.split('/').filter(|p| !p.is_empty()) {
        path.push(safe_name(part)?);
    }
    Ok(path)
}

impl Files {
    pub fn new(root: PathBuf) -> Self {
        Files { root }
    }

    pub fn root(&self) -> &PathBuf {
        &self.root
    }

    /// User `user`'s folder of the given ComfyUI file type (`output`, `input`, `temp`).
    pub fn user_dir(&self, user: u32, kind: &str) -> Result<PathBuf, ApiError> {
        match kind {
            "output" | "input" | "temp" => Ok(self.root.join("users").join(user.to_string()).join(kind)),
            other => Err(ApiError::bad_request("invalid_type", format!("unknown file type {other:?}"))),
        }
    }

    /// The folder of job `job`'s files of type `kind` (`output` or `temp`);
    /// its name is the files' `subfolder`.
    pub fn job_dir(&self, user: u32, kind: &str, job: &JobId) -> Result<PathBuf, ApiError> {
        match kind {
            "output" | "temp" => Ok(self.user_dir(user, kind)?.join(job.to_string())),
            other => Err(ApiError::bad_request("invalid_type", format!("a job's files are output or temp, not {other:?}"))),
        }
    }

    /// Stores one output file of type `kind` (`output` or `temp`) atomically
    /// (temp file + rename): a retried upload replaces the file with the
    /// same bytes, never half of it.
    pub async fn store_output(
        &self,
        user: u32,
        kind: &str,
        job: &JobId,
        filename: &str,
        bytes: &[u8],
    ) -> Result<(), ApiError> {
        let name = safe_name(filename)?;
        let dir = self.job_dir(user, kind, job)?;
        let io = |e: std::io::Error| ApiError::Internal(format!("cannot store output in {}: {e}", dir.display()));
        tokio::fs::create_dir_all(&dir).await.map_err(io)?;
        let tmp = dir.join(format!(".{name}.{}.part", uuid::Uuid::new_v4()));
        tokio::fs::write(&tmp, bytes).await.map_err(io)?;
        tokio::fs::rename(&tmp, dir.join(name)).await.map_err(io)
    }

    /// The file `/user/{user}/api/view` names, if it exists.
    pub fn resolve(&self, user: u32, kind: &str, subfolder: &str, filename: &str) -> Result<PathBuf, ApiError> {
        let path = self.user_dir(user, kind)?.join(safe_subfolder(subfolder)?).join(safe_name(filename)?);
        if is_file(&path) {
            Ok(path)
        } else {
            Err(ApiError::NotFound(format!("no file {filename:?} in {kind}/{subfolder}")))
        }
    }
}

fn is_file(path: &Path) -> bool {
    std::fs::symlink_metadata(path).map(|m| m.is_file()).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traversal_is_refused() {
        for bad in ["..", "../x", "a/b", "/etc/passwd", ".hidden", "a\\b", "a\0b", "", "c:x", "%2e%2e", "..%2fx", "%252e%252e%252f", "a%00b", "a%5cb"] {
            assert!(safe_name(bad).is_err(), "{bad:?}");
        }
        assert!(safe_name("smoke_00001_.png").is_ok());
        assert!(safe_subfolder("a/../b").is_err());
        assert!(safe_subfolder("/etc").is_err());
        assert!(safe_name("100%_done.png").is_ok(), "a lone % is fine");
        assert_eq!(safe_subfolder("a//b/").unwrap(), PathBuf::from("a/b"));
        assert_eq!(safe_subfolder("").unwrap(), PathBuf::new());
    }
}
