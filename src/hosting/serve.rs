//! Answering HTTP requests for static sites: host routing, path resolution, and the
//! headers browsers and caches rely on (ETag/304, Range/206/416, encodings, Cache-Control).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use http_range_header::RangeUnsatisfiableError;

use super::site::{Encoding, FileEntry, Route, Site};

const ROOT_PAGE: &str = include_str!("../pages/root.html");
const NOT_FOUND_PAGE: &str = include_str!("../pages/404.html");

/// Shared state of the HTTP handler.
pub struct Hosting {
    pub site: Arc<Site>,
    /// The node's domain, lower-case.
    pub domain: String,
    /// Runs apps' serverless code (`/api` and `/api/*`).
    pub runtimes: crate::runtime::Runtimes,
    /// Time for a request body an app reads to arrive (answered 408 beyond it).
    pub body_timeout: std::time::Duration,
}

/// What a Host header selects.
#[derive(Debug, PartialEq, Eq)]
pub enum HostTarget {
    /// An alias (the apex and `root.` select alias `root`).
    Alias(String),
    /// `admin.<domain>`: reserved for the admin UI.
    Admin,
    Unknown,
}

/// Maps a Host header to an alias: `<alias>.<domain>`, `<alias>.localhost`, the apex,
/// `localhost` and IP literals (which select `root`).
pub fn host_target(host: &str, domain: &str) -> HostTarget {
    let host = strip_port(host).trim_end_matches('.').to_ascii_lowercase();
    if host == domain || host == "localhost" || host.parse::<std::net::IpAddr>().is_ok() {
        return HostTarget::Alias("root".into());
    }
    let label = host
        .strip_suffix(domain)
        .and_then(|h| h.strip_suffix('.'))
        .or_else(|| host.strip_suffix(".localhost"));
    match label {
        Some("admin") => HostTarget::Admin,
        Some(l) if !l.is_empty() && !l.contains('.') => HostTarget::Alias(l.to_string()),
        _ => HostTarget::Unknown,
    }
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// A request path, decoded and checked, as the list of candidate files to serve.
#[derive(Debug, PartialEq, Eq)]
pub enum PathLookup {
    Candidates(Vec<String>),
    /// Never served statically (`api/`, `private/`) or not a valid path.
    Refused,
}

pub fn lookup_path(raw: &str, spa: bool) -> PathLookup {
    let Ok(decoded) = percent_encoding::percent_decode_str(raw).decode_utf8() else {
        return PathLookup::Refused;
    };
    let mut segments = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" => {}
            "." | ".." => return PathLookup::Refused,
            s if s.contains(['\\', '\0']) => return PathLookup::Refused,
            s => segments.push(s),
        }
    }
    if matches!(segments.first(), Some(&"api") | Some(&"private")) {
        return PathLookup::Refused;
    }
    let path = segments.join("/");
    if path.is_empty() {
        return PathLookup::Candidates(vec!["index.html".into()]);
    }
    let no_extension = !segments.last().is_some_and(|s| s.contains('.'));
    let mut candidates = vec![path.clone(), format!("{path}/index.html")];
    if spa && no_extension {
        candidates.push("index.html".into());
    }
    PathLookup::Candidates(candidates)
}

pub async fn handle(hosting: Arc<Hosting>, req: Request) -> Response {
    // Two Host headers name two sites: which one a proxy in front routed by is unknown.
    let mut hosts = req.headers().get_all(header::HOST).iter();
    if hosts.next().is_some() && hosts.next().is_some() {
        let mut resp = (
            StatusCode::BAD_REQUEST,
            "bad request: more than one Host header\n",
        )
            .into_response();
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return resp;
    }
    match respond(&hosting, req).await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "request failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "internal error\n").into_response()
        }
    }
}

/// Whether a request path is the app's API (`/api` or `/api/...`).
fn is_api_path(path: &str) -> bool {
    path == "/api" || path.starts_with("/api/")
}

