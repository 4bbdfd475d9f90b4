/*
 * Web platform classes for Fazt's serverless runtime.
 *
 * QuickJS implements the ECMAScript language but not the web platform. This
 * classic script runs in every fresh context before app code and adds what
 * "web-standard" apps (`export default { fetch(request, env, ctx) }`) rely
 * on: URL, URLSearchParams, Headers, Request, Response, TextEncoder,
 * TextDecoder, atob, btoa, DOMException and crypto (getRandomValues,
 * randomUUID). Each global is installed only if the engine lacks it. Inside
 * this file the classes use each other directly, never through globals that
 * app code could replace.
 *
 * Deliberate limits:
 *  - Bodies are buffered bytes. Request and Response have no `body` stream
 *    property; read them with text(), json(), arrayBuffer(), bytes() or
 *    formData(). Blob, FormData and ReadableStream bodies are not supported
 *    (other objects are stringified, as WebIDL does).
 *  - formData() parses only application/x-www-form-urlencoded bodies and
 *    resolves to a URLSearchParams (it has FormData's get/getAll/has/entries).
 *  - No IDNA: non-ASCII URL hosts stay Unicode (lower-cased), not punycode.
 *  - UTF-8 is the only text encoding (TextDecoder, URL percent-encoding).
 *  - Request carries url, method, headers and body only (no signal, mode...).
 *
 * Host contract: the host defines `__fazt_native.randomBytes(n)` (an
 * ArrayBuffer of n random bytes) before this runs; it is captured here, so
 * the host may delete the global afterwards. The Rust side uses the hooks on
 * the non-enumerable global `__fazt_web` (end of file).
 */
