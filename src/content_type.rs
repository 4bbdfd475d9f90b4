//! What type of content a path holds, from its name: the Content-Type served for a site's
//! files (hosting) and given to an app's stored objects that name none (storage). A leaf: it
//! imports nothing from the node, so both may use it.

/// The Content-Type for a path (with a UTF-8 charset for text).
pub fn mime_for(path: &str) -> String {
    let mime = mime_guess::from_path(path).first_or_octet_stream();
    let essence = mime.essence_str();
    if mime.type_() == mime_guess::mime::TEXT
        || matches!(
            essence,
            "application/javascript" | "application/json" | "image/svg+xml"
        )
    {
        format!("{essence}; charset=utf-8")
    } else {
        essence.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_carry_a_charset_for_text() {
        assert_eq!(mime_for("a/index.html"), "text/html; charset=utf-8");
        assert!(
            mime_for("app.js").ends_with("javascript; charset=utf-8"),
            "{}",
            mime_for("app.js")
        );
        assert_eq!(mime_for("logo.png"), "image/png");
        assert_eq!(mime_for("noext"), "application/octet-stream");
    }
}
