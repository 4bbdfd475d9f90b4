//! An app's worker thread: its QuickJS runtime, its code, and one request at a time.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use rquickjs::loader::{Loader, Resolver};
use rquickjs::module::Declared;
use rquickjs::{Array, ArrayBuffer, Context, Ctx, Function, Module, Object, Promise, Value};

use super::host::{self, Code, Host};
use super::script::{self, JsError};
use super::{request, Call, Job, Limits, Reply};
use crate::db::Database;

const WEB_JS: &str = include_str!("js/web.js");
const PRELUDE_JS: &str = include_str!("js/prelude.js");
/// The built-in scripts as bytecode, compiled once per process (bytecode is plain bytes that
/// any runtime reads).
static WEB: std::sync::OnceLock<Result<Vec<u8>, JsError>> = std::sync::OnceLock::new();
static PRELUDE: std::sync::OnceLock<Result<Vec<u8>, JsError>> = std::sync::OnceLock::new();

fn shared_bytecode(
    cell: &'static std::sync::OnceLock<Result<Vec<u8>, JsError>>,
    name: &str,
    source: &str,
) -> Result<Rc<Vec<u8>>, JsError> {
    let compiled = cell.get_or_init(|| {
        let rt = rquickjs::Runtime::new().map_err(|e| JsError::new(e.to_string()))?;
        let ctx = Context::full(&rt).map_err(|e| JsError::new(e.to_string()))?;
        ctx.with(|ctx| script::compile_classic(&ctx, name, source))
    });
    compiled.clone().map(Rc::new)
}
/// A worker with nothing to do for this long exits (its memory goes back to the system).
const IDLE_EXIT: Duration = Duration::from_secs(300);
/// SQLite virtual-machine steps between two checks of the request's deadline.
const SQLITE_CHECK_EVERY: std::ffi::c_int = 10_000;
/// Console lines wait at most this long before being written to the log table.
const LOG_FLUSH: Duration = Duration::from_millis(200);

pub(super) fn run(
    app_id: String,
    db: Database,
    limits: Limits,
    queue: Arc<Mutex<Receiver<Job>>>,
    logs: Sender<LogBatch>,
) {
    let mut worker = match Worker::open(&app_id, &db, limits) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(app = %app_id, error = %format!("{e:#}"), "cannot start the app's runtime");
            let rx = queue.lock().unwrap_or_else(|e| e.into_inner());
            while let Ok(job) = rx.try_recv() {
                let _ = job
                    .reply
                    .send(Reply::error(500, "the app's runtime could not be started"));
            }
            return;
        }
    };
    loop {
        // The workers of an app take turns waiting on its queue.
        let next = queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .recv_timeout(IDLE_EXIT);
        let Ok(job) = next else {
            break;
        };
        let reply = worker.handle(job.call, job.queued);
        // The request's lines go to the log writer before its answer goes out, so a client
        // that sends one request after another finds their lines in that order in the log.
        let lines = worker.host.take_logs();
        if !lines.is_empty() {
            let _ = logs.send(LogBatch {
                app_id: app_id.clone(),
                lines,
            });
        }
        let _ = job.reply.send(reply);
        worker.prepare_next();
    }
}

/// Console lines of one request, on their way to the log table.
pub(super) struct LogBatch {
    app_id: String,
    lines: Vec<(i64, String, String)>,
}

/// Writes app log lines in batches (at most every `LOG_FLUSH`), off the request path.
pub(super) fn write_logs(db: Database, rx: Receiver<LogBatch>) {
    while let Ok(first) = rx.recv() {
        let mut batches = vec![first];
        let until = Instant::now() + LOG_FLUSH;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(b) => batches.push(b),
                Err(_) => break,
            }
        }
        let mut by_app: HashMap<String, Vec<(i64, String, String)>> = HashMap::new();
        for b in batches {
            by_app.entry(b.app_id).or_default().extend(b.lines);
        }
        for (app, lines) in by_app {
            let saved = db.write_local_blocking(|w| {
                w.write(|tx| crate::storage::logs::append(tx, &app, &lines))
            });
            if let Err(e) = saved {
                tracing::warn!(app = %app, error = %format!("{e:#}"), "app log lines were not saved");
            }
        }
    }
}

