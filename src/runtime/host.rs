//! The host functions app code calls through the prelude (`__fazt_native`): storage, env,
//! logs, CommonJS modules and randomness. Each works on the calling app's data only.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use rquickjs::function::IntoJsFunc;
use rquickjs::{Array, ArrayBuffer, Ctx, Exception, Function, Object, Value};
use serde_json::Value as Json;

use super::script;
use crate::clock::now_ms;
use crate::db::Db;
use crate::storage::{self, docs, files, kv, Budget, Scope};

/// Longest console line kept, in bytes; a longer one is cut and ends with ` [truncated]`.
pub const MAX_LOG_LINE: usize = 16 << 10;
/// Console lines kept per request.
pub const MAX_LOG_LINES: usize = 1000;
/// Console bytes kept per request. Lines beyond this or `MAX_LOG_LINES` are dropped, and
/// one line at the end of the request says how many.
pub const MAX_LOG_REQUEST_BYTES: usize = 256 << 10;

/// One app version's code under api/, with bytecode compiled on first use.
pub struct Code {
    pub version: std::sync::Arc<str>,
    pub files: HashMap<String, String>,
    /// api/main.js is an ES module (a fetch handler) rather than a script.
    pub module: bool,
    pub bytecode: RefCell<HashMap<String, Rc<Vec<u8>>>>,
}

impl Code {
    /// Bytecode of `path` compiled as `kind`, from the cache or compiled now.
    pub fn compiled(
        &self,
        key: &str,
        path: &str,
        compile: impl FnOnce(&str) -> Result<Vec<u8>, script::JsError>,
    ) -> Result<Rc<Vec<u8>>, script::JsError> {
        if let Some(b) = self.bytecode.borrow().get(key) {
            return Ok(b.clone());
        }
        let source = self
            .files
            .get(path)
            .ok_or_else(|| script::JsError::new(format!("{path} is not part of this version")))?;
        let bytes = Rc::new(compile(source)?);
        self.bytecode
            .borrow_mut()
            .insert(key.to_string(), bytes.clone());
        Ok(bytes)
    }

    /// `api/x.js` for `require(name)` / `import name` from `base`; only files under api/.
    pub fn resolve(&self, base: &str, name: &str) -> Result<String, String> {
        if !(name.starts_with("./") || name.starts_with("../") || name.starts_with('/')) {
            return Err(format!(
                "cannot load module {name:?}: only files under api/ can be loaded (as \"./file.js\")"
            ));
        }
        let mut parts: Vec<&str> = if name.starts_with('/') {
            Vec::new()
        } else {
            let dir = base.rsplit_once('/').map_or("", |(d, _)| d);
            dir.split('/').filter(|p| !p.is_empty()).collect()
        };
        for seg in name.split('/') {
            match seg {
                "" | "." => {}
                ".." => {
                    parts.pop();
                }
                s => parts.push(s),
            }
        }
        let mut path = parts.join("/");
        if !path.starts_with("api/") {
            return Err(format!("cannot load module {name:?}: it is outside api/"));
        }
        if !self.files.contains_key(&path) && self.files.contains_key(&format!("{path}.js")) {
            path.push_str(".js");
        }
        if !self.files.contains_key(&path) {
            return Err(format!(
                "cannot load module {name:?}: {path} does not exist"
            ));
        }
        Ok(path)
    }
}

/// `message` cut to `MAX_LOG_LINE` bytes (on a character boundary), marked when cut.
fn cut_line(message: &str) -> String {
    if message.len() <= MAX_LOG_LINE {
        return message.to_string();
    }
    let mut cut = MAX_LOG_LINE;
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{} [truncated]", &message[..cut])
}

/// What host functions share during one request.
pub struct Host {
    pub db: RefCell<Db>,
    pub scope: Scope,
    logs: RefCell<Vec<(i64, String, String)>>,
    /// Message bytes of this request's kept console lines.
    log_bytes: std::cell::Cell<usize>,
    /// Console lines of this request dropped over the budgets.
    log_dropped: std::cell::Cell<usize>,
    env: RefCell<Option<Vec<(String, String)>>>,
    /// What one storage call may spend: the request's deadline and the result-size cap.
    budget: Budget,
}

impl Host {
    pub fn new(db: Db, app_id: &str, budget: Budget) -> Host {
        Host {
            db: RefCell::new(db),
            scope: Scope::app(app_id),
            budget,
            logs: RefCell::new(Vec::new()),
            log_bytes: std::cell::Cell::new(0),
            log_dropped: std::cell::Cell::new(0),
            env: RefCell::new(None),
        }
    }

    /// Forgets per-request caches (variables may change between requests).
    pub fn begin_request(&self) {
        *self.env.borrow_mut() = None;
    }

