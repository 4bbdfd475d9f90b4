/*
 * Web platform classes for Fazt's serverless runtime.
 *
 * QuickJS implements the ECMAScript language but none of the web platform.
 * This classic script runs in every fresh context before app code and adds
 * what "web-standard" apps (`export default { fetch(request, env, ctx) }`)
 * rely on: URL, URLSearchParams, Headers, Request, Response, TextEncoder,
 * TextDecoder, atob, btoa, DOMException and crypto (getRandomValues,
 * randomUUID). Each global is installed only if the engine lacks it. The
 * classes use each other through this closure, never through globals that app
 * code could replace.
 *
 * Deliberate limits:
 *  - Bodies are buffered bytes. Request and Response have no `body` stream
 *    property; read them with text(), json(), arrayBuffer(), bytes() or
 *    formData(). Blob, FormData and ReadableStream bodies are not supported.
 *  - formData() parses only application/x-www-form-urlencoded bodies and
 *    resolves to a URLSearchParams (which has FormData's read methods).
 *  - No IDNA: non-ASCII URL hosts are kept as Unicode, lower-cased, not
 *    converted to punycode.
 *  - UTF-8 is the only text encoding (TextDecoder, URL percent-encoding).
 *  - Request carries only url, method, headers and body (no signal, mode...).
 *
 * Host contract: the host defines `__fazt_native.randomBytes(n)` (returns an
 * ArrayBuffer of n random bytes) before this script runs; it is captured here
 * so the host may delete the global. The Rust side calls the hooks on the
 * non-enumerable global `__fazt_web` (see the end of this file).
 */