async fn respond(hosting: &Hosting, req: Request) -> anyhow::Result<Response> {
    // Static requests ignore the body; the parts (unlike the body) can be held across awaits.
    let (req, body) = req.into_parts();
    let method = req.method.clone();
    if is_api_path(req.uri.path()) {
        if let Some(resp) = api(hosting, &req, body).await? {
            return Ok(resp);
        }
    }
    if method != Method::GET && method != Method::HEAD {
        let mut resp = (StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n").into_response();
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Ok(resp);
    }
    let host = req
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri.host())
        .unwrap_or("");
    let site = &hosting.site;
    let routes = site.routes().await?;
    let alias = match host_target(host, &hosting.domain) {
        HostTarget::Alias(a) => a,
        HostTarget::Admin | HostTarget::Unknown => return not_found(site, &routes, &req).await,
    };
    let Some(route) = routes.get(&alias) else {
        if alias == "root" && req.uri.path() == "/" {
            return Ok(builtin_page(StatusCode::OK, ROOT_PAGE, &method));
        }
        return not_found(site, &routes, &req).await;
    };
    let PathLookup::Candidates(candidates) = lookup_path(req.uri.path(), route.spa) else {
        return not_found(site, &routes, &req).await;
    };
    let manifest = site.manifest(&route.version).await?;
    match candidates.iter().find_map(|c| manifest.get(c)) {
        Some(entry) => serve_file(site, &req.headers, &method, entry, StatusCode::OK).await,
        None => not_found(site, &routes, &req).await,
    }
}

/// Runs the app's serverless code for an `/api` request; None when the host has no app or
/// the app has no `api/main.js` (the request is then answered like any other path).
async fn api(
    hosting: &Hosting,
    req: &axum::http::request::Parts,
    body: Body,
) -> anyhow::Result<Option<Response>> {
    let host = req
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri.host())
        .unwrap_or("");
    let HostTarget::Alias(alias) = host_target(host, &hosting.domain) else {
        return Ok(None);
    };
    let routes = hosting.site.routes().await?;
    let Some(route) = routes.get(&alias) else {
        return Ok(None);
    };
    let manifest = hosting.site.manifest(&route.version).await?;
    if !manifest.contains_key("api/main.js") {
        return Ok(None);
    }
    let limit = hosting.runtimes.limits().body;
    let declared = req
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = || {
        crate::runtime::Reply::error(
            413,
            &format!("request body is larger than the limit of {} bytes", limit),
        )
    };
    if declared.is_some_and(|n| n > limit as u64) {
        return Ok(Some(into_response(too_large())));
    }
    let body =
        match tokio::time::timeout(hosting.body_timeout, axum::body::to_bytes(body, limit)).await {
            Ok(Ok(b)) => b,
            Ok(Err(_)) => return Ok(Some(into_response(too_large()))),
            Err(_) => {
                let mut resp = into_response(crate::runtime::Reply::error(
                    408,
                    &format!(
                        "the request body did not arrive within {} s",
                        hosting.body_timeout.as_secs_f64()
                    ),
                ));
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return Ok(Some(resp));
            }
        };
    let headers: Vec<(String, String)> = req
        .headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    let content_type = req
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let multipart = if content_type
        .to_ascii_lowercase()
        .starts_with("multipart/form-data")
    {
        Some(crate::runtime::request::read_multipart(content_type, body.clone()).await)
    } else {
        None
    };
    let call = crate::runtime::Call {
        app_id: route.app_id.to_string(),
        app_name: route.app_name.to_string(),
        version: route.version.clone(),
        method: req.method.as_str().to_string(),
        url: format!(
            "http://{}{}",
            host,
            req.uri.path_and_query().map_or("/", |p| p.as_str())
        ),
        path: req.uri.path().to_string(),
        query: req.uri.query().unwrap_or("").to_string(),
        headers,
        body,
        multipart,
    };
    let reply = hosting.runtimes.call(call).await;
    let mut resp = into_response(reply);
    if req.method == Method::HEAD {
        *resp.body_mut() = Body::empty();
    }
    Ok(Some(resp))
}

/// Headers that frame the message or belong to one connection (RFC 9110 7.6.1, 9112 6):
/// the server sets them itself, so an app's values are dropped. Passed through, an app's
/// `content-length` or `transfer-encoding` would let it end its answer early and smuggle a
/// second response onto a kept-alive connection.
const SERVER_OWNED: [&str; 9] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "upgrade",
    "te",
    "trailer",
    "http2-settings",
];

/// Whether a response with this status has no body at all (RFC 9110 6.4.1, 15.3.5, 15.4.5).
fn bodiless(status: StatusCode) -> bool {
    status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status.is_informational()
}