/// The QuickJS side of a worker: one runtime, rebuilt when the app's version changes (so
/// bytecode of an old version never outlives it) or after the heap overflowed.
struct Engine {
    rt: rquickjs::Runtime,
    code: Rc<Code>,
    web: Rc<Vec<u8>>,
    prelude: Rc<Vec<u8>>,
    /// For ES modules: a context made ahead of the next request (no request has run in it).
    ready: RefCell<Option<Context>>,
    /// For scripts: the runtime's one locked-down context, made on the first request.
    shared: RefCell<Option<Context>>,
}

/// The locked-down context scripts share (see prelude.js), made with the runtime.
fn shared(engine: &Engine, host: &Rc<Host>) -> Result<Context, JsError> {
    if let Some(ctx) = engine.shared.borrow().as_ref() {
        return Ok(ctx.clone());
    }
    lock_down(engine, prepare(engine, host)?)
}

/// Compiles the app's script into `ctx`, freezes the context and keeps it as the shared one.
fn lock_down(engine: &Engine, ctx: Context) -> Result<Context, JsError> {
    ctx.with(|ctx| -> Result<(), JsError> {
        let fail = |e: rquickjs::Error| script::caught(&ctx, e);
        let bytes = engine.code.compiled("main", "api/main.js", |src| {
            // The body runs as a function (so a top-level `return` works) inside the
            // request's scope object.
            let wrapped = format!(
                "(function (__fazt_scope) {{ with (__fazt_scope) {{ return function () {{{src}\n}}; }} }})"
            );
            script::compile_classic(&ctx, "api/main.js", &wrapped)
        })?;
        let main = script::run_classic(&ctx, &bytes)?;
        let hooks: Object = ctx.globals().get("__fazt_hooks").map_err(fail)?;
        let lockdown: Function = hooks.get("lockdown").map_err(fail)?;
        lockdown.call::<_, ()>((main,)).map_err(fail)?;
        Ok(())
    })?;
    *engine.shared.borrow_mut() = Some(ctx.clone());
    Ok(ctx)
}

/// A fresh context with the host functions and the prelude, waiting for a request.
fn prepare(engine: &Engine, host: &Rc<Host>) -> Result<Context, JsError> {
    let ctx =
        Context::full(&engine.rt).map_err(|e| JsError::new(format!("creating a context: {e}")))?;
    ctx.with(|ctx| -> Result<(), JsError> {
        host::install(&ctx, host, &engine.code, &engine.web)
            .map_err(|e| script::caught(&ctx, e))?;
        script::run_classic(&ctx, &engine.prelude)?;
        if engine.code.module {
            // Fetch handlers always use the web classes: load them now, ahead of the request.
            let _: Value = ctx
                .globals()
                .get("__fazt_web")
                .map_err(|e| script::caught(&ctx, e))?;
        }
        Ok(())
    })?;
    Ok(ctx)
}

struct Worker {
    app_id: String,
    limits: Limits,
    host: Rc<Host>,
    engine: Option<Engine>,
    /// Nanoseconds after `epoch` when the running request must stop (0: none running).
    deadline: Arc<AtomicU64>,
    epoch: Instant,
}

/// Why a request failed, and how it is answered.
enum Failure {
    Script(JsError),
    Timeout,
    OutOfMemory,
}

impl Worker {
    fn open(app_id: &str, db: &Database, limits: Limits) -> Result<Worker> {
        let deadline = Arc::new(AtomicU64::new(0));
        let epoch = Instant::now();
        let d = deadline.clone();
        let expired = move || {
            let at = d.load(Ordering::Relaxed);
            at != 0 && epoch.elapsed().as_nanos() as u64 >= at
        };
        // Host calls check the deadline between rows; SQLite's own loops (a scan that
        // skips many rows) are stopped by the progress handler.
        let in_sqlite = expired.clone();
        let db = db.engine_with(move |conn| {
            conn.progress_handler(SQLITE_CHECK_EVERY, Some(in_sqlite))?;
            Ok(())
        })?;
        let budget = crate::storage::Budget::new(Arc::new(expired));
        Ok(Worker {
            app_id: app_id.to_string(),
            limits,
            host: Rc::new(Host::new(db, app_id, budget)),
            engine: None,
            deadline,
            epoch,
        })
    }

