//! What a file is, decided once at deploy time: its type, whether it compresses, and how
//! long clients may cache it.

use std::io::Write;

/// Files smaller than this are not worth compressing.
const MIN_COMPRESS_BYTES: usize = 256;
/// Brotli's best setting is slow on big files; above this size use a quicker one.
const BROTLI_BEST_MAX_BYTES: usize = 1 << 20;

fn compressible(mime: &str) -> bool {
    let essence = mime.split(';').next().unwrap_or("").trim();
    essence.starts_with("text/")
        || matches!(
            essence,
            "application/javascript"
                | "application/json"
                | "application/manifest+json"
                | "application/xml"
                | "application/wasm"
                | "image/svg+xml"
                | "image/x-icon"
                | "font/ttf"
                | "font/otf"
                | "application/vnd.ms-fontobject"
        )
}

/// Compressed variants of a file, kept only when they save at least a tenth of the bytes.
#[derive(Debug, Default)]
pub struct Variants {
    pub gzip: Option<Vec<u8>>,
    pub br: Option<Vec<u8>>,
}

pub fn compress(data: &[u8], mime: &str) -> Variants {
    if data.len() < MIN_COMPRESS_BYTES || !compressible(mime) {
        return Variants::default();
    }
    let worth = |v: Vec<u8>| (v.len() * 10 < data.len() * 9).then_some(v);
    let gzip = {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(data)
            .and_then(|_| enc.finish())
            .ok()
            .and_then(worth)
    };
    let br = {
        let quality = if data.len() <= BROTLI_BEST_MAX_BYTES {
            11
        } else {
            6
        };
        let mut out = Vec::new();
        let params = brotli::enc::BrotliEncoderParams {
            quality,
            lgwin: 22,
            ..Default::default()
        };
        brotli::BrotliCompress(&mut &data[..], &mut out, &params)
            .ok()
            .and_then(|_| worth(out))
    };
    Variants { gzip, br }
}

/// Cache-Control for a served path.
pub fn cache_control(path: &str) -> &'static str {
    let file = path.rsplit('/').next().unwrap_or(path);
    if file.ends_with(".html") || file.ends_with(".htm") {
        "no-cache"
    } else if has_content_hash(file) {
        "public, max-age=31536000, immutable"
    } else {
        "public, max-age=300"
    }
}

/// Whether a file name carries a build tool's content hash (`app-3f9a1c.js`,
/// `index.BxY2k9Qa.css`): the last `-` or `.` separated part of the stem is 6-32 characters
/// of [A-Za-z0-9_] and looks random (hex with a digit, or a mix of letter cases and digits).
fn has_content_hash(file: &str) -> bool {
    let Some((stem, _ext)) = file.rsplit_once('.') else {
        return false;
    };
    let Some(part) = stem
        .rsplit(['-', '.'])
        .next()
        .filter(|p| p.len() < stem.len())
    else {
        return false;
    };
    if !(6..=32).contains(&part.len())
        || !part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return false;
    }
    let digits = part.bytes().any(|b| b.is_ascii_digit());
    let lower = part.bytes().any(|b| b.is_ascii_lowercase());
    let upper = part.bytes().any(|b| b.is_ascii_uppercase());
    let hex = part.bytes().all(|b| b.is_ascii_hexdigit());
    (hex && digits)
        || (part.len() >= 8
            && [digits, lower, upper].iter().filter(|&&c| c).count() >= 2
            && (digits || upper))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_policy_by_kind_of_file() {
        assert_eq!(cache_control("index.html"), "no-cache");
        assert_eq!(cache_control("docs/page.htm"), "no-cache");
        assert_eq!(
            cache_control("assets/app-3f9a1c.js"),
            "public, max-age=31536000, immutable"
        );
        assert_eq!(
            cache_control("assets/index.BxY2k9Qa.css"),
            "public, max-age=31536000, immutable"
        );
        assert_eq!(
            cache_control("assets/index-DiwrgTda.js"),
            "public, max-age=31536000, immutable"
        );
        assert_eq!(cache_control("style.css"), "public, max-age=300");
        assert_eq!(cache_control("my-component.js"), "public, max-age=300");
        assert_eq!(cache_control("jquery-3.7.1.min.js"), "public, max-age=300");
        assert_eq!(cache_control("logo.png"), "public, max-age=300");
    }

    #[test]
    fn text_compresses_and_images_do_not() {
        let text = "hello fazt ".repeat(200);
        let v = compress(text.as_bytes(), "text/plain; charset=utf-8");
        assert!(v.gzip.as_ref().unwrap().len() < text.len());
        assert!(v.br.as_ref().unwrap().len() < text.len());
        let v = compress(text.as_bytes(), "image/png");
        assert!(v.gzip.is_none() && v.br.is_none());
        let v = compress(b"tiny", "text/plain");
        assert!(v.gzip.is_none());
    }
}