    /// A console line from app code, within the per-request budgets.
    pub fn log(&self, level: &str, message: &str) {
        let message = cut_line(message);
        let kept = self.logs.borrow().len();
        let bytes = self.log_bytes.get().saturating_add(message.len());
        if self.log_dropped.get() > 0 || kept >= MAX_LOG_LINES || bytes > MAX_LOG_REQUEST_BYTES {
            self.log_dropped
                .set(self.log_dropped.get().saturating_add(1));
            return;
        }
        self.log_bytes.set(bytes);
        let level = match level {
            "log" | "info" | "warn" | "error" | "debug" => level,
            _ => "log",
        };
        self.logs
            .borrow_mut()
            .push((now_ms(), level.to_string(), message));
    }

    /// A line from the runtime itself (the request's failure): kept whatever the app printed.
    pub fn log_always(&self, level: &'static str, message: &str) {
        self.logs
            .borrow_mut()
            .push((now_ms(), level.to_string(), cut_line(message)));
    }

    /// This request's lines (and a line counting those dropped); the budgets start over.
    pub fn take_logs(&self) -> Vec<(i64, String, String)> {
        let mut lines = std::mem::take(&mut *self.logs.borrow_mut());
        let dropped = self.log_dropped.replace(0);
        self.log_bytes.set(0);
        if dropped > 0 {
            lines.push((
                now_ms(),
                "warn".to_string(),
                format!(
                    "[{dropped} console line(s) of this request dropped: over the budget of {MAX_LOG_LINES} lines or {} KiB per request]",
                    MAX_LOG_REQUEST_BYTES >> 10
                ),
            ));
        }
        lines
    }

    fn env(&self) -> anyhow::Result<Vec<(String, String)>> {
        if let Some(vars) = self.env.borrow().as_ref() {
            return Ok(vars.clone());
        }
        let vars = storage::env::list(self.db.borrow().conn(), &self.scope.app_id)?;
        *self.env.borrow_mut() = Some(vars.clone());
        Ok(vars)
    }
}

fn throw(ctx: &Ctx<'_>, e: anyhow::Error) -> rquickjs::Error {
    Exception::throw_message(ctx, &format!("{:#}", storage::explain(e)))
}

/// The `__fazt_native` object being filled.
struct Native<'js> {
    obj: Object<'js>,
    ctx: Ctx<'js>,
}

impl<'js> Native<'js> {
    /// Sets `name` to a Rust function.
    fn def<P>(&self, name: &str, f: impl IntoJsFunc<'js, P> + 'js) -> rquickjs::Result<()> {
        self.obj.set(name, Function::new(self.ctx.clone(), f)?)
    }
}

fn parse(ctx: &Ctx<'_>, text: &str) -> rquickjs::Result<Json> {
    serde_json::from_str(text).map_err(|e| Exception::throw_type(ctx, &format!("not JSON: {e}")))
}