    /// Makes the next request's context now, while no request waits on it.
    fn prepare_next(&mut self) {
        if let Some(engine) = &self.engine {
            if engine.code.module && engine.ready.borrow().is_none() {
                match prepare(engine, &self.host) {
                    Ok(ctx) => *engine.ready.borrow_mut() = Some(ctx),
                    Err(e) => tracing::warn!(app = %self.app_id, error = %e, "preparing a context"),
                }
            }
        }
    }

    fn handle(&mut self, call: Call, queued: Instant) -> Reply {
        if queued.elapsed() >= self.limits.time {
            return Reply::error(
                503,
                "the app is busy: the request waited longer than its time limit",
            );
        }
        let reply = match self.answer(call) {
            Ok(reply) => reply,
            Err(Failure::Script(e)) => {
                let detail = match e.stack.as_deref().map(str::trim_end) {
                    Some(stack) => format!("{}\n{stack}", e.message),
                    None => e.message.clone(),
                };
                self.host.log_always("error", &detail);
                Reply::error(500, &e.message)
            }
            Err(Failure::Timeout) => {
                let msg = format!(
                    "the request ran longer than the app's time limit ({} s)",
                    self.limits.time.as_secs_f64()
                );
                self.host.log_always("error", &msg);
                Reply::error(503, &msg)
            }
            Err(Failure::OutOfMemory) => {
                // The heap may be in any state: start from a fresh runtime.
                self.engine = None;
                let msg = format!(
                    "the app ran out of memory (limit {} MB)",
                    self.limits.memory >> 20
                );
                self.host.log_always("error", &msg);
                Reply::error(500, &msg)
            }
        };
        reply
    }

    /// The engine for `version`, loading its code when the version changed.
    fn engine(&mut self, version: &Arc<str>) -> Result<&Engine, JsError> {
        if self
            .engine
            .as_ref()
            .is_some_and(|e| &e.code.version != version)
        {
            self.engine = None;
        }
        if self.engine.is_none() {
            let files = load_code(self.host.db.borrow().conn(), version)
                .map_err(|e| JsError::new(format!("loading the app's code: {e:#}")))?;
            let module = files
                .get("api/main.js")
                .is_some_and(|m| script::is_module(m));
            let code = Rc::new(Code {
                version: version.clone(),
                files,
                module,
                bytecode: RefCell::new(HashMap::new()),
            });
            // scripts/bench-js reads this line: what a fresh runtime with a context costs, and
            // for scripts the lockdown of the shared context on top.
            let started = Instant::now();
            let engine = new_engine(&self.limits, code, &self.deadline, self.epoch)?;
            let ctx = prepare(&engine, &self.host)?;
            let context_micros = started.elapsed().as_micros() as u64;
            let lockdown = Instant::now();
            if engine.code.module {
                *engine.ready.borrow_mut() = Some(ctx);
            } else {
                lock_down(&engine, ctx)?;
            }
            tracing::debug!(
                app = %self.app_id,
                runtime_and_context_micros = context_micros,
                lockdown_micros = lockdown.elapsed().as_micros() as u64,
                "fresh runtime ready"
            );
            self.engine = Some(engine);
        }
        Ok(self.engine.as_ref().expect("just made"))
    }

