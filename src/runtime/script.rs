//! Compiling JavaScript to QuickJS bytecode once and running it in many contexts.
//!
//! Scripts in the original fazt style run as classic (sloppy-mode) scripts, as they did
//! there; rquickjs compiles only modules to bytecode, so classic scripts go through the
//! QuickJS C API here. ES modules (fetch handlers and what they import) use rquickjs's
//! `Module` with its bytecode writer.

use std::ffi::CString;

use rquickjs::{qjs, Ctx, Module, Value};

/// A compile or run failure, already formatted (message and stack).
#[derive(Debug, Clone)]
pub struct JsError {
    pub message: String,
    pub stack: Option<String>,
}

impl JsError {
    pub fn new(message: impl Into<String>) -> JsError {
        JsError {
            message: message.into(),
            stack: None,
        }
    }
}

impl std::fmt::Display for JsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The pending exception of `ctx` (or the error itself when it is not a JS exception).
pub fn caught(ctx: &Ctx<'_>, err: rquickjs::Error) -> JsError {
    if !err.is_exception() {
        return JsError::new(err.to_string());
    }
    let value = ctx.catch();
    describe(&value)
}

/// A thrown value as a message and, for errors, a stack.
pub fn describe(value: &Value<'_>) -> JsError {
    if let Some(obj) = value.as_object() {
        let name: Option<String> = obj.get("name").ok();
        let message: Option<String> = obj.get("message").ok();
        let stack: Option<String> = obj.get("stack").ok();
        if let Some(message) = message {
            let message = match name {
                Some(n) if !n.is_empty() => format!("{n}: {message}"),
                _ => message,
            };
            return JsError {
                message,
                stack: stack.filter(|s| !s.is_empty()),
            };
        }
    }
    let text = value
        .as_string()
        .and_then(|s| s.to_string().ok())
        .or_else(|| {
            value
                .ctx()
                .json_stringify(value.clone())
                .ok()
                .flatten()
                .and_then(|s| s.to_string().ok())
        })
        .unwrap_or_else(|| format!("{:?}", value.type_of()));
    JsError::new(format!("uncaught {text}"))
}

/// Compiles a classic script to bytecode without running it.
pub fn compile_classic(ctx: &Ctx<'_>, name: &str, source: &str) -> Result<Vec<u8>, JsError> {
    let source_c = CString::new(source)
        .map_err(|_| JsError::new(format!("{name}: contains a NUL character")))?;
    let name_c =
        CString::new(name).map_err(|_| JsError::new("file name contains a NUL character"))?;
    let raw = ctx.as_raw().as_ptr();
    let flags = (qjs::JS_EVAL_TYPE_GLOBAL | qjs::JS_EVAL_FLAG_COMPILE_ONLY) as i32;
    // SAFETY: `raw` is the live context of `ctx`; the source is NUL-terminated as JS_Eval
    // requires and outlives the call; the compiled function is freed below and the buffer
    // JS_WriteObject returns is copied, then released with js_free.
    unsafe {
        let compiled = qjs::JS_Eval(
            raw,
            source_c.as_ptr(),
            source.len() as _,
            name_c.as_ptr(),
            flags,
        );
        if qjs::JS_IsException(compiled) {
            return Err(caught(ctx, rquickjs::Error::Exception));
        }
        let mut len = 0;
        let buf = qjs::JS_WriteObject(raw, &mut len, compiled, qjs::JS_WRITE_OBJ_BYTECODE as i32);
        qjs::JS_FreeValue(raw, compiled);
        if buf.is_null() {
            return Err(caught(ctx, rquickjs::Error::Exception));
        }
        let bytes = std::slice::from_raw_parts(buf, len as usize).to_vec();
        qjs::js_free(raw, buf.cast());
        Ok(bytes)
    }
}

/// Runs a classic script compiled by [`compile_classic`]; returns its completion value.
pub fn run_classic<'js>(ctx: &Ctx<'js>, bytecode: &[u8]) -> Result<Value<'js>, JsError> {
    let raw = ctx.as_raw().as_ptr();
    // SAFETY: the bytes come from compile_classic in this process (trusted bytecode);
    // JS_ReadObject copies them; JS_EvalFunction takes ownership of the function object,
    // and the returned value's ownership passes to rquickjs's Value.
    unsafe {
        let function = qjs::JS_ReadObject(
            raw,
            bytecode.as_ptr(),
            bytecode.len() as _,
            qjs::JS_READ_OBJ_BYTECODE as i32,
        );
        if qjs::JS_IsException(function) {
            return Err(caught(ctx, rquickjs::Error::Exception));
        }
        let result = qjs::JS_EvalFunction(raw, function);
        if qjs::JS_IsException(result) {
            return Err(caught(ctx, rquickjs::Error::Exception));
        }
        Ok(Value::from_raw(ctx.clone(), result))
    }
}

/// Compiles an ES module to bytecode.
pub fn compile_module(ctx: &Ctx<'_>, name: &str, source: &str) -> Result<Vec<u8>, JsError> {
    let module = Module::declare(ctx.clone(), name, source).map_err(|e| caught(ctx, e))?;
    module
        .write(rquickjs::module::WriteOptions::default())
        .map_err(|e| caught(ctx, e))
}

/// Whether a source file is an ES module (it imports or exports) rather than a classic script.
pub fn is_module(source: &str) -> bool {
    source.lines().any(|line| {
        let l = line.trim_start();
        l.starts_with("export ")
            || l.starts_with("export{")
            || l.starts_with("import ")
            || l.starts_with("import{")
    })
}