/// An app's answer as an HTTP response. Header names and values that are not valid HTTP are
/// skipped, framing and hop-by-hop headers are the server's, and 204/304 carry no body.
fn into_response(reply: crate::runtime::Reply) -> Response {
    let status = StatusCode::from_u16(reply.status)
        .ok()
        .filter(|s| (200..=599).contains(&s.as_u16()))
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = if bodiless(status) {
        Body::empty()
    } else {
        Body::from(reply.body)
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    for (k, v) in reply.headers {
        let (Ok(name), Ok(value)) = (
            header::HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(&v),
        ) else {
            continue;
        };
        if SERVER_OWNED.contains(&name.as_str()) {
            continue;
        }
        headers.append(name, value);
    }
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    resp
}

/// The 404 page: the `404` app's index.html when deployed, else the built-in one.
async fn not_found(
    site: &Arc<Site>,
    routes: &std::collections::HashMap<String, Route>,
    req: &axum::http::request::Parts,
) -> anyhow::Result<Response> {
    if let Some(route) = routes.get("404") {
        let manifest = site.manifest(&route.version).await?;
        if let Some(entry) = manifest.get("index.html") {
            return serve_file(
                site,
                &HeaderMap::new(),
                &req.method,
                entry,
                StatusCode::NOT_FOUND,
            )
            .await;
        }
    }
    Ok(builtin_page(
        StatusCode::NOT_FOUND,
        NOT_FOUND_PAGE,
        &req.method,
    ))
}

fn builtin_page(status: StatusCode, page: &'static str, method: &Method) -> Response {
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        Body::from(page)
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(page.len()));
    resp
}

/// Picks the best encoding the client accepts among those stored for the file.
pub fn negotiate(accept: Option<&str>, gzip: bool, br: bool) -> Encoding {
    let Some(accept) = accept else {
        return Encoding::Identity;
    };
    let (mut q_gzip, mut q_br, mut q_star) = (None, None, None);
    for item in accept.split(',') {
        let mut parts = item.split(';');
        let name = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .find_map(|p| {
                let p = p.trim();
                p.strip_prefix("q=")
                    .or_else(|| p.strip_prefix("Q="))
                    .map(|v| v.trim().parse::<f32>().unwrap_or(0.0))
            })
            .unwrap_or(1.0);
        match name.as_str() {
            "gzip" | "x-gzip" => q_gzip = Some(q),
            "br" => q_br = Some(q),
            "*" => q_star = Some(q),
            _ => {}
        }
    }
    let q_br = if br {
        q_br.or(q_star).unwrap_or(0.0)
    } else {
        0.0
    };
    let q_gzip = if gzip {
        q_gzip.or(q_star).unwrap_or(0.0)
    } else {
        0.0
    };
    if q_br > 0.0 && q_br >= q_gzip {
        Encoding::Brotli
    } else if q_gzip > 0.0 {
        Encoding::Gzip
    } else {
        Encoding::Identity
    }
}

/// Whether an If-None-Match header matches `etag` (weak comparison, as RFC 9110 asks).
fn none_match(header: &HeaderValue, etag: &HeaderValue) -> bool {
    let Ok(list) = header.to_str() else {
        return false;
    };
    let tag = etag.to_str().unwrap_or("");
    list.split(',')
        .map(str::trim)
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == tag)
}