    fn answer(&mut self, mut call: Call) -> Result<Reply, Failure> {
        let version = call.version.clone();
        let deadline = self.deadline.clone();
        let epoch = self.epoch;
        let time = self.limits.time;
        let memory = self.limits.memory;
        let host = self.host.clone();
        host.begin_request();
        let engine = self.engine(&version).map_err(Failure::Script)?;
        let module = engine.code.module;
        let multipart = call.multipart.take();
        let (info, files) = match request::describe(&call, multipart, !module) {
            Ok(v) => v,
            Err(reply) => return Ok(reply),
        };
        // ES modules get a fresh context (made ahead of time); scripts share the runtime's
        // locked-down one.
        let ctx = if module {
            match engine.ready.borrow_mut().take() {
                Some(ctx) => ctx,
                None => prepare(engine, &host).map_err(Failure::Script)?,
            }
        } else {
            shared(engine, &host).map_err(Failure::Script)?
        };
        // Past this point the interrupt handler stops the script (its exception says only
        // "interrupted", so a failure after the deadline is reported as a timeout).
        let started = epoch.elapsed() + time;
        deadline.store(started.as_nanos() as u64, Ordering::Relaxed);
        let result = ctx.with(|ctx| -> Result<Reply, JsError> {
            let fail = |e: rquickjs::Error| script::caught(&ctx, e);
            let list = if files.is_empty() {
                Value::new_null(ctx.clone())
            } else {
                let list = Array::new(ctx.clone()).map_err(fail)?;
                for (i, f) in files.iter().enumerate() {
                    list.set(i, ArrayBuffer::new_copy(ctx.clone(), &f[..]).map_err(fail)?)
                        .map_err(fail)?;
                }
                list.into_value()
            };
            let body = if module && !call.body.is_empty() {
                ArrayBuffer::new_copy(ctx.clone(), &call.body[..])
                    .map_err(fail)?
                    .into_value()
            } else {
                Value::new_null(ctx.clone())
            };
            let hooks: Object = ctx.globals().get("__fazt_hooks").map_err(fail)?;
            let begin: Function = hooks.get("begin").map_err(fail)?;
            begin.call::<_, ()>((info, list, body)).map_err(fail)?;
            let result: Value = if module {
                let bytes = engine
                    .code
                    .compiled("esm:api/main.js", "api/main.js", |src| {
                        script::compile_module(&ctx, "api/main.js", src)
                    })?;
                // SAFETY: the bytecode was compiled in this process from the app's source and
                // lives in `engine.code` as long as the runtime does (the engine is dropped
                // whole when the version changes).
                let declared = unsafe { Module::load(ctx.clone(), &bytes) }.map_err(fail)?;
                let (evaluated, done) = declared.eval().map_err(fail)?;
                settle(&ctx, done.into_value())?;
                let default: Value = evaluated.get("default").map_err(fail)?;
                let fetch: Function = hooks.get("fetch").map_err(fail)?;
                fetch.call((default,)).map_err(fail)?
            } else {
                let classic: Function = hooks.get("classic").map_err(fail)?;
                classic.call(()).map_err(fail)?
            };
            let answer = settle(&ctx, result);
            // Work the request left queued runs now, under its deadline, not in the next one.
            while ctx.execute_pending_job() {}
            read_reply(&ctx, answer?)
        });
        deadline.store(0, Ordering::Relaxed);
        drop(ctx);
        match result {
            Ok(reply) => Ok(reply),
            Err(_) if epoch.elapsed() >= started => Err(Failure::Timeout),
            Err(e)
                if e.message.contains("out of memory")
                    || engine.rt.memory_usage().malloc_size as usize
                        >= memory.saturating_sub(64 << 10) =>
            {
                Err(Failure::OutOfMemory)
            }
            Err(e) => Err(Failure::Script(e)),
        }
    }
}

/// Runs queued jobs until `value` (if a promise) settles; returns what it resolved to.
fn settle<'js>(ctx: &Ctx<'js>, value: Value<'js>) -> Result<Value<'js>, JsError> {
    let Some(promise) = value.as_promise().cloned() else {
        return Ok(value);
    };
    settle_promise(ctx, promise)
}

fn settle_promise<'js>(ctx: &Ctx<'js>, promise: Promise<'js>) -> Result<Value<'js>, JsError> {
    match promise.finish::<Value>() {
        Ok(v) => Ok(v),
        Err(rquickjs::Error::WouldBlock) => {
            Err(JsError::new("the handler's promise never settled"))
        }
        Err(e) => Err(script::caught(ctx, e)),
    }
}