/// Defines `__fazt_native` in `ctx`.
pub fn install<'js>(
    ctx: &Ctx<'js>,
    host: &Rc<Host>,
    code: &Rc<Code>,
    web: &Rc<Vec<u8>>,
) -> rquickjs::Result<()> {
    let n = Native {
        obj: Object::new(ctx.clone())?,
        ctx: ctx.clone(),
    };

    let w = web.clone();
    n.def("load_web", move |ctx: Ctx<'js>| -> rquickjs::Result<()> {
        script::run_classic(&ctx, &w).map_err(|e| Exception::throw_message(&ctx, &e.message))?;
        Ok(())
    })?;

    let h = host.clone();
    n.def("log", move |level: String, message: String| {
        h.log(&level, &message);
    })?;

    let h = host.clone();
    n.def(
        "kv_set",
        move |ctx: Ctx<'js>,
              key: String,
              value: String,
              ttl: Option<f64>|
              -> rquickjs::Result<()> {
            let value = parse(&ctx, &value)?;
            kv::set(&mut h.db.borrow_mut(), &h.scope, &key, value, ttl, now_ms())
                .map_err(|e| throw(&ctx, e))
        },
    )?;
    let h = host.clone();
    n.def(
        "kv_get",
        move |ctx: Ctx<'js>, key: String| -> rquickjs::Result<Option<String>> {
            let entry = kv::get(h.db.borrow().conn(), &h.scope, &key, now_ms())
                .map_err(|e| throw(&ctx, e))?;
            Ok(entry.map(|e| e.value.to_string()))
        },
    )?;
    let h = host.clone();
    n.def(
        "kv_delete",
        move |ctx: Ctx<'js>, key: String| -> rquickjs::Result<bool> {
            kv::delete(&mut h.db.borrow_mut(), &h.scope, &key, now_ms()).map_err(|e| throw(&ctx, e))
        },
    )?;
    let h = host.clone();
    n.def(
        "kv_list",
        move |ctx: Ctx<'js>, prefix: String| -> rquickjs::Result<String> {
            let entries = kv::list(h.db.borrow().conn(), &h.scope, &prefix, now_ms(), &h.budget)
                .map_err(|e| throw(&ctx, e))?;
            let list: Vec<Json> = entries
                .into_iter()
                .map(|e| {
                    let mut o = serde_json::json!({ "key": e.key, "value": e.value });
                    if let Some(at) = e.expires_at {
                        o["expiresAt"] = Json::from(at);
                    }
                    o
                })
                .collect();
            Ok(Json::Array(list).to_string())
        },
    )?;

    let h = host.clone();
    n.def(
        "ds_insert",
        move |ctx: Ctx<'js>, coll: String, doc: String| -> rquickjs::Result<String> {
            let doc = parse(&ctx, &doc)?;
            docs::insert(&mut h.db.borrow_mut(), &h.scope, &coll, doc, now_ms())
                .map_err(|e| throw(&ctx, e))
        },
    )?;
    let h = host.clone();
    n.def(
        "ds_find",
        move |ctx: Ctx<'js>,
              coll: String,
              query: String,
              opts: String|
              -> rquickjs::Result<String> {
            let query = parse(&ctx, &query)?;
            let opts = find_options(&ctx, &parse(&ctx, &opts)?)?;
            let found = docs::find(
                h.db.borrow().conn(),
                &h.scope,
                &coll,
                &query,
                &opts,
                &h.budget,
            )
            .map_err(|e| throw(&ctx, e))?;
            Ok(Json::Array(found).to_string())
        },
    )?;
    let h = host.clone();
    n.def(
        "ds_find_one",
        move |ctx: Ctx<'js>, coll: String, query: String| -> rquickjs::Result<Option<String>> {
            let query = parse(&ctx, &query)?;
            let found = docs::find_one(h.db.borrow().conn(), &h.scope, &coll, &query, &h.budget)
                .map_err(|e| throw(&ctx, e))?;
            Ok(found.map(|d| d.to_string()))
        },
    )?;
    let h = host.clone();
    n.def(
        "ds_update",
        move |ctx: Ctx<'js>,
              coll: String,
              query: String,
              changes: String|
              -> rquickjs::Result<f64> {
            let query = parse(&ctx, &query)?;
            let changes = parse(&ctx, &changes)?;
            docs::update(
                &mut h.db.borrow_mut(),
                &h.scope,
                &coll,
                &query,
                &changes,
                now_ms(),
                &h.budget,
            )
            .map(|n| n as f64)
            .map_err(|e| throw(&ctx, e))
        },
    )?;
    let h = host.clone();
    n.def(
        "ds_delete",
        move |ctx: Ctx<'js>, coll: String, query: String| -> rquickjs::Result<f64> {
            let query = parse(&ctx, &query)?;
            docs::delete(&mut h.db.borrow_mut(), &h.scope, &coll, &query, &h.budget)
                .map(|n| n as f64)
                .map_err(|e| throw(&ctx, e))
        },
    )?;
    let h = host.clone();
    n.def(
        "ds_count",
        move |ctx: Ctx<'js>, coll: String, query: String| -> rquickjs::Result<f64> {
            let query = parse(&ctx, &query)?;
            docs::count(h.db.borrow().conn(), &h.scope, &coll, &query, &h.budget)
                .map(|n| n as f64)
                .map_err(|e| throw(&ctx, e))
        },
    )?;

    let h = host.clone();
    n.def(
        "s3_put",
        move |ctx: Ctx<'js>,
              path: String,
              data: ArrayBuffer<'js>,
              mime: Option<String>|
              -> rquickjs::Result<String> {
            // SAFETY: no JavaScript runs while the slice is in use (put only touches SQLite).
            let bytes = unsafe { data.as_bytes() }.ok_or_else(|| {
                Exception::throw_type(&ctx, "s3.put: the ArrayBuffer is detached")
            })?;
            let meta = files::put(
                &mut h.db.borrow_mut(),
                &h.scope,
                &path,
                bytes,
                mime.as_deref(),
                now_ms(),
            )
            .map_err(|e| throw(&ctx, e))?;
            Ok(serde_json::to_string(&meta).expect("metadata serializes"))
        },
    )?;
    let h = host.clone();
    n.def(
        "s3_get",
        move |ctx: Ctx<'js>, path: String| -> rquickjs::Result<Value<'js>> {
            let found =
                files::get(h.db.borrow().conn(), &h.scope, &path).map_err(|e| throw(&ctx, e))?;
            let Some((meta, data)) = found else {
                return Ok(Value::new_null(ctx));
            };
            let pair = Array::new(ctx.clone())?;
            pair.set(
                0,
                serde_json::to_string(&meta).expect("metadata serializes"),
            )?;
            pair.set(1, ArrayBuffer::new(ctx.clone(), data)?)?;
            Ok(pair.into_value())
        },
    )?;
    let h = host.clone();
    n.def(
        "s3_delete",
        move |ctx: Ctx<'js>, path: String| -> rquickjs::Result<bool> {
            files::delete(&mut h.db.borrow_mut(), &h.scope, &path).map_err(|e| throw(&ctx, e))
        },
    )?;
    let h = host.clone();
    n.def(
        "s3_list",
        move |ctx: Ctx<'js>, prefix: String| -> rquickjs::Result<String> {
            let listed = files::list(h.db.borrow().conn(), &h.scope, &prefix, &h.budget)
                .map_err(|e| throw(&ctx, e))?;
            let list: Vec<Json> = listed
                .into_iter()
                .map(|l| {
                    let mut o = serde_json::to_value(&l.meta).expect("metadata serializes");
                    o["path"] = Json::String(l.path);
                    o
                })
                .collect();
            Ok(Json::Array(list).to_string())
        },
    )?;

    let h = host.clone();
    n.def(
        "env_get",
        move |ctx: Ctx<'js>, key: String| -> rquickjs::Result<Option<String>> {
            let vars = h.env().map_err(|e| throw(&ctx, e))?;
            Ok(vars.into_iter().find(|(k, _)| *k == key).map(|(_, v)| v))
        },
    )?;
    let h = host.clone();
    n.def(
        "env_all",
        move |ctx: Ctx<'js>| -> rquickjs::Result<String> {
            let vars = h.env().map_err(|e| throw(&ctx, e))?;
            let map: serde_json::Map<String, Json> = vars
                .into_iter()
                .map(|(k, v)| (k, Json::String(v)))
                .collect();
            Ok(Json::Object(map).to_string())
        },
    )?;

    n.def(
        "random_bytes",
        |ctx: Ctx<'js>, len: f64| -> rquickjs::Result<ArrayBuffer<'js>> {
            if !(0.0..=65536.0).contains(&len) {
                return Err(Exception::throw_range(
                    &ctx,
                    "at most 65536 random bytes at a time",
                ));
            }
            let mut bytes = vec![0u8; len as usize];
            getrandom::fill(&mut bytes)
                .map_err(|e| Exception::throw_internal(&ctx, &format!("no randomness: {e}")))?;
            ArrayBuffer::new(ctx, bytes)
        },
    )?;

    n.def("utf8", |ctx: Ctx<'js>, text: String| {
        ArrayBuffer::new(ctx, text.into_bytes())
    })?;

    let c = code.clone();
    n.def(
        "resolve",
        move |ctx: Ctx<'js>, name: String| -> rquickjs::Result<String> {
            c.resolve("api/main.js", &name)
                .map_err(|e| Exception::throw_message(&ctx, &e))
        },
    )?;
    let c = code.clone();
    n.def("module",
        move |ctx: Ctx<'js>, path: String| -> rquickjs::Result<Value<'js>> {
            let key = format!("cjs:{path}");
            let bytes = c
                    .compiled(&key, &path, |src| {
                        // Wrapped on one line so that line numbers in errors match the
                        // file, and run in the request's scope like the main script.
                        let wrapped = format!(
                            "(function (__fazt_scope) {{ with (__fazt_scope) {{ return function (module, exports, require) {{{src}\n}}; }} }})"
                        );
                        script::compile_classic(&ctx, &path, &wrapped)
                    })
                    .map_err(|e| Exception::throw_message(&ctx, &e.message))?;
            script::run_classic(&ctx, &bytes)
                .map_err(|e| Exception::throw_message(&ctx, &e.message))
        },
    )?;

    ctx.globals().set("__fazt_native", n.obj)?;
    Ok(())
}

fn find_options(ctx: &Ctx<'_>, opts: &Json) -> rquickjs::Result<docs::FindOptions> {
    let mut out = docs::FindOptions::default();
    let Json::Object(o) = opts else {
        return Ok(out);
    };
    let count = |name: &str| -> rquickjs::Result<Option<usize>> {
        match o.get(name) {
            None | Some(Json::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|n| *n >= 0.0 && n.fract() == 0.0)
                .map(|n| Some(n as usize))
                .ok_or_else(|| {
                    Exception::throw_type(ctx, &format!("{name} must be a whole number"))
                }),
        }
    };
    out.limit = count("limit")?;
    out.offset = count("offset")?.unwrap_or(0);
    out.ascending = match o.get("order").and_then(Json::as_str) {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(other) => {
            return Err(Exception::throw_type(
                ctx,
                &format!("order must be \"asc\" or \"desc\", not {other:?}"),
            ))
        }
    };
    Ok(out)
}