async fn serve_file(
    site: &Arc<Site>,
    req_headers: &HeaderMap,
    method: &Method,
    entry: &FileEntry,
    status: StatusCode,
) -> anyhow::Result<Response> {
    let range = if status == StatusCode::OK {
        req_headers.get(header::RANGE)
    } else {
        None
    };
    let range = range.filter(|_| match req_headers.get(header::IF_RANGE) {
        Some(if_range) => if_range == entry.etag,
        None => true,
    });
    let enc = if range.is_some() {
        Encoding::Identity
    } else {
        let accept = req_headers
            .get(header::ACCEPT_ENCODING)
            .and_then(|v| v.to_str().ok());
        negotiate(accept, entry.etag_gzip.is_some(), entry.etag_br.is_some())
    };
    let etag = entry.etag_for(enc).clone();

    let mut headers = HeaderMap::with_capacity(8);
    headers.insert(header::ETAG, etag.clone());
    headers.insert(header::CACHE_CONTROL, entry.cache_control.clone());
    if entry.has_variants() {
        headers.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    }
    if status == StatusCode::OK {
        if let Some(inm) = req_headers.get(header::IF_NONE_MATCH) {
            if none_match(inm, &etag) {
                let mut resp = Response::new(Body::empty());
                *resp.status_mut() = StatusCode::NOT_MODIFIED;
                *resp.headers_mut() = headers;
                return Ok(resp);
            }
        }
    }
    headers.insert(header::CONTENT_TYPE, entry.content_type.clone());
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if let Some(ce) = enc.header() {
        headers.insert(header::CONTENT_ENCODING, ce);
    }

    let mut status = status;
    let mut slice = None;
    if let Some(range) = range.and_then(|r| r.to_str().ok()) {
        match http_range_header::parse_range_header(range).map(|p| p.validate(entry.size)) {
            Ok(Ok(ranges)) if ranges.len() == 1 => {
                let r = ranges[0].clone();
                headers.insert(
                    header::CONTENT_RANGE,
                    HeaderValue::from_str(&format!(
                        "bytes {}-{}/{}",
                        r.start(),
                        r.end(),
                        entry.size
                    ))?,
                );
                status = StatusCode::PARTIAL_CONTENT;
                slice = Some(*r.start() as usize..*r.end() as usize + 1);
            }
            // Several ranges, or none usable on an empty file: the whole file is a valid answer.
            Ok(Ok(_)) => {}
            Ok(Err(RangeUnsatisfiableError::Invalid(_)))
            | Err(RangeUnsatisfiableError::Invalid(_)) => {}
            Ok(Err(_)) | Err(_) => {
                headers.insert(
                    header::CONTENT_RANGE,
                    HeaderValue::from_str(&format!("bytes */{}", entry.size))?,
                );
                headers.remove(header::CONTENT_ENCODING);
                let mut resp = Response::new(Body::empty());
                *resp.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
                *resp.headers_mut() = headers;
                return Ok(resp);
            }
        }
    }

    let mut resp = if method == Method::HEAD {
        let len = match (&slice, enc) {
            (Some(s), _) => s.len(),
            (None, Encoding::Identity) => entry.size as usize,
            (None, _) => site.content(&entry.hash, enc).await?.len(),
        };
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        Response::new(Body::empty())
    } else {
        let bytes = site.content(&entry.hash, enc).await?;
        let bytes = match slice {
            Some(s) => bytes.slice(s),
            None => bytes,
        };
        Response::new(Body::from(bytes))
    };
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_route_to_aliases() {
        let d = "example.com";
        assert_eq!(
            host_target("example.com", d),
            HostTarget::Alias("root".into())
        );
        assert_eq!(
            host_target("root.example.com", d),
            HostTarget::Alias("root".into())
        );
        assert_eq!(
            host_target("Blog.Example.com:8080", d),
            HostTarget::Alias("blog".into())
        );
        assert_eq!(
            host_target("blog.localhost:4698", d),
            HostTarget::Alias("blog".into())
        );
        assert_eq!(
            host_target("localhost:4698", d),
            HostTarget::Alias("root".into())
        );
        assert_eq!(
            host_target("127.0.0.1:4698", d),
            HostTarget::Alias("root".into())
        );
        assert_eq!(
            host_target("[::1]:4698", d),
            HostTarget::Alias("root".into())
        );
        assert_eq!(host_target("admin.example.com", d), HostTarget::Admin);
        assert_eq!(host_target("a.b.example.com", d), HostTarget::Unknown);
        assert_eq!(host_target("other.org", d), HostTarget::Unknown);
        assert_eq!(host_target("notexample.com", d), HostTarget::Unknown);
    }

    #[test]
    fn paths_resolve_to_candidate_files() {
        let c = |v: &[&str]| PathLookup::Candidates(v.iter().map(|s| s.to_string()).collect());
        assert_eq!(lookup_path("/", false), c(&["index.html"]));
        assert_eq!(lookup_path("/docs", false), c(&["docs", "docs/index.html"]));
        assert_eq!(
            lookup_path("/docs/", false),
            c(&["docs", "docs/index.html"])
        );
        assert_eq!(
            lookup_path("/app/route", true),
            c(&["app/route", "app/route/index.html", "index.html"])
        );
        assert_eq!(
            lookup_path("/x.png", true),
            c(&["x.png", "x.png/index.html"])
        );
        assert_eq!(
            lookup_path("/a%20b.txt", false),
            c(&["a b.txt", "a b.txt/index.html"])
        );
        assert_eq!(lookup_path("/../etc/passwd", false), PathLookup::Refused);
        assert_eq!(
            lookup_path("/%2e%2e/etc/passwd", false),
            PathLookup::Refused
        );
        assert_eq!(lookup_path("/api/main.js", false), PathLookup::Refused);
        assert_eq!(lookup_path("/private/x", false), PathLookup::Refused);
        assert_eq!(lookup_path("/%ff", false), PathLookup::Refused);
    }

    #[test]
    fn encoding_follows_the_client_preference() {
        assert_eq!(negotiate(None, true, true), Encoding::Identity);
        assert_eq!(
            negotiate(Some("gzip, deflate, br"), true, true),
            Encoding::Brotli
        );
        assert_eq!(negotiate(Some("gzip"), true, true), Encoding::Gzip);
        assert_eq!(
            negotiate(Some("br;q=0.5, gzip"), true, true),
            Encoding::Gzip
        );
        assert_eq!(negotiate(Some("br"), true, false), Encoding::Identity);
        assert_eq!(negotiate(Some("*"), true, false), Encoding::Gzip);
        assert_eq!(negotiate(Some("gzip;q=0"), true, true), Encoding::Identity);
    }
}