/// `{ status, headers: [[k, v]], body }` from the prelude, as a reply.
fn read_reply<'js>(ctx: &Ctx<'js>, answer: Value<'js>) -> Result<Reply, JsError> {
    let fail = |e: rquickjs::Error| script::caught(ctx, e);
    let obj = answer
        .as_object()
        .ok_or_else(|| JsError::new("the app's answer is not an object"))?;
    let status: f64 = obj.get("status").map_err(fail)?;
    if !(200.0..=599.0).contains(&status) {
        return Err(JsError::new(format!(
            "the app answered status {status}, not a status between 200 and 599 (Response.error()?)"
        )));
    }
    let pairs: Vec<Vec<String>> = obj.get("headers").map_err(fail)?;
    let mut headers = Vec::with_capacity(pairs.len());
    for pair in pairs {
        if let [k, v] = &pair[..] {
            headers.push((k.clone(), v.clone()));
        }
    }
    let body: Value = obj.get("body").map_err(fail)?;
    let body = if body.is_undefined() || body.is_null() {
        Vec::new()
    } else if let Some(s) = body.as_string() {
        s.to_string().map_err(fail)?.into_bytes()
    } else if let Some(buf) = ArrayBuffer::from_value(body.clone()) {
        // SAFETY: the bytes are copied before any JavaScript runs again.
        unsafe { buf.as_bytes() }
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    } else {
        return Err(JsError::new("the response body must be a string or bytes"));
    };
    Ok(Reply {
        status: status as u16,
        headers,
        body,
    })
}

fn new_engine(
    limits: &Limits,
    code: Rc<Code>,
    deadline: &Arc<AtomicU64>,
    epoch: Instant,
) -> Result<Engine, JsError> {
    let rt =
        rquickjs::Runtime::new().map_err(|e| JsError::new(format!("creating a runtime: {e}")))?;
    rt.set_memory_limit(limits.memory);
    rt.set_max_stack_size(1 << 20);
    let d = deadline.clone();
    rt.set_interrupt_handler(Some(Box::new(move || {
        let at = d.load(Ordering::Relaxed);
        at != 0 && epoch.elapsed().as_nanos() as u64 >= at
    })));
    rt.set_loader(
        ApiResolver { code: code.clone() },
        ApiLoader { code: code.clone() },
    );
    Ok(Engine {
        rt,
        code,
        web: shared_bytecode(&WEB, "fazt:web.js", WEB_JS)?,
        prelude: shared_bytecode(&PRELUDE, "fazt:prelude.js", PRELUDE_JS)?,
        ready: RefCell::new(None),
        shared: RefCell::new(None),
    })
}

/// The app's api/ files of one version.
fn load_code(conn: &rusqlite::Connection, version: &str) -> Result<HashMap<String, String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT f.path, b.data FROM version_files f JOIN blobs b ON b.hash = f.hash
         WHERE f.version_id = ?1 AND f.path LIKE 'api/%' AND (f.path LIKE '%.js' OR f.path LIKE '%.mjs')",
    )?;
    let rows = stmt.query_map([version], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
    })?;
    let mut files = HashMap::new();
    for row in rows {
        let (path, data) = row?;
        let text = String::from_utf8(data).with_context(|| format!("{path} is not UTF-8 text"))?;
        files.insert(path, text);
    }
    Ok(files)
}

/// `import "./x.js"` from app code: files under api/ of the same version only.
struct ApiResolver {
    code: Rc<Code>,
}

impl Resolver for ApiResolver {
    fn resolve<'js>(
        &mut self,
        _ctx: &Ctx<'js>,
        base: &str,
        name: &str,
        _attributes: Option<rquickjs::loader::ImportAttributes<'js>>,
    ) -> rquickjs::Result<String> {
        self.code
            .resolve(base, name)
            .map_err(|msg| rquickjs::Error::new_resolving_message(base, name, msg))
    }
}

struct ApiLoader {
    code: Rc<Code>,
}

impl Loader for ApiLoader {
    fn load<'js>(
        &mut self,
        ctx: &Ctx<'js>,
        name: &str,
        _attributes: Option<rquickjs::loader::ImportAttributes<'js>>,
    ) -> rquickjs::Result<Module<'js, Declared>> {
        let bytes = self
            .code
            .compiled(&format!("esm:{name}"), name, |src| {
                script::compile_module(ctx, name, src)
            })
            .map_err(|e| rquickjs::Error::new_loading_message(name, e.message))?;
        // SAFETY: bytecode compiled in this process, kept by `code` for the runtime's life.
        unsafe { Module::load(ctx.clone(), &bytes) }
    }
}