(function () {
  'use strict';

  const G = globalThis;
  const host = G.__fazt_native;
  const randomBytes = host && typeof host.randomBytes === 'function' ? host.randomBytes : null;

  // ---- Shared helpers -------------------------------------------------------

  // Internal state of every object made here. `brand` is the object's class,
  // so methods called on foreign objects fail, as WebIDL's do.
  const slots = new WeakMap();
  function own(obj, brand) {
    const s = slots.get(obj);
    if (s === undefined || s.brand !== brand) throw new TypeError('Illegal invocation');
    return s;
  }

  // WebIDL string conversions: ToString (which rejects symbols); USVString
  // also replaces lone surrogates with U+FFFD.
  const str = (x) => `${x}`;
  const usv = (x) => str(x).replace(/[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/g, '\uFFFD');
  const isObject = (x) => x !== null && (typeof x === 'object' || typeof x === 'function');
  const isIterable = (x) => isObject(x) && typeof x[Symbol.iterator] === 'function';

  // The shape WebIDL gives interfaces: enumerable attributes and operations
  // (static ones too) and a Symbol.toStringTag.
  function webidl(C) {
    for (const target of [C, C.prototype]) {
      for (const key of Object.getOwnPropertyNames(target)) {
        if (!['length', 'name', 'prototype', 'constructor'].includes(key)) Object.defineProperty(target, key, { enumerable: true });
      }
    }
    Object.defineProperty(C.prototype, Symbol.toStringTag, { value: C.name, configurable: true });
    return C;
  }

  function define(name, value) {
    if (typeof G[name] === 'undefined') Object.defineProperty(G, name, { value, writable: true, configurable: true });
  }

  // entries/keys/values/forEach/@@iterator for classes holding [name, value]
  // pairs. `source(obj)` is re-read at every step, so iteration sees changes.
  const IteratorPrototype = Object.getPrototypeOf(Object.getPrototypeOf([][Symbol.iterator]()));
  function addPairIteration(C, source) {
    const proto = Object.create(IteratorPrototype, { [Symbol.toStringTag]: { value: `${C.name} Iterator`, configurable: true } });
    Object.assign(proto, {
      next() {
        const it = own(this, proto);
        const list = source(it.target);
        if (it.index >= list.length) return { value: undefined, done: true };
        const [name, value] = list[it.index++];
        return { value: it.kind === 'keys' ? name : it.kind === 'values' ? value : [name, value], done: false };
      },
    });
    const iterate = (target, kind) => {
      source(target);
      const it = Object.create(proto);
      slots.set(it, { brand: proto, target, kind, index: 0 });
      return it;
    };
    Object.assign(C.prototype, {
      forEach(callback, thisArg = undefined) {
        if (typeof callback !== 'function') throw new TypeError('forEach: callback is not a function');
        for (let i = 0, list; i < (list = source(this)).length; i++) callback.call(thisArg, list[i][1], list[i][0], this);
      },
      entries() { return iterate(this, 'entries'); },
      keys() { return iterate(this, 'keys'); },
      values() { return iterate(this, 'values'); },
    });
    Object.defineProperty(C.prototype, Symbol.iterator, { value: C.prototype.entries, writable: true, configurable: true });
  }

  // One [name, value] entry of a sequence-of-pairs initializer.
  function toPair(pair, what) {
    const entry = isIterable(pair) ? Array.from(pair) : [];
    if (entry.length !== 2) throw new TypeError(`${what}: each entry must be a [name, value] pair`);
    return entry;
  }

  // Brand checks by internal slot, as WebIDL does (they also work across realms).
  const hasSlot = (getter) => (x) => {
    try {
      getter.call(x);
      return true;
    } catch (e) {
      return false;
    }
  };
  const isArrayBuffer = hasSlot(Object.getOwnPropertyDescriptor(ArrayBuffer.prototype, 'byteLength').get);
  const isSharedArrayBuffer =
    typeof SharedArrayBuffer === 'function' ? hasSlot(Object.getOwnPropertyDescriptor(SharedArrayBuffer.prototype, 'byteLength').get) : () => false;
  const typedArrayName = (x) => Object.getOwnPropertyDescriptor(Object.getPrototypeOf(Uint8Array.prototype), Symbol.toStringTag).get.call(x);

  // A Uint8Array view of a BufferSource, or null for anything else.
  function bufferSourceBytes(x) {
    if (ArrayBuffer.isView(x)) return new Uint8Array(x.buffer, x.byteOffset, x.byteLength);
    return isArrayBuffer(x) || isSharedArrayBuffer(x) ? new Uint8Array(x) : null;
  }

  // ---- UTF-8 ----------------------------------------------------------------

  // Byte loops are slow in an interpreter, so where the engine has the
  // built-ins (QuickJS-ng does) well-formed text takes a native route:
  // encodeURIComponent+unescape turn a string into a byte string (one char
  // per UTF-8 byte), escape+decodeURIComponent turn it back and reject
  // invalid UTF-8; btoa+Uint8Array.fromBase64 and toBase64+atob move byte
  // strings in and out of Uint8Arrays. They are captured before app code
  // runs. Without them, or for input they reject (lone surrogates, invalid
  // UTF-8), the JS coders below do the work.
  const native =
    typeof Uint8Array.fromBase64 === 'function' && typeof Uint8Array.prototype.toBase64 === 'function' &&
    typeof G.atob === 'function' && typeof G.btoa === 'function' && typeof G.escape === 'function' && typeof G.unescape === 'function'
      ? { fromBase64: Uint8Array.fromBase64, toBase64: Uint8Array.prototype.toBase64, atob: G.atob, btoa: G.btoa,
          escape: G.escape, unescape: G.unescape, encodeURIComponent, decodeURIComponent }
      : null;

  const LEAD_BYTE = [0, 0, 0xc0, 0xe0, 0xf0]; // by sequence length

  // Encodes `s` into the Uint8Array `out` as far as whole code points fit;
  // lone surrogates become U+FFFD. Returns TextEncoder.encodeInto's result.
  function utf8EncodeInto(s, out) {
    let read = 0;
    let written = 0;
    while (read < s.length) {
      let c = s.charCodeAt(read);
      let units = 1;
      if (c >= 0xd800 && c <= 0xdfff) {
        const next = s.charCodeAt(read + 1);
        if (c <= 0xdbff && next >= 0xdc00 && next <= 0xdfff) {
          c = 0x10000 + ((c - 0xd800) << 10) + (next - 0xdc00);
          units = 2;
        } else {
          c = 0xfffd;
        }
      }
      const size = c < 0x80 ? 1 : c < 0x800 ? 2 : c < 0x10000 ? 3 : 4;
      if (written + size > out.length) break;
      if (size === 1) {
        out[written++] = c;
      } else {
        out[written++] = LEAD_BYTE[size] | (c >> (6 * (size - 1)));
        for (let shift = 6 * (size - 2); shift >= 0; shift -= 6) out[written++] = 0x80 | ((c >> shift) & 0x3f);
      }
      read += units;
    }
    return { read, written };
  }

  // A Uint8Array whose buffer holds exactly the UTF-8 bytes of `s`.
  function utf8Encode(s) {
    if (native) {
      try {
        return native.fromBase64.call(Uint8Array, native.btoa(native.unescape(native.encodeURIComponent(s))));
      } catch (e) {
        // a lone surrogate: the JS encoder replaces it
      }
    }
    const out = new Uint8Array(s.length * 3);
    return out.slice(0, utf8EncodeInto(s, out).written);
  }

  // A string from a typed array of code units, in chunks that stay within
  // argument-count limits.
  function fromCodes(codes) {
    const parts = [];
    for (let i = 0; i < codes.length; i += 8192) parts.push(String.fromCharCode.apply(null, codes.subarray(i, i + 8192)));
    return parts.join('');
  }

  // Sequence length by lead byte, and the range allowed for the second byte
  // (which excludes overlong forms, surrogates and code points past U+10FFFF).
  const sequenceLength = (lead) => (lead >= 0xc2 && lead <= 0xdf ? 2 : lead >= 0xe0 && lead <= 0xef ? 3 : lead >= 0xf0 && lead <= 0xf4 ? 4 : 0);
  const secondByteMin = (lead) => (lead === 0xe0 ? 0xa0 : lead === 0xf0 ? 0x90 : 0x80);
  const secondByteMax = (lead) => (lead === 0xed ? 0x9f : lead === 0xf4 ? 0x8f : 0xbf);

  // The Encoding Standard's UTF-8 decoder: each maximal invalid subpart
  // becomes one U+FFFD, or throws a TypeError when `fatal`.
  function utf8Decode(bytes, fatal) {
    if (native) {
      try {
        return native.decodeURIComponent(native.escape(native.atob(native.toBase64.call(bytes))));
      } catch (e) {
        // invalid UTF-8: the JS decoder replaces or reports it
      }
    }
    const units = new Uint16Array(bytes.length); // never more code units than bytes
    let n = 0;
    for (let i = 0; i < bytes.length; ) {
      const lead = bytes[i++];
      if (lead < 0x80) {
        units[n++] = lead;
        continue;
      }
      let need = sequenceLength(lead) - 1;
      let cp = need > 0 ? lead & (0x7f >> (need + 1)) : -1;
      for (let lower = secondByteMin(lead), upper = secondByteMax(lead); need > 0; need--, i++, lower = 0x80, upper = 0xbf) {
        if (!(bytes[i] >= lower && bytes[i] <= upper)) {
          cp = -1; // the offending byte is not consumed
          break;
        }
        cp = (cp << 6) | (bytes[i] & 0x3f);
      }
      if (cp < 0) {
        if (fatal) throw new TypeError('The encoded data is not valid UTF-8');
        cp = 0xfffd;
      }
      if (cp >= 0x10000) {
        units[n++] = 0xd800 + ((cp - 0x10000) >> 10);
        units[n++] = 0xdc00 + ((cp - 0x10000) & 0x3ff);
      } else {
        units[n++] = cp;
      }
    }
    return fromCodes(units.subarray(0, n));
  }

  // "UTF-8 decode" as Body.text() uses it: a leading BOM is dropped.
  const decodeText = (b) => utf8Decode(b[0] === 0xef && b[1] === 0xbb && b[2] === 0xbf ? b.subarray(3) : b, false);

  // ---- Percent-encoding -----------------------------------------------------

  const hexByte = (b) => `%${b < 16 ? '0' : ''}${b.toString(16).toUpperCase()}`;
  const percentEncodeChar = (ch) => Array.from(utf8Encode(ch), hexByte).join('');

  // The URL Standard's percent-encode sets: everything outside printable
  // ASCII, plus the listed characters.
  const encodeSet = (extra) =>
    new RegExp(`[^\\x20-\\x7E]|[${extra.replace(/[^]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`)}]`, 'gu');
  const C0_CONTROL_SET = encodeSet('');
  const FRAGMENT_SET = encodeSet(' "<>`');
  const QUERY_SET = encodeSet(' "#<>');
  const SPECIAL_QUERY_SET = encodeSet(' "#<>\'');
  const PATH_SET = encodeSet(' "#<>?`{}');
  const USERINFO_SET = encodeSet(' "#<>?`{}/:;=@[\\]^|');
  const percentEncode = (s, set) => s.replace(set, percentEncodeChar);

  // Decodes each run of %XX as UTF-8; malformed escapes stay as they are.
  const percentDecode = (s) =>
    !s.includes('%')
      ? s
      : s.replace(/(?:%[0-9A-Fa-f]{2})+/g, (run) => utf8Decode(Uint8Array.from(run.slice(1).split('%'), (h) => parseInt(h, 16)), false));

  // application/x-www-form-urlencoded: only *-._ and alphanumerics stay
  // literal; space becomes '+'.
  const formEncode = (s) => s.replace(/[^*\-._0-9A-Za-z ]/gu, percentEncodeChar).replace(/ /g, '+');
  const formSerialize = (list) => list.map(([name, value]) => `${formEncode(name)}=${formEncode(value)}`).join('&');
  const formDecode = (s) => percentDecode(s.includes('+') ? s.replace(/\+/g, ' ') : s);
  function formParse(s) {
    const list = [];
    for (const part of s.split('&')) {
      if (part === '') continue;
      const eq = part.indexOf('=');
      list.push(eq < 0 ? [formDecode(part), ''] : [formDecode(part.slice(0, eq)), formDecode(part.slice(eq + 1))]);
    }
    return list;
  }

  // ---- URL parsing (WHATWG URL Standard) ------------------------------------
  //
  // A URL record is { scheme, username, password, host (string or null),
  // port (number or null), path (array of segments, or a string when the
  // path is opaque), query (string or null), fragment (string or null) }.
  // Parse functions return the record, or null on failure.

  const DEFAULT_PORTS = new Map([['ftp', 21], ['file', null], ['http', 80], ['https', 443], ['ws', 80], ['wss', 443]]);
  const isSpecial = (scheme) => DEFAULT_PORTS.has(scheme);
  const WINDOWS_DRIVE = /^[A-Za-z][:|]$/;
  const STARTS_WITH_DRIVE = /^[A-Za-z][:|](?:$|[/\\?#])/;
  const isNormalizedDrive = (s) => /^[A-Za-z]:$/.test(s);
  const stripTabs = (s) => s.replace(/[\t\n\r]/g, '');
  const indexOrEnd = (s, re) => {
    const i = s.search(re);
    return i < 0 ? s.length : i;
  };
  const hasCredentials = (url) => url.username !== '' || url.password !== '';
  const cannotHaveCredentialsOrPort = (url) => url.host === null || url.host === '' || url.scheme === 'file';

  function parseURL(input, base) {
    input = stripTabs(input.replace(/^[\0- ]+|[\0- ]+$/g, ''));
    const url = { scheme: '', username: '', password: '', host: null, port: null, path: [], query: null, fragment: null };
    const m = /^([A-Za-z][A-Za-z0-9+\-.]*):/.exec(input);
    if (m) {
      url.scheme = m[1].toLowerCase();
      const rest = input.slice(m[0].length);
      if (url.scheme === 'file') return parseFile(url, rest, base && base.scheme === 'file' ? base : null);
      if (isSpecial(url.scheme)) {
        return base && base.scheme === url.scheme ? parseRelative(url, rest, base) : parseAuthority(url, rest.replace(/^[/\\]+/, ''));
      }
      if (rest.startsWith('//')) return parseAuthority(url, rest.slice(2));
      if (rest[0] === '/') return parsePath(url, rest.slice(1));
      const end = indexOrEnd(rest, /[?#]/);
      url.path = percentEncode(rest.slice(0, end), C0_CONTROL_SET);
      return parseQueryAndFragment(url, rest.slice(end));
    }
    if (!base) return null;
    if (typeof base.path === 'string') {
      // Only a fragment can be resolved against an opaque-path URL.
      return input[0] === '#' ? Object.assign(url, base, { fragment: percentEncode(input.slice(1), FRAGMENT_SET) }) : null;
    }
    url.scheme = base.scheme;
    return base.scheme === 'file' ? parseFile(url, input, base) : parseRelative(url, input, base);
  }

  const copyAuthority = (url, base) => Object.assign(url, { username: base.username, password: base.password, host: base.host, port: base.port });

  // Input without a scheme of its own (or with the base's special scheme).
  function parseRelative(url, s, base) {
    const special = isSpecial(url.scheme);
    const isSlash = (c) => c === '/' || (special && c === '\\');
    if (isSlash(s[0]) && isSlash(s[1])) return parseAuthority(url, special ? s.replace(/^[/\\]+/, '') : s.slice(2));
    copyAuthority(url, base);
    if (isSlash(s[0])) return parsePath(url, s.slice(1));
    Object.assign(url, { path: base.path.slice(), query: base.query });
    if (s === '' || s[0] === '?' || s[0] === '#') return parseQueryAndFragment(url, s);
    url.query = null;
    shortenPath(url);
    return parsePath(url, s);
  }

  // `s` starts right after the slashes that introduce the authority.
  function parseAuthority(url, s) {
    const special = isSpecial(url.scheme);
    const end = indexOrEnd(s, special ? /[/\\?#]/ : /[/?#]/);
    let hostPort = s.slice(0, end);
    const at = hostPort.lastIndexOf('@');
    if (at >= 0) {
      const userinfo = hostPort.slice(0, at);
      const colon = userinfo.indexOf(':');
      url.username = percentEncode(colon < 0 ? userinfo : userinfo.slice(0, colon), USERINFO_SET);
      url.password = colon < 0 ? '' : percentEncode(userinfo.slice(colon + 1), USERINFO_SET);
      hostPort = hostPort.slice(at + 1);
      if (hostPort === '') return null;
    }
    const colon = portColon(hostPort);
    const hostText = colon < 0 ? hostPort : hostPort.slice(0, colon);
    if (hostText === '' && (special || colon >= 0)) return null;
    url.host = hostText === '' ? '' : parseHost(hostText, !special);
    if (url.host === null) return null;
    const portText = colon < 0 ? '' : hostPort.slice(colon + 1);
    if (portText !== '') {
      url.port = /^\d+$/.test(portText) ? parsePort(portText, url.scheme) : undefined;
      if (url.port === undefined) return null;
    }
    return parsePathStart(url, s.slice(end));
  }

  // Index of the ':' that separates host and port (skipping IPv6 brackets).
  function portColon(s) {
    for (let i = 0, inBrackets = false; i < s.length; i++) {
      if (s[i] === '[') inBrackets = true;
      else if (s[i] === ']') inBrackets = false;
      else if (s[i] === ':' && !inBrackets) return i;
    }
    return -1;
  }

  // `digits` is non-empty ASCII digits. Returns null for the scheme's
  // default port, undefined when out of range.
  function parsePort(digits, scheme) {
    const port = Number(digits);
    return port > 65535 ? undefined : port === DEFAULT_PORTS.get(scheme) ? null : port;
  }

  // After the host: special URLs always get a path, others may have none.
  function parsePathStart(url, s) {
    if (isSpecial(url.scheme)) return parsePath(url, s[0] === '/' || s[0] === '\\' ? s.slice(1) : s);
    return s[0] === '/' ? parsePath(url, s.slice(1)) : parseQueryAndFragment(url, s);
  }

  // Appends the segments of `s` to the path, resolving "." and "..". Unless
  // `pathOnly` (the pathname setter), '?' and '#' end the path.
  function parsePath(url, s, pathOnly = false) {
    const end = pathOnly ? s.length : indexOrEnd(s, /[?#]/);
    const path = s.slice(0, end);
    const segments = (isSpecial(url.scheme) && path.includes('\\') ? path.replace(/\\/g, '/') : path).split('/');
    segments.forEach((segment, i) => {
      const last = i === segments.length - 1;
      if (/^(?:\.|%2e){2}$/i.test(segment)) {
        shortenPath(url);
        if (last) url.path.push('');
      } else if (/^(?:\.|%2e)$/i.test(segment)) {
        if (last) url.path.push('');
      } else {
        if (url.scheme === 'file' && url.path.length === 0 && WINDOWS_DRIVE.test(segment)) segment = `${segment[0]}:`;
        url.path.push(percentEncode(segment, PATH_SET));
      }
    });
    return parseQueryAndFragment(url, s.slice(end));
  }

  function shortenPath(url) {
    if (!(url.scheme === 'file' && url.path.length === 1 && isNormalizedDrive(url.path[0]))) url.path.pop();
  }

  // `s` is empty or starts with '?' or '#'.
  function parseQueryAndFragment(url, s) {
    const hash = s.indexOf('#');
    if (s[0] === '?') url.query = percentEncode(s.slice(1, hash < 0 ? s.length : hash), isSpecial(url.scheme) ? SPECIAL_QUERY_SET : QUERY_SET);
    if (hash >= 0) url.fragment = percentEncode(s.slice(hash + 1), FRAGMENT_SET);
    return url;
  }

  // file: URLs have their own rules for hosts, drive letters and bases.
  function parseFile(url, s, base) {
    Object.assign(url, { scheme: 'file', host: '' });
    const isSlash = (c) => c === '/' || c === '\\';
    if (isSlash(s[0]) && isSlash(s[1])) {
      const end = 2 + indexOrEnd(s.slice(2), /[/\\?#]/);
      const hostText = s.slice(2, end);
      if (WINDOWS_DRIVE.test(hostText)) return parsePath(url, s.slice(2)); // "file://C:/" has no host
      if (hostText !== '') {
        const parsed = parseHost(hostText, false);
        if (parsed === null) return null;
        url.host = parsed === 'localhost' ? '' : parsed;
      }
      return parsePathStart(url, s.slice(end));
    }
    if (isSlash(s[0])) {
      if (base) {
        url.host = base.host;
        if (!STARTS_WITH_DRIVE.test(s.slice(1)) && isNormalizedDrive(base.path[0] || '')) url.path.push(base.path[0]);
      }
      return parsePath(url, s.slice(1));
    }
    if (base) {
      Object.assign(url, { host: base.host, path: base.path.slice(), query: base.query });
      if (s === '' || s[0] === '?' || s[0] === '#') return parseQueryAndFragment(url, s);
      url.query = null;
      if (STARTS_WITH_DRIVE.test(s)) url.path = [];
      else shortenPath(url);
    }
    return parsePath(url, s);
  }

  // Special schemes get domains (lower-cased; numeric ones normalized as
  // IPv4); others get opaque hosts. Returns null on failure.
  function parseHost(input, opaque) {
    if (input[0] === '[') {
      const pieces = input[input.length - 1] === ']' ? parseIPv6(input.slice(1, -1)) : null;
      return pieces && `[${serializeIPv6(pieces)}]`;
    }
    if (opaque) return /[\0\t\n\r #/:<>?@[\\\]^|]/.test(input) ? null : percentEncode(input, C0_CONTROL_SET);
    // No IDNA: non-ASCII labels stay Unicode, lower-cased. U+FFFD (from
    // invalid UTF-8 escapes) is rejected, as IDNA would.
    const domain = percentDecode(input).toLowerCase();
    if (domain === '' || /[\0- #%/:<>?@[\\\]^|\x7f\uFFFD]/.test(domain)) return null;
    return endsInNumber(domain) ? parseIPv4(domain) : domain;
  }

  // The dot-separated parts of a domain, ignoring one trailing dot.
  function labels(domain) {
    const parts = domain.split('.');
    if (parts.length > 1 && parts[parts.length - 1] === '') parts.pop();
    return parts;
  }

  function endsInNumber(domain) {
    const last = labels(domain).pop();
    return /^\d+$/.test(last) || parseIPv4Number(last) !== null;
  }

  // Decimal, 0x-hex or 0-octal, as inet_aton accepts.
  function parseIPv4Number(s) {
    const [digits, radix, valid] = /^0x/i.test(s) ? [s.slice(2), 16, /^[0-9a-f]*$/i] : /^0./.test(s) ? [s.slice(1), 8, /^[0-7]+$/] : [s, 10, /^\d+$/];
    return valid.test(digits) ? (digits === '' ? 0 : parseInt(digits, radix)) : null;
  }

  function parseIPv4(domain) {
    const numbers = labels(domain).map(parseIPv4Number);
    if (numbers.length > 4 || numbers.includes(null)) return null;
    const last = numbers.pop();
    if (numbers.some((n) => n > 255) || last >= 256 ** (4 - numbers.length)) return null;
    const ip = numbers.reduce((sum, n, i) => sum + n * 256 ** (3 - i), last);
    return [24, 16, 8, 0].map((shift) => (ip >>> shift) & 255).join('.');
  }

  // Eight 16-bit pieces, or null. At most one "::"; a dotted IPv4 address
  // may stand for the last two pieces.
  function parseIPv6(s) {
    let ipv4 = [];
    const dotted = /(?:^|:)([^:]*\.[^:]*)$/.exec(s);
    if (dotted) {
      const octets = dotted[1].split('.');
      if (octets.length !== 4 || !octets.every((o) => /^(?:0|[1-9]\d*)$/.test(o) && o <= 255)) return null;
      ipv4 = [octets[0] * 256 + +octets[1], octets[2] * 256 + +octets[3]];
      s = s.slice(0, s.length - dotted[1].length);
      if (/[^:]:$/.test(s)) s = s.slice(0, -1);
    }
    const halves = s.split('::');
    if (halves.length > 2) return null;
    const groups = halves.map((h) => (h === '' ? [] : h.split(':').map((x) => (/^[0-9a-f]{1,4}$/i.test(x) ? parseInt(x, 16) : NaN))));
    groups[groups.length - 1].push(...ipv4);
    const [head, tail] = groups;
    const count = head.length + (tail ? tail.length : 0);
    if (head.concat(tail || []).some(isNaN) || (tail ? count > 7 : count !== 8)) return null;
    return tail ? [...head, ...new Array(8 - count).fill(0), ...tail] : head;
  }

  // Lower-case hex; the first longest run of two or more zero pieces is "::".
  function serializeIPv6(pieces) {
    const s = pieces.map((p) => p.toString(16)).join(':');
    let best = null;
    for (const m of s.matchAll(/\b0(?::0)+\b/g)) if (!best || m[0].length > best[0].length) best = m;
    return best ? `${s.slice(0, best.index).replace(/:$/, '')}::${s.slice(best.index + best[0].length).replace(/^:/, '')}` : s;
  }

  const serializePath = (url) => (typeof url.path === 'string' ? url.path : url.path.map((segment) => `/${segment}`).join(''));
  const hostAndPort = (url) => url.host + (url.port === null ? '' : `:${url.port}`);

  function serializeURL(url) {
    let out = `${url.scheme}:`;
    if (url.host !== null) {
      out += `//${hasCredentials(url) ? `${url.username}${url.password ? `:${url.password}` : ''}@` : ''}${hostAndPort(url)}`;
    } else if (typeof url.path !== 'string' && url.path.length > 1 && url.path[0] === '') {
      out += '/.'; // so that a path starting with "//" is not read as a host
    }
    out += serializePath(url);
    if (url.query !== null) out += `?${url.query}`;
    if (url.fragment !== null) out += `#${url.fragment}`;
    return out;
  }

  function serializeOrigin(url) {
    if (url.scheme === 'blob') {
      const inner = parseURL(serializePath(url), null);
      return inner && (inner.scheme === 'http' || inner.scheme === 'https') ? serializeOrigin(inner) : 'null';
    }
    return isSpecial(url.scheme) && url.scheme !== 'file' ? `${url.scheme}://${hostAndPort(url)}` : 'null';
  }

  // Emptying the query or fragment of an opaque-path URL trims the path's
  // trailing spaces, which a reparse would otherwise drop.
  function stripTrailingSpaces(url) {
    if (typeof url.path === 'string' && url.query === null && url.fragment === null) url.path = url.path.replace(/ +$/, '');
  }

  // The host and hostname setters: the host state with a state override.
  function setHost(url, value, withPort) {
    if (typeof url.path === 'string') return;
    const special = isSpecial(url.scheme);
    const text = value.slice(0, indexOrEnd(value, special ? /[/\\?#]/ : /[/?#]/));
    if (url.scheme === 'file') {
      const parsed = text === '' ? '' : parseHost(text, false);
      if (parsed !== null) url.host = parsed === 'localhost' ? '' : parsed;
      return;
    }
    const colon = portColon(text);
    const hostText = colon < 0 ? text : text.slice(0, colon);
    if (colon >= 0 && !withPort) return;
    if (hostText === '' && (special || colon >= 0 || hasCredentials(url) || url.port !== null)) return;
    const parsed = hostText === '' ? '' : parseHost(hostText, !special);
    if (parsed === null) return;
    url.host = parsed;
    const digits = colon < 0 ? '' : /^\d*/.exec(value.slice(colon + 1))[0];
    const port = digits === '' ? undefined : parsePort(digits, url.scheme);
    if (port !== undefined) url.port = port;
  }

  function parseWithBase(url, base) {
    const baseRecord = base === undefined ? null : parseURL(usv(base), null);
    return base !== undefined && baseRecord === null ? null : parseURL(usv(url), baseRecord);
  }

  // ---- URL ------------------------------------------------------------------

  function initURL(obj, record) {
    const params = new URLSearchParams();
    Object.assign(own(params, URLSearchParams), { list: formParse(record.query || ''), url: obj });
    slots.set(obj, { brand: URL, record, params });
    return obj;
  }
  const recordOf = (obj) => own(obj, URL).record;

  class URL {
    constructor(url, base = undefined) {
      const record = parseWithBase(url, base);
      if (record === null) throw new TypeError(`Invalid URL: ${str(url)}`);
      initURL(this, record);
    }

    static canParse(url, base = undefined) { return parseWithBase(url, base) !== null; }

    static parse(url, base = undefined) {
      const record = parseWithBase(url, base);
      return record && initURL(Object.create(URL.prototype), record);
    }

    get href() { return serializeURL(recordOf(this)); }
    set href(value) {
      const state = own(this, URL);
      const record = parseURL(usv(value), null);
      if (record === null) throw new TypeError(`Invalid URL: ${str(value)}`);
      state.record = record;
      own(state.params, URLSearchParams).list = formParse(record.query || '');
    }

    get origin() { return serializeOrigin(recordOf(this)); }
    get protocol() { return `${recordOf(this).scheme}:`; }
    set protocol(value) {
      const url = recordOf(this);
      const m = /^([A-Za-z][A-Za-z0-9+\-.]*):/.exec(`${stripTabs(usv(value))}:`);
      const scheme = m && m[1].toLowerCase();
      if (!m || isSpecial(scheme) !== isSpecial(url.scheme)) return;
      if (scheme === 'file' && (hasCredentials(url) || url.port !== null)) return;
      if (url.scheme === 'file' && url.host === '') return;
      url.scheme = scheme;
      if (url.port === DEFAULT_PORTS.get(scheme)) url.port = null;
    }

    get username() { return recordOf(this).username; }
    set username(value) {
      const url = recordOf(this);
      if (!cannotHaveCredentialsOrPort(url)) url.username = percentEncode(usv(value), USERINFO_SET);
    }

    get password() { return recordOf(this).password; }
    set password(value) {
      const url = recordOf(this);
      if (!cannotHaveCredentialsOrPort(url)) url.password = percentEncode(usv(value), USERINFO_SET);
    }

    get host() {
      const url = recordOf(this);
      return url.host === null ? '' : hostAndPort(url);
    }
    set host(value) { setHost(recordOf(this), stripTabs(usv(value)), true); }
    get hostname() { return recordOf(this).host ?? ''; }
    set hostname(value) { setHost(recordOf(this), stripTabs(usv(value)), false); }

    get port() {
      const { port } = recordOf(this);
      return port === null ? '' : `${port}`;
    }
    set port(value) {
      const url = recordOf(this);
      if (cannotHaveCredentialsOrPort(url)) return;
      value = stripTabs(usv(value));
      const digits = /^\d*/.exec(value)[0];
      const port = value === '' ? null : digits === '' ? undefined : parsePort(digits, url.scheme);
      if (port !== undefined) url.port = port;
    }

    get pathname() { return serializePath(recordOf(this)); }
    set pathname(value) {
      const url = recordOf(this);
      if (typeof url.path === 'string') return;
      value = stripTabs(usv(value));
      url.path = [];
      const special = isSpecial(url.scheme);
      const leadingSlash = value[0] === '/' || (special && value[0] === '\\');
      if (value !== '' || special) parsePath(url, leadingSlash ? value.slice(1) : value, true);
      else if (url.host === null) url.path.push('');
    }

    get search() {
      const { query } = recordOf(this);
      return query ? `?${query}` : '';
    }
    set search(value) {
      const { record: url, params } = own(this, URL);
      const state = own(params, URLSearchParams);
      value = usv(value);
      const input = value[0] === '?' ? value.slice(1) : value;
      url.query = value === '' ? null : percentEncode(stripTabs(input), isSpecial(url.scheme) ? SPECIAL_QUERY_SET : QUERY_SET);
      state.list = formParse(input);
      stripTrailingSpaces(url);
    }

    get searchParams() { return own(this, URL).params; }

    get hash() {
      const { fragment } = recordOf(this);
      return fragment ? `#${fragment}` : '';
    }
    set hash(value) {
      const url = recordOf(this);
      value = usv(value);
      url.fragment = value === '' ? null : percentEncode(stripTabs(value[0] === '#' ? value.slice(1) : value), FRAGMENT_SET);
      stripTrailingSpaces(url);
    }

    toString() { return serializeURL(recordOf(this)); }
    toJSON() { return serializeURL(recordOf(this)); }
  }
  webidl(URL);

  // ---- URLSearchParams ------------------------------------------------------

  // After a change, writes the list back into the owning URL's query.
  function updateURL(params) {
    if (params.url === null) return;
    const url = recordOf(params.url);
    url.query = formSerialize(params.list) || null;
    stripTrailingSpaces(url);
  }

  class URLSearchParams {
    constructor(init = '') {
      let list;
      if (isIterable(init)) list = Array.from(init, (pair) => toPair(pair, 'URLSearchParams').map(usv));
      else if (isObject(init)) list = Object.keys(init).map((key) => [usv(key), usv(init[key])]);
      else list = formParse(usv(init).replace(/^\?/, ''));
      slots.set(this, { brand: URLSearchParams, list, url: null });
    }

    get size() { return own(this, URLSearchParams).list.length; }

    append(name, value) {
      const params = own(this, URLSearchParams);
      params.list.push([usv(name), usv(value)]);
      updateURL(params);
    }

    delete(name, value = undefined) {
      const params = own(this, URLSearchParams);
      [name, value] = [usv(name), value === undefined ? undefined : usv(value)];
      params.list = params.list.filter(([n, v]) => n !== name || (value !== undefined && v !== value));
      updateURL(params);
    }

    get(name) {
      name = usv(name);
      const entry = own(this, URLSearchParams).list.find(([n]) => n === name);
      return entry ? entry[1] : null;
    }

    getAll(name) {
      name = usv(name);
      return own(this, URLSearchParams).list.filter(([n]) => n === name).map(([, v]) => v);
    }

    has(name, value = undefined) {
      [name, value] = [usv(name), value === undefined ? undefined : usv(value)];
      return own(this, URLSearchParams).list.some(([n, v]) => n === name && (value === undefined || v === value));
    }

    set(name, value) {
      const params = own(this, URLSearchParams);
      params.list = replaceAll(params.list, usv(name), usv(value));
      updateURL(params);
    }

    // A stable sort by name in UTF-16 code unit order; the index breaks ties
    // rather than trusting the engine's sort to be stable.
    sort() {
      const params = own(this, URLSearchParams);
      params.list = params.list
        .map((entry, index) => ({ entry, index }))
        .sort((a, b) => (a.entry[0] < b.entry[0] ? -1 : a.entry[0] > b.entry[0] ? 1 : a.index - b.index))
        .map(({ entry }) => entry);
      updateURL(params);
    }

    toString() { return formSerialize(own(this, URLSearchParams).list); }
  }
  addPairIteration(URLSearchParams, (obj) => own(obj, URLSearchParams).list);
  webidl(URLSearchParams);

  // The `set` operation of URLSearchParams and Headers: the first entry named
  // `name` gets the value, later ones go; appended when there is none.
  function replaceAll(list, name, value) {
    const first = list.findIndex(([n]) => n === name);
    if (first < 0) return [...list, [name, value]];
    return list.filter(([n], i) => n !== name || i === first).map((entry, i) => (i === first ? [name, value] : entry));
  }

  // ---- Headers --------------------------------------------------------------

  const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;

  function headerName(name) {
    name = str(name);
    if (!TOKEN.test(name)) throw new TypeError(`Invalid header name: "${name}"`);
    return name.toLowerCase();
  }

  // Values lose surrounding HTTP whitespace; NUL, CR, LF and characters
  // beyond U+00FF are rejected.
  function headerValue(value) {
    value = str(value).replace(/^[\t\n\r ]+|[\t\n\r ]+$/g, '');
    if (/[\0\r\n]|[^\0-\xff]/.test(value)) throw new TypeError(`Invalid header value: "${value}"`);
    return value;
  }

  // Header state: `list` holds [lower-case name, value] in insertion order,
  // `sorted` caches the iteration order, `immutable` is the guard of
  // Response.error() and Response.redirect() headers.
  function mutable(headers) {
    if (headers.immutable) throw new TypeError('Headers are immutable');
    headers.sorted = null;
    return headers;
  }

  function appendHeader(headers, name, value) {
    const entry = [headerName(name), headerValue(value)];
    mutable(headers).list.push(entry);
  }

  function getHeader(headers, name) {
    const values = headers.list.filter(([n]) => n === name).map(([, v]) => v);
    return values.length ? values.join(', ') : null;
  }

  // Iteration order: sorted names with values combined, except that each
  // set-cookie value stays a separate entry.
  function sortAndCombine(headers) {
    if (headers.sorted) return headers.sorted;
    const sorted = [];
    for (const name of [...new Set(headers.list.map(([n]) => n))].sort()) {
      if (name === 'set-cookie') headers.list.forEach(([n, v]) => n === name && sorted.push([n, v]));
      else sorted.push([name, getHeader(headers, name)]);
    }
    return (headers.sorted = sorted);
  }

  // A new Headers object with a copy of the state's list and guard.
  function copyHeaders(headers) {
    const copy = new Headers();
    Object.assign(own(copy, Headers), { list: headers.list.map(([n, v]) => [n, v]), immutable: headers.immutable });
    return copy;
  }

  class Headers {
    constructor(init = undefined) {
      const headers = { brand: Headers, list: [], sorted: null, immutable: false };
      slots.set(this, headers);
      if (init === undefined) return;
      if (!isObject(init)) throw new TypeError('Headers: init must be an object, an array of [name, value] pairs or a Headers');
      if (isIterable(init)) for (const pair of init) appendHeader(headers, ...toPair(pair, 'Headers'));
      else for (const key of Object.keys(init)) appendHeader(headers, key, init[key]);
    }

    append(name, value) { appendHeader(own(this, Headers), name, value); }

    delete(name) {
      const headers = own(this, Headers);
      name = headerName(name);
      mutable(headers).list = headers.list.filter(([n]) => n !== name);
    }

    get(name) { return getHeader(own(this, Headers), headerName(name)); }
    getSetCookie() { return own(this, Headers).list.filter(([n]) => n === 'set-cookie').map(([, v]) => v); }

    has(name) {
      name = headerName(name);
      return own(this, Headers).list.some(([n]) => n === name);
    }

    set(name, value) {
      const headers = own(this, Headers);
      [name, value] = [headerName(name), headerValue(value)];
      mutable(headers).list = replaceAll(headers.list, name, value);
    }
  }
  addPairIteration(Headers, (obj) => sortAndCombine(own(obj, Headers)));
  webidl(Headers);

  // ---- Bodies ---------------------------------------------------------------

  // BodyInit to { bytes (an exactly-sized copy), type (implied Content-Type) }.
  function extractBody(body) {
    const params = slots.get(body);
    if (params && params.brand === URLSearchParams) {
      return { bytes: utf8Encode(formSerialize(params.list)), type: 'application/x-www-form-urlencoded;charset=UTF-8' };
    }
    const bytes = bufferSourceBytes(body);
    return bytes ? { bytes: bytes.slice(), type: null } : { bytes: utf8Encode(usv(body)), type: 'text/plain;charset=UTF-8' };
  }

  function setBody(state, { bytes, type }) {
    state.bytes = bytes;
    const headers = own(state.headers, Headers);
    if (type && getHeader(headers, 'content-type') === null) headers.list.push(['content-type', type]);
  }

  function bodyState(obj) {
    const s = slots.get(obj);
    if (s === undefined || (s.brand !== Request && s.brand !== Response)) throw new TypeError('Illegal invocation');
    return s;
  }

  // Hands the bytes over to the reader. As in the spec, a null body reads as
  // empty and does not count as used.
  function takeBody(obj) {
    const s = bodyState(obj);
    if (s.used) throw new TypeError('Body has already been used');
    const bytes = s.bytes || new Uint8Array(0);
    if (s.bytes) Object.assign(s, { bytes: null, used: true });
    return bytes;
  }

  // The body methods of Request and Response. The bytes are in memory
  // already, but the methods return promises as the spec requires.
  const bodyMethods = {
    get bodyUsed() { return bodyState(this).used; },
    async arrayBuffer() { return takeBody(this).buffer; },
    async bytes() { return takeBody(this); },
    async text() { return decodeText(takeBody(this)); },
    async json() { return JSON.parse(decodeText(takeBody(this))); },
    async formData() {
      const type = getHeader(own(bodyState(this).headers, Headers), 'content-type') || '';
      const bytes = takeBody(this);
      if (type.split(';')[0].trim().toLowerCase() !== 'application/x-www-form-urlencoded') {
        throw new TypeError('formData() supports only application/x-www-form-urlencoded bodies');
      }
      return new URLSearchParams(decodeText(bytes));
    },
  };

  // ---- Request --------------------------------------------------------------

  const normalizeMethod = (method) => {
    const upper = method.toUpperCase();
    return ['DELETE', 'GET', 'HEAD', 'OPTIONS', 'POST', 'PUT'].includes(upper) ? upper : method;
  };

  class Request {
    constructor(input, init = {}) {
      init = init ?? {};
      const source = slots.get(input);
      const from = source && source.brand === Request ? source : null;
      let { url, method } = from || { method: 'GET' };
      if (!from) {
        const record = parseURL(usv(input), null);
        if (record === null) throw new TypeError(`Invalid URL: ${str(input)}`);
        if (hasCredentials(record)) throw new TypeError('Request URL must not include credentials');
        url = serializeURL(record);
      }
      if (init.method !== undefined) {
        method = str(init.method);
        if (!TOKEN.test(method)) throw new TypeError(`Invalid method: "${method}"`);
        if (/^(?:CONNECT|TRACE|TRACK)$/i.test(method)) throw new TypeError(`Forbidden method: "${method}"`);
        method = normalizeMethod(method);
      }
      const hasInitBody = init.body !== undefined && init.body !== null;
      if ((hasInitBody || (from && from.bytes !== null)) && (method === 'GET' || method === 'HEAD')) {
        throw new TypeError('Request with GET/HEAD method cannot have a body');
      }
      const headers = init.headers !== undefined ? new Headers(init.headers) : from ? copyHeaders(own(from.headers, Headers)) : new Headers();
      const state = { brand: Request, url, method, headers, bytes: null, used: false };
      if (hasInitBody) {
        setBody(state, extractBody(init.body));
      } else if (from && (from.bytes !== null || from.used)) {
        // The new request takes the input's body over; the input becomes used.
        if (from.used) throw new TypeError('Cannot construct a Request from a Request whose body has been used');
        state.bytes = from.bytes;
        Object.assign(from, { bytes: null, used: true });
      }
      slots.set(this, state);
    }

    get method() { return own(this, Request).method; }
    get url() { return own(this, Request).url; }
    get headers() { return own(this, Request).headers; }

    clone() {
      const s = own(this, Request);
      if (s.used) throw new TypeError('Cannot clone a Request whose body has been used');
      const copy = Object.create(Request.prototype);
      slots.set(copy, { ...s, headers: copyHeaders(own(s.headers, Headers)), bytes: s.bytes && s.bytes.slice() });
      return copy;
    }
  }
  Object.defineProperties(Request.prototype, Object.getOwnPropertyDescriptors(bodyMethods));
  webidl(Request);

  // ---- Response -------------------------------------------------------------

  // WebIDL `unsigned short` conversion.
  const toUnsignedShort = (x) => {
    const n = Math.trunc(Number(x));
    return Number.isFinite(n) ? ((n % 65536) + 65536) % 65536 : 0;
  };

  // Response state from a ResponseInit and an extracted body (or null).
  function initResponse(init, body) {
    const status = init.status === undefined ? 200 : toUnsignedShort(init.status);
    if (status < 200 || status > 599) throw new RangeError(`Response status must be in the range 200 to 599, got ${status}`);
    const statusText = init.statusText === undefined ? '' : str(init.statusText);
    if (!/^[\t\x20-\x7e\x80-\xff]*$/.test(statusText)) throw new TypeError(`Invalid statusText: "${statusText}"`);
    const state = { brand: Response, type: 'default', status, statusText, headers: new Headers(init.headers), bytes: null, used: false };
    if (body !== null) {
      if ([101, 103, 204, 205, 304].includes(status)) throw new TypeError(`Response with status ${status} cannot have a body`);
      setBody(state, body);
    }
    return state;
  }

  function makeResponse(state) {
    const response = Object.create(Response.prototype);
    slots.set(response, state);
    return response;
  }

  class Response {
    constructor(body = null, init = {}) {
      slots.set(this, initResponse(init ?? {}, body === null || body === undefined ? null : extractBody(body)));
    }

    static error() {
      const headers = new Headers();
      own(headers, Headers).immutable = true;
      return makeResponse({ brand: Response, type: 'error', status: 0, statusText: '', headers, bytes: null, used: false });
    }

    static json(data, init = {}) {
      const text = JSON.stringify(data);
      if (text === undefined) throw new TypeError('Response.json: data is not JSON-serializable');
      return makeResponse(initResponse(init ?? {}, { bytes: utf8Encode(text), type: 'application/json' }));
    }

    static redirect(url, status = 302) {
      const record = parseURL(usv(url), null);
      if (record === null) throw new TypeError(`Invalid URL: ${str(url)}`);
      status = toUnsignedShort(status);
      if (![301, 302, 303, 307, 308].includes(status)) throw new RangeError(`Invalid redirect status: ${status}`);
      const state = initResponse({ status }, null);
      Object.assign(own(state.headers, Headers), { list: [['location', serializeURL(record)]], immutable: true });
      return makeResponse(state);
    }

    get type() { return own(this, Response).type; }

    get url() {
      own(this, Response);
      return ''; // constructed responses have no URL
    }

    get redirected() {
      own(this, Response);
      return false;
    }

    get status() { return own(this, Response).status; }

    get ok() {
      const { status } = own(this, Response);
      return status >= 200 && status <= 299;
    }

    get statusText() { return own(this, Response).statusText; }
    get headers() { return own(this, Response).headers; }

    clone() {
      const s = own(this, Response);
      if (s.used) throw new TypeError('Cannot clone a Response whose body has been used');
      return makeResponse({ ...s, headers: copyHeaders(own(s.headers, Headers)), bytes: s.bytes && s.bytes.slice() });
    }
  }
  Object.defineProperties(Response.prototype, Object.getOwnPropertyDescriptors(bodyMethods));
  webidl(Response);

  // ---- TextEncoder / TextDecoder --------------------------------------------

  class TextEncoder {
    constructor() { slots.set(this, { brand: TextEncoder }); }

    get encoding() {
      own(this, TextEncoder);
      return 'utf-8';
    }

    encode(input = '') {
      own(this, TextEncoder);
      return utf8Encode(str(input));
    }

    encodeInto(source, destination) {
      own(this, TextEncoder);
      if (typedArrayName(destination) !== 'Uint8Array') throw new TypeError('TextEncoder.encodeInto: destination must be a Uint8Array');
      return utf8EncodeInto(str(source), destination);
    }
  }
  webidl(TextEncoder);

  // The Encoding Standard's labels of UTF-8, the only encoding supported.
  const UTF8_LABELS = ['unicode-1-1-utf-8', 'unicode11utf8', 'unicode20utf8', 'utf-8', 'utf8', 'x-unicode20utf8'];

  // With {stream: true}, a valid but incomplete sequence at the end of the
  // input waits for the next call. Returns how many trailing bytes to keep.
  function incompleteTail(bytes) {
    for (let k = 1; k <= 3 && k <= bytes.length; k++) {
      const lead = bytes[bytes.length - k];
      if (lead >= 0x80 && lead <= 0xbf) continue;
      const second = bytes[bytes.length - k + 1];
      return sequenceLength(lead) > k && (k === 1 || (second >= secondByteMin(lead) && second <= secondByteMax(lead))) ? k : 0;
    }
    return 0;
  }

  class TextDecoder {
    constructor(label = 'utf-8', options = {}) {
      const name = str(label).replace(/^[\t\n\f\r ]+|[\t\n\f\r ]+$/g, '').toLowerCase();
      if (!UTF8_LABELS.includes(name)) throw new RangeError(`TextDecoder: the "${str(label)}" encoding is not supported`);
      const { fatal, ignoreBOM } = options ?? {};
      slots.set(this, { brand: TextDecoder, fatal: Boolean(fatal), ignoreBOM: Boolean(ignoreBOM), pending: new Uint8Array(0), bomSeen: false });
    }

    get encoding() {
      own(this, TextDecoder);
      return 'utf-8';
    }

    get fatal() { return own(this, TextDecoder).fatal; }
    get ignoreBOM() { return own(this, TextDecoder).ignoreBOM; }

    decode(input = undefined, options = {}) {
      const s = own(this, TextDecoder);
      let bytes = input === undefined ? new Uint8Array(0) : bufferSourceBytes(input);
      if (bytes === null) throw new TypeError('TextDecoder.decode: input must be an ArrayBuffer or ArrayBufferView');
      if (s.pending.length) {
        const joined = new Uint8Array(s.pending.length + bytes.length);
        joined.set(s.pending);
        joined.set(bytes, s.pending.length);
        bytes = joined;
      }
      const stream = Boolean(options && options.stream);
      const keep = stream ? incompleteTail(bytes) : 0;
      s.pending = bytes.slice(bytes.length - keep);
      let text;
      try {
        text = utf8Decode(bytes.subarray(0, bytes.length - keep), s.fatal);
      } catch (error) {
        Object.assign(s, { pending: new Uint8Array(0), bomSeen: false });
        throw error;
      }
      if (!s.bomSeen && text !== '') {
        s.bomSeen = true;
        if (!s.ignoreBOM && text[0] === '\uFEFF') text = text.slice(1);
      }
      if (!stream) s.bomSeen = false; // the next call starts a new stream
      return text;
    }
  }
  webidl(TextDecoder);

  // ---- DOMException, atob, btoa ---------------------------------------------

  const DOM_EXCEPTION_CODES = {
    IndexSizeError: 1, HierarchyRequestError: 3, WrongDocumentError: 4, InvalidCharacterError: 5, NoModificationAllowedError: 7,
    NotFoundError: 8, NotSupportedError: 9, InvalidStateError: 11, SyntaxError: 12, InvalidModificationError: 13,
    NamespaceError: 14, InvalidAccessError: 15, TypeMismatchError: 17, SecurityError: 18, NetworkError: 19, AbortError: 20,
    URLMismatchError: 21, QuotaExceededError: 22, TimeoutError: 23, InvalidNodeTypeError: 24, DataCloneError: 25,
  };

  // A minimal DOMException, for engines without one.
  const DOMException =
    typeof G.DOMException === 'function'
      ? G.DOMException
      : webidl(
          class DOMException extends Error {
            constructor(message = '', name = 'Error') {
              super(str(message));
              slots.set(this, { brand: DOMException, name: str(name) });
            }

            get name() { return own(this, DOMException).name; }

            get code() { return Object.prototype.hasOwnProperty.call(DOM_EXCEPTION_CODES, this.name) ? DOM_EXCEPTION_CODES[this.name] : 0; }
          },
        );

  const BASE64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/';
  const BASE64_VALUES = new Uint8Array(128);
  for (let i = 0; i < 64; i++) BASE64_VALUES[BASE64.charCodeAt(i)] = i;

  function btoa(data) {
    if (arguments.length === 0) throw new TypeError('btoa: 1 argument required');
    const s = str(data);
    if (/[^\0-\xff]/.test(s)) throw new DOMException('btoa: the string contains characters outside the Latin-1 range', 'InvalidCharacterError');
    const out = [];
    for (let i = 0; i < s.length; i += 3) {
      const n = (s.charCodeAt(i) << 16) | ((s.charCodeAt(i + 1) || 0) << 8) | (s.charCodeAt(i + 2) || 0);
      out.push(BASE64[n >> 18], BASE64[(n >> 12) & 63], i + 1 < s.length ? BASE64[(n >> 6) & 63] : '=', i + 2 < s.length ? BASE64[n & 63] : '=');
    }
    return out.join('');
  }

  // HTML's forgiving-base64 decode: ASCII whitespace is ignored and padding
  // is optional, but must be right when present.
  function atob(data) {
    if (arguments.length === 0) throw new TypeError('atob: 1 argument required');
    let s = str(data).replace(/[\t\n\f\r ]/g, '');
    if (s.length % 4 === 0) s = s.replace(/={1,2}$/, '');
    if (s.length % 4 === 1 || /[^A-Za-z0-9+/]/.test(s)) {
      throw new DOMException('atob: the string to be decoded is not correctly encoded', 'InvalidCharacterError');
    }
    const codes = new Uint8Array((s.length * 3) >> 2);
    for (let i = 0, j = 0, bits = 0, buffer = 0; i < s.length; i++) {
      buffer = (buffer << 6) | BASE64_VALUES[s.charCodeAt(i)];
      bits += 6;
      if (bits >= 8) {
        bits -= 8;
        codes[j++] = buffer >> bits;
        buffer &= (1 << bits) - 1;
      }
    }
    return fromCodes(codes);
  }

  // ---- crypto ---------------------------------------------------------------

  function random(n) {
    const bytes = randomBytes && bufferSourceBytes(randomBytes(n));
    if (!bytes || bytes.length < n) throw new Error('crypto: no source of randomness is available');
    return bytes.subarray(0, n);
  }

  const INTEGER_ARRAYS = ['Int8Array', 'Uint8Array', 'Uint8ClampedArray', 'Int16Array', 'Uint16Array', 'Int32Array', 'Uint32Array', 'BigInt64Array', 'BigUint64Array'];

  class Crypto {
    constructor() { throw new TypeError('Illegal constructor'); }

    getRandomValues(array) {
      own(this, Crypto);
      if (!ArrayBuffer.isView(array)) throw new TypeError('getRandomValues: argument must be an integer TypedArray');
      if (!INTEGER_ARRAYS.includes(typedArrayName(array))) throw new DOMException('getRandomValues: argument must be an integer TypedArray', 'TypeMismatchError');
      if (array.byteLength > 65536) throw new DOMException(`getRandomValues: ${array.byteLength} bytes requested, at most 65536 allowed`, 'QuotaExceededError');
      if (array.byteLength > 0) new Uint8Array(array.buffer, array.byteOffset, array.byteLength).set(random(array.byteLength));
      return array;
    }

    // A version 4 (random) UUID, lower-case.
    randomUUID() {
      own(this, Crypto);
      const b = random(16).slice();
      b[6] = (b[6] & 0x0f) | 0x40;
      b[8] = (b[8] & 0x3f) | 0x80;
      const hex = Array.from(b, (x) => (x + 0x100).toString(16).slice(1)).join('');
      return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
    }
  }
  webidl(Crypto);
  const crypto = Object.create(Crypto.prototype);
  slots.set(crypto, { brand: Crypto });

  // ---- Globals and host hooks -----------------------------------------------

  const globals = { URL, URLSearchParams, Headers, Request, Response, TextEncoder, TextDecoder, DOMException, atob, btoa, crypto };
  for (const [name, value] of Object.entries(globals)) define(name, value);

  // A string (as UTF-8) or BufferSource as an exactly-sized ArrayBuffer.
  function toBytes(x) {
    if (typeof x === 'string') return utf8Encode(x).buffer;
    if (isArrayBuffer(x)) return x;
    const view = bufferSourceBytes(x);
    if (view === null) throw new TypeError('expected a string, ArrayBuffer or ArrayBufferView');
    return view.slice().buffer;
  }

  const hooks = Object.freeze({
    // The Request for the fetch handler. The host is trusted: header pairs
    // are taken as given (names lower-cased) and any method is accepted. A
    // body on GET or HEAD is dropped.
    makeRequest(method, url, headerPairs, body) {
      const request = new Request(url);
      const state = own(request, Request);
      state.method = normalizeMethod(str(method));
      own(state.headers, Headers).list = Array.from(headerPairs || [], ([name, value]) => [str(name).toLowerCase(), str(value)]);
      if (body !== null && body !== undefined && state.method !== 'GET' && state.method !== 'HEAD') state.bytes = new Uint8Array(toBytes(body));
      return request;
    },

    // What the fetch handler returned, for the host to send. Taking the body
    // marks the Response used, as sending it would.
    readResponse(value) {
      const s = slots.get(value);
      if (s === undefined || s.brand !== Response) throw new TypeError('the fetch handler must return a Response');
      if (s.used) throw new TypeError('the returned Response body has already been used');
      const body = s.bytes && s.bytes.buffer;
      if (s.bytes) Object.assign(s, { bytes: null, used: true });
      return { status: s.status, headers: own(s.headers, Headers).list.map(([n, v]) => [n, v]), body };
    },

    toBytes,
  });
  if (typeof G.__fazt_web === 'undefined') Object.defineProperty(G, '__fazt_web', { value: hooks });
})();