(function () {
  'use strict';

  const G = globalThis;
  const native = G.__fazt_native;
  const randomBytes = native && typeof native.randomBytes === 'function' ? native.randomBytes : null;

  // ---- Shared helpers ---------------------------------------------------

  // Internal state of every object made here. `brand` is the class, so that
  // methods called on foreign objects fail like WebIDL's do.
  const slots = new WeakMap();
  function own(obj, C) {
    const s = slots.get(obj);
    if (s === undefined || s.brand !== C) throw new TypeError(`Illegal invocation: receiver is not a ${C.name}`);
    return s;
  }

  // WebIDL string conversions: ToString (throws on symbols); USVString also
  // replaces lone surrogates with U+FFFD.
  const str = (x) => `${x}`;
  const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/g;
  const usv = (x) => str(x).replace(LONE_SURROGATE, '\uFFFD');
  const isObject = (x) => x !== null && (typeof x === 'object' || typeof x === 'function');

  // Give a class the shape WebIDL produces: enumerable attributes and
  // operations, plus a Symbol.toStringTag.
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
  // pairs. `source(obj)` is re-read at each step, so iteration sees mutations.
  const IteratorPrototype = Object.getPrototypeOf(Object.getPrototypeOf([][Symbol.iterator]()));
  function addPairIteration(C, source) {
    const iteratorProto = Object.create(IteratorPrototype, {
      [Symbol.toStringTag]: { value: `${C.name} Iterator`, configurable: true },
    });
    const methods = {
      next() {
        const it = slots.get(this);
        if (it === undefined || it.brand !== iteratorProto) throw new TypeError('Illegal invocation');
        const list = source(it.target);
        if (it.index >= list.length) return { value: undefined, done: true };
        const [name, value] = list[it.index++];
        return { value: it.kind === 'keys' ? name : it.kind === 'values' ? value : [name, value], done: false };
      },
    };
    Object.defineProperty(iteratorProto, 'next', { value: methods.next, writable: true, enumerable: true, configurable: true });
    const members = {
      forEach(callback, thisArg = undefined) {
        source(this);
        if (typeof callback !== 'function') throw new TypeError(`${C.name}.forEach: callback is not a function`);
        for (let i = 0, list; i < (list = source(this)).length; i++) callback.call(thisArg, list[i][1], list[i][0], this);
      },
    };
    for (const kind of ['entries', 'keys', 'values']) {
      members[kind] = {
        [kind]() {
          source(this);
          const it = Object.create(iteratorProto);
          slots.set(it, { brand: iteratorProto, target: this, kind, index: 0 });
          return it;
        },
      }[kind];
    }
    for (const [key, value] of Object.entries(members)) {
      Object.defineProperty(C.prototype, key, { value, writable: true, enumerable: true, configurable: true });
    }
    Object.defineProperty(C.prototype, Symbol.iterator, { value: members.entries, writable: true, configurable: true });
  }

  // One [name, value] entry of a sequence-of-pairs initializer.
  function toPair(pair, what) {
    const entry = isObject(pair) && typeof pair[Symbol.iterator] === 'function' ? Array.from(pair) : [];
    if (entry.length !== 2) throw new TypeError(`${what}: each entry must be a [name, value] pair`);
    return entry;
  }

  // ---- UTF-8 ------------------------------------------------------------

  // Encodes `s` into `out` (a Uint8Array) as far as whole code points fit.
  // Lone surrogates become U+FFFD.
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
        out[written++] = (0xf0 << (4 - size)) | (c >> (6 * (size - 1)));
        for (let shift = 6 * (size - 2); shift >= 0; shift -= 6) out[written++] = 0x80 | ((c >> shift) & 0x3f);
      }
      read += units;
    }
    return { read, written };
  }

  // Returns a Uint8Array whose buffer holds exactly the encoded bytes.
  function utf8Encode(s) {
    const out = new Uint8Array(s.length * 3);
    return out.slice(0, utf8EncodeInto(s, out).written);
  }

  // A string from a typed array of code units, converted in chunks to stay
  // within argument-count limits.
  function fromCodes(codes) {
    const parts = [];
    for (let i = 0; i < codes.length; i += 8192) parts.push(String.fromCharCode.apply(null, codes.subarray(i, i + 8192)));
    return parts.join('');
  }

  // Bytes allowed after a lead byte (this excludes overlong forms,
  // surrogates and code points past U+10FFFF), and sequence lengths.
  const secondByteMin = (lead) => (lead === 0xe0 ? 0xa0 : lead === 0xf0 ? 0x90 : 0x80);
  const secondByteMax = (lead) => (lead === 0xed ? 0x9f : lead === 0xf4 ? 0x8f : 0xbf);
  const sequenceLength = (lead) => (lead >= 0xc2 && lead <= 0xdf ? 2 : lead >= 0xe0 && lead <= 0xef ? 3 : lead >= 0xf0 && lead <= 0xf4 ? 4 : 0);

  // The Encoding Standard's UTF-8 decoder: each maximal invalid subpart
  // becomes one U+FFFD, or throws a TypeError when `fatal`.
  function utf8Decode(bytes, fatal) {
    const units = new Uint16Array(bytes.length); // never more units than bytes
    let n = 0;
    for (let i = 0; i < bytes.length; ) {
      const lead = bytes[i++];
      if (lead < 0x80) {
        units[n++] = lead;
        continue;
      }
      let need = sequenceLength(lead) - 1;
      let cp = need > 0 ? lead & (0x7f >> (need + 1)) : -1;
      let lower = secondByteMin(lead);
      let upper = secondByteMax(lead);
      for (; need > 0; need--, i++) {
        const c = bytes[i];
        if (!(c >= lower && c <= upper)) {
          cp = -1; // the offending byte is not consumed
          break;
        }
        cp = (cp << 6) | (c & 0x3f);
        lower = 0x80;
        upper = 0xbf;
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

  // "UTF-8 decode" as used by Body.text(): a leading BOM is dropped.
  const decodeText = (b) => utf8Decode(b[0] === 0xef && b[1] === 0xbb && b[2] === 0xbf ? b.subarray(3) : b, false);

  // Brand checks by internal slot (as WebIDL does), not by prototype chain.
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
    if (isArrayBuffer(x) || isSharedArrayBuffer(x)) return new Uint8Array(x);
    return null;
  }

  // ---- Percent-encoding -------------------------------------------------

  const hexByte = (b) => `%${b < 16 ? '0' : ''}${b.toString(16).toUpperCase()}`;
  const percentEncodeChar = (ch) => Array.from(utf8Encode(ch), hexByte).join('');

  // A percent-encode set: everything outside printable ASCII, plus `extra`.
  const encodeSet = (extra) =>
    new RegExp(`[^\\x20-\\x7E]|[${extra.replace(/[^]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`)}]`, 'gu');
  const C0_CONTROL_SET = encodeSet('');
  const FRAGMENT_SET = encodeSet(' "<>`');
  const QUERY_SET = encodeSet(' "#<>');
  const SPECIAL_QUERY_SET = encodeSet(' "#<>\'');
  const PATH_SET = encodeSet(' "#<>?`{}');
  const USERINFO_SET = encodeSet(' "#<>?`{}/:;=@[\\]^|');
  const percentEncode = (s, set) => s.replace(set, percentEncodeChar);

  // Decodes runs of %XX as UTF-8; other text (and malformed escapes) stays.
  const percentDecode = (s) =>
    s.replace(/(?:%[0-9A-Fa-f]{2})+/g, (run) => {
      const bytes = new Uint8Array(run.length / 3);
      for (let i = 0; i < bytes.length; i++) bytes[i] = parseInt(run.substr(i * 3 + 1, 2), 16);
      return utf8Decode(bytes, false);
    });

  // application/x-www-form-urlencoded: only *-._ and alphanumerics stay
  // literal, space becomes '+'.
  const formEncode = (s) => s.replace(/[^*\-._0-9A-Za-z ]/gu, percentEncodeChar).replace(/ /g, '+');
  const formSerialize = (list) => list.map(([name, value]) => `${formEncode(name)}=${formEncode(value)}`).join('&');
  function formParse(s) {
    const list = [];
    for (const part of s.split('&')) {
      if (part === '') continue;
      const eq = part.indexOf('=');
      const name = eq < 0 ? part : part.slice(0, eq);
      const value = eq < 0 ? '' : part.slice(eq + 1);
      list.push([percentDecode(name.replace(/\+/g, ' ')), percentDecode(value.replace(/\+/g, ' '))]);
    }
    return list;
  }

  // ---- URL parsing (WHATWG URL Standard) --------------------------------
  //
  // A URL record is { scheme, username, password, host (string or null),
  // port (number or null), path (array of segments, or a string when the
  // path is opaque), query (string or null), fragment (string or null) }.
  // The parse functions return the record, or null on failure.

  const DEFAULT_PORTS = new Map([['ftp', 21], ['file', null], ['http', 80], ['https', 443], ['ws', 80], ['wss', 443]]);
  const isSpecial = (scheme) => DEFAULT_PORTS.has(scheme);
  const defaultPort = (scheme) => (isSpecial(scheme) ? DEFAULT_PORTS.get(scheme) : null);
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
        if (base && base.scheme === url.scheme) return parseRelative(url, rest, base);
        return parseAuthority(url, rest.replace(/^[/\\]+/, ''));
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
      if (input[0] !== '#') return null;
      return Object.assign(url, base, { fragment: percentEncode(input.slice(1), FRAGMENT_SET) });
    }
    url.scheme = base.scheme;
    return base.scheme === 'file' ? parseFile(url, input, base) : parseRelative(url, input, base);
  }

  function copyAuthority(url, base) {
    url.username = base.username;
    url.password = base.password;
    url.host = base.host;
    url.port = base.port;
  }

  // Input without a scheme of its own (or the base's special scheme).
  function parseRelative(url, s, base) {
    const special = isSpecial(url.scheme);
    const isSlash = (c) => c === '/' || (special && c === '\\');
    if (isSlash(s[0])) {
      if (isSlash(s[1])) return parseAuthority(url, special ? s.replace(/^[/\\]+/, '') : s.slice(2));
      copyAuthority(url, base);
      return parsePath(url, s.slice(1));
    }
    copyAuthority(url, base);
    url.path = base.path.slice();
    url.query = base.query;
    if (s === '' || s[0] === '?' || s[0] === '#') return parseQueryAndFragment(url, s);
    url.query = null;
    shortenPath(url);
    return parsePath(url, s);
  }

  // `s` starts right after the "//" (or slashes) that introduce the authority.
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
      const port = /^\d+$/.test(portText) ? parsePort(portText, url.scheme) : undefined;
      if (port === undefined) return null;
      url.port = port;
    }
    return parsePathStart(url, s.slice(end));
  }

  // Index of the ':' that separates host and port (IPv6 brackets skipped).
  function portColon(s) {
    let inBrackets = false;
    for (let i = 0; i < s.length; i++) {
      if (s[i] === '[') inBrackets = true;
      else if (s[i] === ']') inBrackets = false;
      else if (s[i] === ':' && !inBrackets) return i;
    }
    return -1;
  }

  // `digits` is non-empty ASCII digits. Returns null for the scheme's default
  // port, undefined when out of range.
  function parsePort(digits, scheme) {
    const port = Number(digits);
    if (port > 65535) return undefined;
    return port === defaultPort(scheme) ? null : port;
  }

  // After the host: special URLs always get a path; others may have none.
  function parsePathStart(url, s) {
    if (isSpecial(url.scheme)) return parsePath(url, s[0] === '/' || s[0] === '\\' ? s.slice(1) : s);
    return s[0] === '/' ? parsePath(url, s.slice(1)) : parseQueryAndFragment(url, s);
  }

  // Appends the segments of `s` to url.path, resolving "." and "..". Unless
  // `pathOnly` (the pathname setter), '?' and '#' end the path.
  function parsePath(url, s, pathOnly = false) {
    const end = pathOnly ? s.length : indexOrEnd(s, /[?#]/);
    const segments = s.slice(0, end).split(isSpecial(url.scheme) ? /[/\\]/ : '/');
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
    if (url.scheme === 'file' && url.path.length === 1 && isNormalizedDrive(url.path[0])) return;
    url.path.pop();
  }

  // `s` is empty or starts with '?' or '#'.
  function parseQueryAndFragment(url, s) {
    const hash = s.indexOf('#');
    if (s[0] === '?') {
      url.query = percentEncode(s.slice(1, hash < 0 ? s.length : hash), isSpecial(url.scheme) ? SPECIAL_QUERY_SET : QUERY_SET);
    }
    if (hash >= 0) url.fragment = percentEncode(s.slice(hash + 1), FRAGMENT_SET);
    return url;
  }

  // file: URLs, whose rules for hosts, drive letters and bases differ.
  function parseFile(url, s, base) {
    url.scheme = 'file';
    url.host = '';
    const isSlash = (c) => c === '/' || c === '\\';
    if (isSlash(s[0]) && isSlash(s[1])) {
      const end = 2 + indexOrEnd(s.slice(2), /[/\\?#]/);
      const hostText = s.slice(2, end);
      if (WINDOWS_DRIVE.test(hostText)) return parsePath(url, s.slice(2)); // "file://C:/" has no host
      if (hostText !== '') {
        const host = parseHost(hostText, false);
        if (host === null) return null;
        url.host = host === 'localhost' ? '' : host;
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
      url.host = base.host;
      url.path = base.path.slice();
      url.query = base.query;
      if (s === '' || s[0] === '?' || s[0] === '#') return parseQueryAndFragment(url, s);
      url.query = null;
      if (STARTS_WITH_DRIVE.test(s)) url.path = [];
      else shortenPath(url);
    }
    return parsePath(url, s);
  }

  // Host parser. Special schemes get domains (lower-cased, IPv4 numbers
  // normalized); others get opaque hosts. Returns null on failure.
  function parseHost(input, opaque) {
    if (input[0] === '[') {
      if (input[input.length - 1] !== ']') return null;
      const address = parseIPv6(input.slice(1, -1));
      return address && `[${serializeIPv6(address)}]`;
    }
    if (opaque) return /[\0\t\n\r #/:<>?@[\\\]^|]/.test(input) ? null : percentEncode(input, C0_CONTROL_SET);
    // No IDNA: non-ASCII labels are kept as Unicode, lower-cased. U+FFFD
    // (invalid UTF-8 in the escapes) is rejected, as IDNA would.
    const domain = percentDecode(input).toLowerCase();
    if (domain === '' || /[\0- #%/:<>?@[\\\]^|\x7f\uFFFD]/.test(domain)) return null;
    return endsInNumber(domain) ? parseIPv4(domain) : domain;
  }

  function endsInNumber(domain) {
    const parts = domain.split('.');
    if (parts[parts.length - 1] === '' && parts.length > 1) parts.pop();
    const last = parts[parts.length - 1];
    return /^\d+$/.test(last) || parseIPv4Number(last) !== null;
  }

  // Decimal, 0x-hex or 0-octal, as inet_aton accepts.
  function parseIPv4Number(s) {
    if (s === '') return null;
    let radix = 10;
    if (/^0x/i.test(s)) {
      s = s.slice(2);
      radix = 16;
    } else if (s.length > 1 && s[0] === '0') {
      s = s.slice(1);
      radix = 8;
    }
    if (s === '') return 0;
    const valid = radix === 16 ? /^[0-9a-f]+$/i : radix === 8 ? /^[0-7]+$/ : /^\d+$/;
    return valid.test(s) ? parseInt(s, radix) : null;
  }

  function parseIPv4(domain) {
    const parts = domain.split('.');
    if (parts[parts.length - 1] === '' && parts.length > 1) parts.pop();
    if (parts.length > 4) return null;
    const numbers = parts.map(parseIPv4Number);
    if (numbers.includes(null)) return null;
    const last = numbers.pop();
    if (numbers.some((n) => n > 255) || last >= 256 ** (4 - numbers.length)) return null;
    const ip = numbers.reduce((sum, n, i) => sum + n * 256 ** (3 - i), last);
    return [24, 16, 8, 0].map((shift) => (ip >>> shift) & 255).join('.');
  }

  // Returns eight 16-bit pieces, or null.
  function parseIPv6(s) {
    const pieces = [0, 0, 0, 0, 0, 0, 0, 0];
    const isDigit = (c) => c >= '0' && c <= '9';
    const isHex = (c) => isDigit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
    let index = 0;
    let compress = null;
    let p = 0;
    if (s[0] === ':') {
      if (s[1] !== ':') return null;
      p = 2;
      compress = ++index;
    }
    while (p < s.length) {
      if (index === 8) return null;
      if (s[p] === ':') {
        if (compress !== null) return null;
        p++;
        compress = ++index;
        continue;
      }
      let value = 0;
      let length = 0;
      while (length < 4 && p < s.length && isHex(s[p])) {
        value = value * 16 + parseInt(s[p++], 16);
        length++;
      }
      if (s[p] === '.') {
        // An embedded IPv4 address fills the last two pieces.
        if (length === 0 || index > 6) return null;
        p -= length;
        let numbersSeen = 0;
        while (p < s.length) {
          if (numbersSeen > 0) {
            if (s[p] !== '.' || numbersSeen >= 4) return null;
            p++;
          }
          if (!isDigit(s[p])) return null;
          let octet = null;
          while (p < s.length && isDigit(s[p])) {
            if (octet === 0) return null; // no leading zeros
            octet = (octet || 0) * 10 + Number(s[p++]);
            if (octet > 255) return null;
          }
          pieces[index] = pieces[index] * 256 + octet;
          numbersSeen++;
          if (numbersSeen === 2 || numbersSeen === 4) index++;
        }
        if (numbersSeen !== 4) return null;
        break;
      }
      if (s[p] === ':') {
        if (++p === s.length) return null;
      } else if (p < s.length) {
        return null;
      }
      pieces[index++] = value;
    }
    if (compress !== null) {
      // Move the pieces after "::" to the end.
      const tail = pieces.splice(compress, index - compress);
      pieces.splice(compress, 0, ...new Array(8 - index).fill(0), ...tail);
      pieces.length = 8;
    } else if (index !== 8) {
      return null;
    }
    return pieces;
  }

  // Lower-case hex; the first longest run of two or more zero pieces is "::".
  function serializeIPv6(pieces) {
    let best = -1;
    let bestLength = 1;
    for (let i = 0; i < 8; ) {
      let j = i;
      while (j < 8 && pieces[j] === 0) j++;
      if (j - i > bestLength) {
        best = i;
        bestLength = j - i;
      }
      i = j > i ? j : i + 1;
    }
    let out = '';
    for (let i = 0; i < 8; i++) {
      if (i === best) {
        out += i === 0 ? '::' : ':';
        i += bestLength - 1;
      } else {
        out += pieces[i].toString(16) + (i < 7 ? ':' : '');
      }
    }
    return out;
  }

  const serializePath = (url) => (typeof url.path === 'string' ? url.path : url.path.map((segment) => `/${segment}`).join(''));

  function serializeURL(url) {
    let out = `${url.scheme}:`;
    if (url.host !== null) {
      out += '//';
      if (hasCredentials(url)) out += `${url.username}${url.password ? `:${url.password}` : ''}@`;
      out += url.host + (url.port === null ? '' : `:${url.port}`);
    } else if (typeof url.path !== 'string' && url.path.length > 1 && url.path[0] === '') {
      out += '/.'; // keep "//" at the start of the path from reading as a host
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
    if (!isSpecial(url.scheme) || url.scheme === 'file') return 'null';
    return `${url.scheme}://${url.host}${url.port === null ? '' : `:${url.port}`}`;
  }

  // Setting search/hash to '' (or emptying searchParams) can expose trailing
  // spaces of an opaque path, which would then be trimmed when reparsed.
  function stripTrailingSpaces(url) {
    if (typeof url.path === 'string' && url.query === null && url.fragment === null) url.path = url.path.replace(/ +$/, '');
  }

  // The host and hostname setters (the host state with a state override).
  function setHost(url, value, withPort) {
    if (typeof url.path === 'string') return;
    const special = isSpecial(url.scheme);
    const text = value.slice(0, indexOrEnd(value, special ? /[/\\?#]/ : /[/?#]/));
    if (url.scheme === 'file') {
      const host = text === '' ? '' : parseHost(text, false);
      if (host !== null) url.host = host === 'localhost' ? '' : host;
      return;
    }
    const colon = portColon(text);
    const hostText = colon < 0 ? text : text.slice(0, colon);
    if (colon >= 0 && !withPort) return;
    if (hostText === '' && (special || colon >= 0 || hasCredentials(url) || url.port !== null)) return;
    const host = hostText === '' ? '' : parseHost(hostText, !special);
    if (host === null) return;
    url.host = host;
    const digits = colon < 0 ? '' : /^\d*/.exec(value.slice(colon + 1))[0];
    const port = digits === '' ? undefined : parsePort(digits, url.scheme);
    if (port !== undefined) url.port = port;
  }

  function parseWithBase(url, base) {
    let baseRecord = null;
    if (base !== undefined) {
      baseRecord = parseURL(usv(base), null);
      if (baseRecord === null) return null;
    }
    return parseURL(usv(url), baseRecord);
  }

  // ---- URL ----------------------------------------------------------------

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

    static canParse(url, base = undefined) {
      return parseWithBase(url, base) !== null;
    }

    static parse(url, base = undefined) {
      const record = parseWithBase(url, base);
      return record && initURL(Object.create(URL.prototype), record);
    }

    get href() {
      return serializeURL(recordOf(this));
    }
    set href(value) {
      const state = own(this, URL);
      const record = parseURL(usv(value), null);
      if (record === null) throw new TypeError(`Invalid URL: ${str(value)}`);
      state.record = record;
      own(state.params, URLSearchParams).list = formParse(record.query || '');
    }

    get origin() {
      return serializeOrigin(recordOf(this));
    }

    get protocol() {
      return `${recordOf(this).scheme}:`;
    }
    set protocol(value) {
      const url = recordOf(this);
      const m = /^([A-Za-z][A-Za-z0-9+\-.]*):/.exec(`${stripTabs(usv(value))}:`);
      if (!m) return;
      const scheme = m[1].toLowerCase();
      if (isSpecial(scheme) !== isSpecial(url.scheme)) return;
      if (scheme === 'file' && (hasCredentials(url) || url.port !== null)) return;
      if (url.scheme === 'file' && url.host === '') return;
      url.scheme = scheme;
      if (url.port === defaultPort(scheme)) url.port = null;
    }

    get username() {
      return recordOf(this).username;
    }
    set username(value) {
      const url = recordOf(this);
      if (!cannotHaveCredentialsOrPort(url)) url.username = percentEncode(usv(value), USERINFO_SET);
    }

    get password() {
      return recordOf(this).password;
    }
    set password(value) {
      const url = recordOf(this);
      if (!cannotHaveCredentialsOrPort(url)) url.password = percentEncode(usv(value), USERINFO_SET);
    }

    get host() {
      const { host, port } = recordOf(this);
      return host === null ? '' : port === null ? host : `${host}:${port}`;
    }
    set host(value) {
      setHost(recordOf(this), stripTabs(usv(value)), true);
    }

    get hostname() {
      return recordOf(this).host ?? '';
    }
    set hostname(value) {
      setHost(recordOf(this), stripTabs(usv(value)), false);
    }

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

    get pathname() {
      return serializePath(recordOf(this));
    }
    set pathname(value) {
      const url = recordOf(this);
      if (typeof url.path === 'string') return;
      value = stripTabs(usv(value));
      url.path = [];
      const leadingSlash = value[0] === '/' || (isSpecial(url.scheme) && value[0] === '\\');
      if (value !== '' || isSpecial(url.scheme)) parsePath(url, leadingSlash ? value.slice(1) : value, true);
      else if (url.host === null) url.path.push('');
    }

    get search() {
      const { query } = recordOf(this);
      return query ? `?${query}` : '';
    }
    set search(value) {
      const state = own(this, URL);
      const url = state.record;
      const params = own(state.params, URLSearchParams);
      value = usv(value);
      if (value === '') {
        url.query = null;
        params.list = [];
        stripTrailingSpaces(url);
        return;
      }
      const input = value[0] === '?' ? value.slice(1) : value;
      url.query = percentEncode(stripTabs(input), isSpecial(url.scheme) ? SPECIAL_QUERY_SET : QUERY_SET);
      params.list = formParse(input);
    }

    get searchParams() {
      return own(this, URL).params;
    }

    get hash() {
      const { fragment } = recordOf(this);
      return fragment ? `#${fragment}` : '';
    }
    set hash(value) {
      const url = recordOf(this);
      value = usv(value);
      if (value === '') {
        url.fragment = null;
        stripTrailingSpaces(url);
        return;
      }
      url.fragment = percentEncode(stripTabs(value[0] === '#' ? value.slice(1) : value), FRAGMENT_SET);
    }

    toString() {
      return this.href;
    }

    toJSON() {
      return this.href;
    }
  }
  webidl(URL);

  // ---- URLSearchParams ------------------------------------------------------

  // Writes the list back into the owning URL's query after a mutation.
  function updateURL(params) {
    if (params.url === null) return;
    const url = recordOf(params.url);
    const query = formSerialize(params.list);
    url.query = query === '' ? null : query;
    if (query === '') stripTrailingSpaces(url);
  }

  class URLSearchParams {
    constructor(init = '') {
      let list = [];
      if (isObject(init) && typeof init[Symbol.iterator] === 'function') {
        for (const pair of init) list.push(toPair(pair, 'URLSearchParams').map(usv));
      } else if (isObject(init)) {
        for (const key of Object.keys(init)) list.push([usv(key), usv(init[key])]);
      } else {
        const s = usv(init);
        list = formParse(s[0] === '?' ? s.slice(1) : s);
      }
      slots.set(this, { brand: URLSearchParams, list, url: null });
    }

    get size() {
      return own(this, URLSearchParams).list.length;
    }

    append(name, value) {
      const params = own(this, URLSearchParams);
      params.list.push([usv(name), usv(value)]);
      updateURL(params);
    }

    delete(name, value = undefined) {
      const params = own(this, URLSearchParams);
      name = usv(name);
      value = value === undefined ? undefined : usv(value);
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
      name = usv(name);
      value = value === undefined ? undefined : usv(value);
      return own(this, URLSearchParams).list.some(([n, v]) => n === name && (value === undefined || v === value));
    }

    set(name, value) {
      const params = own(this, URLSearchParams);
      name = usv(name);
      value = usv(value);
      const first = params.list.findIndex(([n]) => n === name);
      if (first < 0) params.list.push([name, value]);
      else params.list = params.list.filter(([n], i) => n !== name || i === first).map((e, i) => (i === first ? [name, value] : e));
      updateURL(params);
    }

    // Stable sort by name in UTF-16 code unit order (the index breaks ties
    // explicitly rather than trusting the engine's sort to be stable).
    sort() {
      const params = own(this, URLSearchParams);
      params.list = params.list
        .map((entry, index) => ({ entry, index }))
        .sort((a, b) => (a.entry[0] < b.entry[0] ? -1 : a.entry[0] > b.entry[0] ? 1 : a.index - b.index))
        .map(({ entry }) => entry);
      updateURL(params);
    }

    toString() {
      return formSerialize(own(this, URLSearchParams).list);
    }
  }
  addPairIteration(URLSearchParams, (obj) => own(obj, URLSearchParams).list);
  webidl(URLSearchParams);

  // ---- Headers --------------------------------------------------------------

  const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;

  function headerName(name) {
    name = str(name);
    if (!TOKEN.test(name)) throw new TypeError(`Invalid header name: "${name}"`);
    return name.toLowerCase();
  }

  // Values are trimmed of HTTP whitespace; NUL, CR, LF and non-byte
  // characters are rejected.
  function headerValue(value) {
    value = str(value).replace(/^[\t\n\r ]+|[\t\n\r ]+$/g, '');
    if (/[\0\r\n]|[^\0-\xff]/.test(value)) throw new TypeError(`Invalid header value: "${value}"`);
    return value;
  }

  // Header state: `list` of [lower-case name, value] in insertion order;
  // `sorted` caches the iteration order; `immutable` is the guard for
  // Response.error() and Response.redirect().
  function mutableHeaders(headers) {
    if (headers.immutable) throw new TypeError('Headers are immutable');
    headers.sorted = null;
    return headers;
  }

  function appendHeader(headers, name, value) {
    name = headerName(name);
    value = headerValue(value);
    mutableHeaders(headers).list.push([name, value]);
  }

  const getHeader = (headers, name) => {
    const values = headers.list.filter(([n]) => n === name).map(([, v]) => v);
    return values.length ? values.join(', ') : null;
  };

  // Iteration order: names sorted, values combined, except that each
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
      if (typeof init[Symbol.iterator] === 'function') {
        for (const pair of init) appendHeader(headers, ...toPair(pair, 'Headers'));
      } else {
        for (const key of Object.keys(init)) appendHeader(headers, key, init[key]);
      }
    }

    append(name, value) {
      appendHeader(own(this, Headers), name, value);
    }

    delete(name) {
      const headers = own(this, Headers);
      name = headerName(name);
      mutableHeaders(headers).list = headers.list.filter(([n]) => n !== name);
    }

    get(name) {
      return getHeader(own(this, Headers), headerName(name));
    }

    getSetCookie() {
      return own(this, Headers).list.filter(([n]) => n === 'set-cookie').map(([, v]) => v);
    }

    has(name) {
      name = headerName(name);
      return own(this, Headers).list.some(([n]) => n === name);
    }

    set(name, value) {
      const headers = own(this, Headers);
      name = headerName(name);
      value = headerValue(value);
      mutableHeaders(headers);
      const first = headers.list.findIndex(([n]) => n === name);
      if (first < 0) headers.list.push([name, value]);
      else headers.list = headers.list.filter(([n], i) => n !== name || i === first).map((e, i) => (i === first ? [name, value] : e));
    }
  }
  addPairIteration(Headers, (obj) => sortAndCombine(own(obj, Headers)));
  webidl(Headers);

  // ---- Bodies ---------------------------------------------------------------

  // BodyInit to bytes (always an exactly-sized copy) and the Content-Type it
  // implies. Objects of other kinds are stringified, as WebIDL does.
  function extractBody(body) {
    const params = slots.get(body);
    if (params && params.brand === URLSearchParams) {
      return { bytes: utf8Encode(formSerialize(params.list)), type: 'application/x-www-form-urlencoded;charset=UTF-8' };
    }
    const bytes = bufferSourceBytes(body);
    if (bytes) return { bytes: bytes.slice(), type: null };
    return { bytes: utf8Encode(usv(body)), type: 'text/plain;charset=UTF-8' };
  }

  function setBody(state, extracted) {
    state.bytes = extracted.bytes;
    const headers = own(state.headers, Headers);
    if (extracted.type && !headers.list.some(([n]) => n === 'content-type')) headers.list.push(['content-type', extracted.type]);
  }

  function bodyState(obj) {
    const s = slots.get(obj);
    if (s === undefined || (s.brand !== Request && s.brand !== Response)) throw new TypeError('Illegal invocation');
    return s;
  }

  // Hands the bytes to the reader. A null body reads as empty and, as in
  // the spec, does not count as used.
  function takeBody(obj) {
    const s = bodyState(obj);
    if (s.used) throw new TypeError('Body has already been used');
    const bytes = s.bytes || new Uint8Array(0);
    if (s.bytes) Object.assign(s, { bytes: null, used: true });
    return bytes;
  }

  // Body methods shared by Request and Response. Bodies are already in
  // memory, but the methods return promises as the spec requires.
  const bodyMethods = {
    get bodyUsed() {
      return bodyState(this).used;
    },
    async arrayBuffer() {
      return takeBody(this).buffer;
    },
    async bytes() {
      return takeBody(this);
    },
    async text() {
      return decodeText(takeBody(this));
    },
    async json() {
      return JSON.parse(decodeText(takeBody(this)));
    },
    async formData() {
      const headers = own(bodyState(this).headers, Headers);
      const bytes = takeBody(this);
      const essence = (getHeader(headers, 'content-type') || '').split(';')[0].trim().toLowerCase();
      if (essence !== 'application/x-www-form-urlencoded') {
        throw new TypeError('formData() supports only application/x-www-form-urlencoded bodies');
      }
      return new URLSearchParams(decodeText(bytes));
    },
  };

  // ---- Request --------------------------------------------------------------

  const NORMALIZED_METHODS = ['DELETE', 'GET', 'HEAD', 'OPTIONS', 'POST', 'PUT'];
  const normalizeMethod = (method) => (NORMALIZED_METHODS.includes(method.toUpperCase()) ? method.toUpperCase() : method);

  class Request {
    constructor(input, init = {}) {
      init = init ?? {};
      const source = slots.get(input);
      const from = source && source.brand === Request ? source : null;
      let url;
      let method = 'GET';
      if (from) {
        ({ url, method } = from);
      } else {
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
        // The new request takes over the input's body; the input becomes used.
        if (from.used) throw new TypeError('Cannot construct a Request from a Request whose body has been used');
        state.bytes = from.bytes;
        Object.assign(from, { bytes: null, used: true });
      }
      slots.set(this, state);
    }

    get method() {
      return own(this, Request).method;
    }

    get url() {
      return own(this, Request).url;
    }

    get headers() {
      return own(this, Request).headers;
    }

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

  const NULL_BODY_STATUSES = [101, 103, 204, 205, 304];
  const REDIRECT_STATUSES = [301, 302, 303, 307, 308];

  // WebIDL `unsigned short` conversion.
  const toUnsignedShort = (x) => {
    const n = Math.trunc(Number(x));
    return Number.isFinite(n) ? ((n % 65536) + 65536) % 65536 : 0;
  };

  // Response state from a ResponseInit and an extracted body (or null).
  function initResponse(init, body) {
    const status = init.status === undefined ? 200 : toUnsignedShort(init.status);
    if (status < 200 || status > 599) throw new RangeError(`Response status must be between 200 and 599, got ${status}`);
    const statusText = init.statusText === undefined ? '' : str(init.statusText);
    if (!/^[\t\x20-\x7e\x80-\xff]*$/.test(statusText)) throw new TypeError(`Invalid statusText: "${statusText}"`);
    const state = { brand: Response, type: 'default', status, statusText, headers: new Headers(init.headers), bytes: null, used: false };
    if (body !== null) {
      if (NULL_BODY_STATUSES.includes(status)) throw new TypeError(`Response with status ${status} cannot have a body`);
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
      if (!REDIRECT_STATUSES.includes(status)) throw new RangeError(`Invalid redirect status: ${status}`);
      const state = initResponse({ status }, null);
      const headers = own(state.headers, Headers);
      headers.list.push(['location', serializeURL(record)]);
      headers.immutable = true;
      return makeResponse(state);
    }

    get type() {
      return own(this, Response).type;
    }

    get url() {
      own(this, Response);
      return '';
    }

    get redirected() {
      own(this, Response);
      return false;
    }

    get status() {
      return own(this, Response).status;
    }

    get ok() {
      const { status } = own(this, Response);
      return status >= 200 && status <= 299;
    }

    get statusText() {
      return own(this, Response).statusText;
    }

    get headers() {
      return own(this, Response).headers;
    }

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
    constructor() {
      slots.set(this, { brand: TextEncoder });
    }

    get encoding() {
      own(this, TextEncoder);
      return 'utf-8';
    }

    encode(input = '') {
      own(this, TextEncoder);
      return utf8Encode(usv(input));
    }

    encodeInto(source, destination) {
      own(this, TextEncoder);
      if (typedArrayName(destination) !== 'Uint8Array') throw new TypeError('TextEncoder.encodeInto: destination must be a Uint8Array');
      return utf8EncodeInto(usv(source), destination);
    }
  }
  webidl(TextEncoder);

  // The Encoding Standard's labels for UTF-8, the only supported encoding.
  const UTF8_LABELS = ['unicode-1-1-utf-8', 'unicode11utf8', 'unicode20utf8', 'utf-8', 'utf8', 'x-unicode20utf8'];

  // With {stream: true}, a valid but incomplete sequence at the end of the
  // input is kept for the next call. Returns how many trailing bytes to keep.
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
      options = options ?? {};
      slots.set(this, {
        brand: TextDecoder,
        fatal: Boolean(options.fatal),
        ignoreBOM: Boolean(options.ignoreBOM),
        pending: new Uint8Array(0),
        bomChecked: false,
      });
    }

    get encoding() {
      own(this, TextDecoder);
      return 'utf-8';
    }

    get fatal() {
      return own(this, TextDecoder).fatal;
    }

    get ignoreBOM() {
      return own(this, TextDecoder).ignoreBOM;
    }

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
        Object.assign(s, { pending: new Uint8Array(0), bomChecked: false });
        throw error;
      }
      if (!s.bomChecked && text !== '') {
        s.bomChecked = true;
        if (!s.ignoreBOM && text[0] === '\uFEFF') text = text.slice(1);
      }
      if (!stream) s.bomChecked = false; // the next call starts a new stream
      return text;
    }
  }
  webidl(TextDecoder);

  // ---- DOMException, atob, btoa ---------------------------------------------

  const DOM_EXCEPTION_CODES = {
    IndexSizeError: 1, HierarchyRequestError: 3, WrongDocumentError: 4, InvalidCharacterError: 5,
    NoModificationAllowedError: 7, NotFoundError: 8, NotSupportedError: 9, InvalidStateError: 11,
    SyntaxError: 12, InvalidModificationError: 13, NamespaceError: 14, InvalidAccessError: 15,
    TypeMismatchError: 17, SecurityError: 18, NetworkError: 19, AbortError: 20, URLMismatchError: 21,
    QuotaExceededError: 22, TimeoutError: 23, InvalidNodeTypeError: 24, DataCloneError: 25,
  };

  // A minimal DOMException; an engine-provided one is used when present.
  const DOMException =
    typeof G.DOMException === 'function'
      ? G.DOMException
      : webidl(
          class DOMException extends Error {
            constructor(message = '', name = 'Error') {
              super(str(message));
              slots.set(this, { brand: DOMException, name: str(name) });
            }

            get name() {
              return own(this, DOMException).name;
            }

            get code() {
              const { name } = own(this, DOMException);
              return Object.prototype.hasOwnProperty.call(DOM_EXCEPTION_CODES, name) ? DOM_EXCEPTION_CODES[name] : 0;
            }
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

  // The HTML "forgiving-base64 decode": ASCII whitespace is ignored and
  // padding is optional, but must be correct when present.
  function atob(data) {
    if (arguments.length === 0) throw new TypeError('atob: 1 argument required');
    let s = str(data).replace(/[\t\n\f\r ]/g, '');
    if (s.length % 4 === 0) s = s.replace(/={1,2}$/, '');
    if (s.length % 4 === 1 || /[^A-Za-z0-9+/]/.test(s)) {
      throw new DOMException('atob: the string to be decoded is not correctly encoded', 'InvalidCharacterError');
    }
    const codes = new Uint8Array((s.length * 3) >> 2);
    let bits = 0;
    let buffer = 0;
    for (let i = 0, j = 0; i < s.length; i++) {
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
    if (!randomBytes) throw new Error('crypto: no source of randomness is available');
    const bytes = bufferSourceBytes(randomBytes(n));
    if (bytes === null || bytes.length < n) throw new Error('crypto: the random source returned too few bytes');
    return bytes;
  }

  const INTEGER_ARRAYS = ['Int8Array', 'Uint8Array', 'Uint8ClampedArray', 'Int16Array', 'Uint16Array', 'Int32Array', 'Uint32Array', 'BigInt64Array', 'BigUint64Array'];

  class Crypto {
    constructor() {
      throw new TypeError('Illegal constructor');
    }

    getRandomValues(array) {
      own(this, Crypto);
      const type = typedArrayName(array);
      if (type === undefined) throw new TypeError('getRandomValues: argument must be an integer TypedArray');
      if (!INTEGER_ARRAYS.includes(type)) throw new DOMException('getRandomValues: argument must be an integer TypedArray', 'TypeMismatchError');
      if (array.byteLength > 65536) {
        throw new DOMException(`getRandomValues: ${array.byteLength} bytes requested, at most 65536 are allowed`, 'QuotaExceededError');
      }
      if (array.byteLength > 0) new Uint8Array(array.buffer, array.byteOffset, array.byteLength).set(random(array.byteLength).subarray(0, array.byteLength));
      return array;
    }

    // A version 4 (random) UUID in lower-case hex.
    randomUUID() {
      own(this, Crypto);
      const b = random(16).slice(0, 16);
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

  define('URL', URL);
  define('URLSearchParams', URLSearchParams);
  define('Headers', Headers);
  define('Request', Request);
  define('Response', Response);
  define('TextEncoder', TextEncoder);
  define('TextDecoder', TextDecoder);
  define('DOMException', DOMException);
  define('atob', atob);
  define('btoa', btoa);
  define('crypto', crypto);

  // Bytes of a string (UTF-8) or BufferSource, as an exactly-sized ArrayBuffer.
  function toBytes(x) {
    if (typeof x === 'string') return utf8Encode(x).buffer;
    if (isArrayBuffer(x)) return x;
    const view = bufferSourceBytes(x);
    if (view === null) throw new TypeError('expected a string, ArrayBuffer or ArrayBufferView');
    return view.slice().buffer;
  }

  const hooks = Object.freeze({
    // The Request given to the fetch handler. The host is trusted: header
    // pairs are taken as they are (names lower-cased) and any method is
    // allowed. A body on GET or HEAD is dropped.
    makeRequest(method, url, headerPairs, body) {
      const request = new Request(url);
      const state = own(request, Request);
      state.method = normalizeMethod(str(method));
      own(state.headers, Headers).list = Array.from(headerPairs || [], ([name, value]) => [str(name).toLowerCase(), str(value)]);
      if (body !== null && body !== undefined && state.method !== 'GET' && state.method !== 'HEAD') state.bytes = new Uint8Array(toBytes(body));
      return request;
    },

    // What the fetch handler returned, for the host to send. Reading the
    // body marks the Response used, as sending it would.
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
