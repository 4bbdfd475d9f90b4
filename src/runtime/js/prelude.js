// The globals every app sees, built on the host functions in `__fazt_native` (src/runtime/
// host.rs). Run once in each context before any request; the host then hands each request
// to __fazt_hooks.begin(callJson, files, body) and runs the app's code.
//
// Two ways to run: ES modules (fetch handlers) get a fresh context per request. Scripts in
// the original style share one context per runtime that is locked down first
// (__fazt_hooks.lockdown): every object reachable from the global object is frozen, and each
// request's code runs inside its own scope object, where its global variables live. So no
// request can leave anything behind for the next one, yet no context is made per request.
// What the host reads back: __fazt_hooks.classic() and __fazt_hooks.fetch(handler) both
// answer { status, headers: [[name, value]], body: string | ArrayBuffer | undefined }.
(function (global) {
  'use strict';
  const native = global.__fazt_native;
  delete global.__fazt_native;
  let info;
  let files = [];
  let rawBody = null;

  const define = (obj, name, value) =>
    Object.defineProperty(obj, name, { value, writable: true, configurable: true, enumerable: false });

  // The web classes (web.js) are loaded on first use: most original-style apps never touch
  // them, and loading them costs more than the rest of a request.
  const webNames = ['URL', 'URLSearchParams', 'Headers', 'Request', 'Response', 'TextEncoder',
    'TextDecoder', 'crypto', '__fazt_web'];
  let webLoaded = false;
  const loadWeb = () => {
    webLoaded = true;
    for (const name of webNames) delete global[name];
    global.__fazt_native = { randomBytes: native.random_bytes };
    try { native.load_web(); } finally { delete global.__fazt_native; }
  };
  for (const name of webNames) {
    Object.defineProperty(global, name, {
      configurable: true,
      enumerable: false,
      get() { loadWeb(); return global[name]; },
      set(value) { loadWeb(); global[name] = value; },
    });
  }

  // console.*: one line per call, kept in the app's log (`fazt app logs`).
  const show = (v) => {
    if (typeof v === 'string') return v;
    if (v instanceof Error) return v.stack ? `${v.name}: ${v.message}\n${v.stack}` : String(v);
    if (typeof v === 'function') return `[function ${v.name || 'anonymous'}]`;
    if (typeof v === 'undefined') return 'undefined';
    if (typeof v === 'bigint' || typeof v === 'symbol') return v.toString();
    try {
      const s = JSON.stringify(v);
      return s === undefined ? String(v) : s;
    } catch (e) {
      return String(v);
    }
  };
  const logger = (level) => (...args) => native.log(level, args.map(show).join(' '));
  const console = {
    log: logger('info'), info: logger('info'), debug: logger('debug'),
    warn: logger('warn'), error: logger('error'), trace: logger('debug'),
  };
  define(global, 'console', console);

  // Storage: values travel to the host as JSON text.
  const str = (v) => JSON.stringify(v === undefined ? null : v);
  const kv = {
    set(key, value, ttlMs) {
      if (value === undefined) throw new TypeError('kv.set needs a value');
      native.kv_set(String(key), str(value), ttlMs === undefined || ttlMs === null ? undefined : Number(ttlMs));
    },
    get: (key) => { const v = native.kv_get(String(key)); return v == null ? null : JSON.parse(v); },
    delete: (key) => native.kv_delete(String(key)),
    list: (prefix) => JSON.parse(native.kv_list(prefix === undefined ? '' : String(prefix))),
  };
  const ds = {
    insert: (collection, doc) => native.ds_insert(String(collection), str(doc)),
    find: (collection, query, options) =>
      JSON.parse(native.ds_find(String(collection), str(query), str(options || {}))),
    findOne(collection, query) {
      const v = native.ds_find_one(String(collection), str(query));
      return v == null ? null : JSON.parse(v);
    },
    update: (collection, query, changes) => native.ds_update(String(collection), str(query), str(changes)),
    delete: (collection, query) => native.ds_delete(String(collection), str(query)),
    count: (collection, query) => native.ds_count(String(collection), str(query)),
  };
  const bytes = (data) => {
    if (typeof data === 'string') return native.utf8(data);
    if (data instanceof ArrayBuffer) return data;
    if (ArrayBuffer.isView(data)) return data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength);
    throw new TypeError('s3.put needs a string, an ArrayBuffer or a typed array');
  };
  const s3 = {
    put: (path, data, mime) => JSON.parse(native.s3_put(String(path), bytes(data), mime === undefined ? undefined : String(mime))),
    get(path) {
      const found = native.s3_get(String(path));
      if (found == null) return null;
      const meta = JSON.parse(found[0]);
      meta.data = found[1];
      return meta;
    },
    delete: (path) => native.s3_delete(String(path)),
    list: (prefix) => JSON.parse(native.s3_list(prefix === undefined ? '' : String(prefix))),
  };
  const loginRequired = (api) => {
    const out = {};
    for (const name of Object.keys(api)) {
      out[name] = () => { throw new Error('login required: fazt.app.user.* needs a logged-in user'); };
    }
    return out;
  };
  const app = { kv, ds, s3 };
  Object.defineProperty(app, 'id', { get: () => info.app.id, enumerable: true });
  Object.defineProperty(app, 'name', { get: () => info.app.name, enumerable: true });
  app.user = { kv: loginRequired(kv), ds: loginRequired(ds), s3: loginRequired(s3) };
  const env = {
    get(key, fallback) { const v = native.env_get(String(key)); return v == null ? (fallback === undefined ? null : fallback) : v; },
    has: (key) => native.env_get(String(key)) != null,
  };
  const fazt = { app, storage: { kv, ds, s3 }, env, log: console };
  Object.defineProperty(fazt, 'version', { get: () => info.version, enumerable: true });
  define(global, 'fazt', fazt);
  let request;
  Object.defineProperty(global, 'request', { get: () => request, enumerable: false, configurable: false });

  class Reply {
    constructor(status, body, headers) {
      this.status = status;
      this.body = body;
      this.headers = headers || {};
    }
  }
  let responded;
  const respond = function (a, b, c) {
    const statusFirst = typeof a === 'number' && (arguments.length >= 2 || (Number.isInteger(a) && a >= 100 && a <= 599));
    responded = statusFirst ? new Reply(a, b, c) : new Reply(200, a, b);
    return responded;
  };
  define(global, 'respond', respond);

  const checkStatus = (status) => {
    if (!Number.isInteger(status) || status < 200 || status > 599) {
      throw new RangeError(`respond: status ${status} is not between 200 and 599`);
    }
  };
  const headerPairs = (headers) => {
    if (headers === undefined || headers === null) return [];
    if (webLoaded && headers instanceof global.Headers) return [...headers];
    if (Array.isArray(headers)) return headers.map(([k, v]) => [String(k), String(v)]);
    return Object.keys(headers).map((k) => [k, String(headers[k])]);
  };
  const hasType = (pairs) => pairs.some(([k]) => k.toLowerCase() === 'content-type');
  // A respond() value (or any returned value) as the host's answer.
  const finishClassic = (value) => {
    const reply = value instanceof Reply ? value : responded !== undefined ? responded
      : value === undefined ? new Reply(204, undefined) : new Reply(200, value);
    checkStatus(reply.status);
    const headers = headerPairs(reply.headers);
    let body = reply.body;
    if (body === undefined) {
      body = undefined;
    } else if (typeof body === 'string') {
      if (!hasType(headers)) headers.push(['content-type', 'text/plain; charset=utf-8']);
    } else if (body instanceof ArrayBuffer || ArrayBuffer.isView(body)) {
      body = bytes(body);
      if (!hasType(headers)) headers.push(['content-type', 'application/octet-stream']);
    } else {
      body = JSON.stringify(body);
      if (body === undefined) body = 'null';
      if (!hasType(headers)) headers.push(['content-type', 'application/json']);
    }
    return { status: reply.status, headers, body };
  };
  const then = (value, f) => (value && typeof value.then === 'function' ? value.then(f) : f(value));

  const __fazt_hooks_object = {
    // The request: the original API's `request` global, and what the fetch handler gets.
    begin(callJson, uploads, body) {
      info = JSON.parse(callJson);
      files = uploads || [];
      rawBody = body || null;
      responded = undefined;
      modules = {};
      request = info.request;
      request.files = (request.files || []).map((f, i) => Object.assign(f, { data: files[i] }));
      scope = makeScope();
    },
    // Runs the app's script (compiled as `(function (scope) { with (scope) return function
    // () { ...body... }; })`) in this request's scope.
    classic() {
      const body = main(scope.proxy);
      return then(body.call(scope.proxy), finishClassic);
    },
    lockdown,
    fetch(handler) {
      if (!handler || typeof handler.fetch !== 'function') {
        throw new TypeError('api/main.js: the default export must be an object with a fetch(request, env, ctx) method');
      }
      const r = info.request;
      const req = global.__fazt_web.makeRequest(r.method, info.url, info.headerPairs, rawBody);
      const vars = JSON.parse(native.env_all());
      const bindings = Object.assign(vars, { app, fazt });
      const ctx = { waitUntil() {}, passThroughOnException() {} };
      return then(handler.fetch(req, bindings, ctx), (res) => global.__fazt_web.readResponse(res));
    },
  };
  define(global, '__fazt_hooks', __fazt_hooks_object);
  // CommonJS for original apps: require('./lib.js') loads api/lib.js (once per request, in
  // the request's scope like the main script).
  let modules = {};
  define(global, 'require', function require(name) {
    const path = native.resolve(String(name));
    if (modules[path]) return modules[path].exports;
    const module = { exports: {} };
    modules[path] = module;
    native.module(path)(scope.proxy).call(scope.proxy, module, module.exports, require);
    return module.exports;
  });

  // A request's global scope: names the script assigns without declaring them, and what it
  // puts on `globalThis`, live here; everything else reads through to the (frozen) global.
  let scope;
  // One handler for every scope; each request's scope is a new Proxy over a new object (a
  // scope kept past its request never sees another request's variables).
  const scopeHandler = {
    has: (own, key) => key !== Symbol.unscopables,
    get(own, key, proxy) {
      if (key === Symbol.unscopables) return undefined;
      if (key in own) return own[key];
      if (key === 'globalThis' || key === 'self' || key === 'global') return proxy;
      return global[key];
    },
    set(own, key, value) { own[key] = value; return true; },
    deleteProperty: (own, key) => delete own[key],
    defineProperty: (own, key, desc) => Reflect.defineProperty(own, key, desc),
    getOwnPropertyDescriptor: (own, key) => Reflect.getOwnPropertyDescriptor(own, key),
    ownKeys: (own) => Reflect.ownKeys(own),
  };
  const makeScope = () => ({ proxy: new Proxy(Object.create(null), scopeHandler) });

  // Freezes everything reachable from the global object (and `extra`), so that requests
  // sharing this context cannot change what the next one sees. Assigning to a property that
  // a frozen prototype also has (`err.name = ...` in an Error subclass, `obj.toString = ...`)
  // would then fail; for the properties programs commonly set that way, the prototype's
  // property becomes an accessor that defines the property on the object being assigned to.
  let main;
  function lockdown(script) {
    if (!webLoaded) loadWeb();
    main = script;
    const overridable = (proto, names) => {
      for (const name of names) {
        const d = Object.getOwnPropertyDescriptor(proto, name);
        if (!d || !('value' in d) || !d.configurable) continue;
        const value = d.value;
        Object.defineProperty(proto, name, {
          configurable: false,
          enumerable: d.enumerable,
          get() { return value; },
          set(v) {
            if (this === proto) throw new TypeError(`cannot change built-in ${name}`);
            Object.defineProperty(this, name, { value: v, writable: true, enumerable: true, configurable: true });
          },
        });
      }
    };
    overridable(Object.prototype, Reflect.ownKeys(Object.prototype).filter((k) => k !== '__proto__'));
    for (const E of [Error, TypeError, RangeError, SyntaxError, ReferenceError, EvalError, URIError, AggregateError]) {
      overridable(E.prototype, ['constructor', 'name', 'message', 'toString']);
    }
    overridable(Function.prototype, ['constructor', 'name', 'toString', 'apply', 'call', 'bind']);
    for (const name of Reflect.ownKeys(global)) {
      const v = Object.getOwnPropertyDescriptor(global, name).value;
      if (typeof v === 'function' && v.prototype && v.prototype !== Object.prototype && v.prototype !== Function.prototype) {
        overridable(v.prototype, ['constructor', 'toString']);
      }
    }
    const seen = new Set();
    const stack = [global, script, __fazt_hooks_object, scopeHandler];
    while (stack.length > 0) {
      const o = stack.pop();
      if (o === null || (typeof o !== 'object' && typeof o !== 'function') || seen.has(o)) continue;
      seen.add(o);
      Object.freeze(o);
      stack.push(Object.getPrototypeOf(o));
      for (const key of Reflect.ownKeys(o)) {
        const d = Object.getOwnPropertyDescriptor(o, key);
        if (!d) continue;
        if ('value' in d) stack.push(d.value);
        else stack.push(d.get, d.set);
      }
    }
  }
})(globalThis);
