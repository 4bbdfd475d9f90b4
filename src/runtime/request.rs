//! A request as app code sees it: the `request` global of the original API (method, path,
//! query, lower-case headers, parsed body, uploaded files) and the pieces of a web `Request`.

use bytes::Bytes;
use serde_json::{Map, Value};

use super::{Call, Reply};

/// A multipart/form-data body, split into fields and files.
#[derive(Debug, Default)]
pub struct Multipart {
    pub fields: Map<String, Value>,
    pub files: Vec<Upload>,
}

#[derive(Debug)]
pub struct Upload {
    pub field: String,
    pub name: String,
    pub mime: String,
    pub data: Bytes,
}

/// Splits a multipart body (done on the HTTP side, where the parser's futures run).
pub async fn read_multipart(content_type: &str, body: Bytes) -> Result<Multipart, String> {
    let boundary = multer::parse_boundary(content_type)
        .map_err(|e| format!("malformed multipart request: {e}"))?;
    let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(body) });
    let mut parts = multer::Multipart::new(stream, boundary);
    let mut out = Multipart::default();
    while let Some(field) = parts
        .next_field()
        .await
        .map_err(|e| format!("malformed multipart request: {e}"))?
    {
        let name = field.name().unwrap_or("").to_string();
        match field.file_name().map(str::to_string) {
            Some(file_name) => {
                let mime = field
                    .content_type()
                    .map(|m| m.to_string())
                    .unwrap_or_else(|| "application/octet-stream".into());
                let data = field
                    .bytes()
                    .await
                    .map_err(|e| format!("malformed multipart request: {e}"))?;
                // The first file of each field, as the original API gives.
                if !out.files.iter().any(|f| f.field == name) {
                    out.files.push(Upload {
                        field: name,
                        name: file_name,
                        mime,
                        data,
                    });
                }
            }
            None => {
                let text = field
                    .text()
                    .await
                    .map_err(|e| format!("malformed multipart request: {e}"))?;
                out.fields.entry(name).or_insert(Value::String(text));
            }
        }
    }
    Ok(out)
}

/// `{"a": "1"}` from `a=1&a=2` (the first value of each name).
fn first_values(encoded: &[u8]) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, v) in form_urlencoded::parse(encoded) {
        out.entry(k.into_owned())
            .or_insert(Value::String(v.into_owned()));
    }
    out
}

pub(crate) fn content_type(call: &Call) -> String {
    call.headers
        .iter()
        .find(|(k, _)| k == "content-type")
        .map(|(_, v)| v.to_ascii_lowercase())
        .unwrap_or_default()
}

/// What the prelude parses: the app, the `request` global and the fetch Request's parts.
/// Returns the JSON text and the uploaded files' bytes (in `request.files` order).
/// `parse_body`: classic apps get the body parsed, and a body that does not parse is the
/// client's error (400) before any app code runs.
pub fn describe(
    call: &Call,
    multipart: Option<Result<Multipart, String>>,
    parse_body: bool,
) -> Result<(String, Vec<Bytes>), Reply> {
    let mut headers = Map::new();
    for (k, v) in &call.headers {
        match headers.get_mut(k) {
            Some(Value::String(prev)) => {
                prev.push_str(", ");
                prev.push_str(v);
            }
            _ => {
                headers.insert(k.clone(), Value::String(v.clone()));
            }
        }
    }
    let mut request = Map::new();
    request.insert("method".into(), Value::String(call.method.clone()));
    request.insert("path".into(), Value::String(call.path.clone()));
    request.insert(
        "query".into(),
        Value::Object(first_values(call.query.as_bytes())),
    );
    request.insert("headers".into(), Value::Object(headers));
    let mut files = Vec::new();
    if parse_body && !call.body.is_empty() {
        let ctype = content_type(call);
        let mime = ctype.split(';').next().unwrap_or("").trim();
        let body = if mime == "application/json" || mime.ends_with("+json") {
            let parsed: Value = serde_json::from_slice(&call.body)
                .map_err(|e| Reply::error(400, &format!("request body is not valid JSON: {e}")))?;
            Some(parsed)
        } else if mime == "application/x-www-form-urlencoded" {
            Some(Value::Object(first_values(&call.body)))
        } else if mime == "multipart/form-data" {
            let parts = multipart
                .unwrap_or_else(|| Err("malformed multipart request".into()))
                .map_err(|e| Reply::error(400, &e))?;
            let mut list = Vec::new();
            for f in parts.files {
                list.push(serde_json::json!({
                    "field": f.field, "name": f.name, "type": f.mime, "size": f.data.len(),
                }));
                files.push(f.data);
            }
            request.insert("files".into(), Value::Array(list));
            Some(Value::Object(parts.fields))
        } else if mime.starts_with("text/") || mime.is_empty() {
            match std::str::from_utf8(&call.body) {
                Ok(text) => Some(Value::String(text.to_string())),
                Err(_) => None,
            }
        } else {
            None
        };
        if let Some(body) = body {
            request.insert("body".into(), body);
        }
    }
    // The fetch handler's Request takes the headers as they came.
    let header_pairs: Vec<Value> = if parse_body {
        Vec::new()
    } else {
        call.headers
            .iter()
            .map(|(k, v)| Value::Array(vec![Value::String(k.clone()), Value::String(v.clone())]))
            .collect()
    };
    let info = serde_json::json!({
        "app": { "id": call.app_id, "name": call.app_name },
        "version": env!("CARGO_PKG_VERSION"),
        "url": call.url,
        "headerPairs": header_pairs,
        "request": Value::Object(request),
    });
    Ok((info.to_string(), files))
}
