/*
 * Hash-chain leaves in C: the canonical form of a row's binary COPY tuple, SHA-256 leaves
 * and RFC 6962 roots. auditq/chain.py holds the specification and a pure-Python twin; the
 * tests hold both to the same bytes.
 *
 * Why C: the writer hashes every row on its own thread, which shares the GIL with callers,
 * and `auditq verify` recomputes every leaf; a JSON parse and a hash per row in Python
 * would cost several times the encoder's whole budget.
 *
 * SHA-256 comes from the libcrypto that Python's own hashlib links (found with dlopen at
 * first use, so building needs no OpenSSL headers); where it cannot be found, a portable
 * implementation below serves (slower, same digests).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <stdio.h>
#include <dlfcn.h>

#include "_speedups.h"

#define HASH_SIZE 32
#define MAX_DEPTH 1000
#define SCAN_RECORD 80
/* A v1 tuple before stamping (chain.STAMPED_FIELDS_V1) and after (len(LEAF_COLUMNS_V1)). */
#define STAMPED_FIELDS 14
#define LEAF_FIELDS 16

/* -- SHA-256 ------------------------------------------------------------------------------ */

/* OpenSSL 3's one-shot SHA256() goes through EVP_Q_digest, which fetches the algorithm
 * from a provider on every call; the low-level SHA256_Init/Update/Final (deprecated, still
 * exported by 1.1 and 3.x) call the block function directly. SHA256_CTX is 112 bytes in
 * both; the context here is bigger and aligned. */
typedef int (*sha_init_fn)(void *);
typedef int (*sha_update_fn)(void *, const void *, size_t);
typedef int (*sha_final_fn)(unsigned char *, void *);
static sha_init_fn ossl_init = NULL;
static sha_update_fn ossl_update = NULL;
static sha_final_fn ossl_final = NULL;
static void *openssl_sha256 = NULL; /* non-NULL when the three above are set */
static int sha_probed = 0;
static int force_portable = 0;

static const uint32_t K256[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
    0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
    0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
    0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
    0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
    0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
    0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void sha256_block(uint32_t h[8], const unsigned char *p) {
    uint32_t w[64];
    for (int i = 0; i < 16; i++) {
        w[i] = ((uint32_t)p[4 * i] << 24) | ((uint32_t)p[4 * i + 1] << 16) |
               ((uint32_t)p[4 * i + 2] << 8) | (uint32_t)p[4 * i + 3];
    }
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = k + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) +
                      K256[i] + w[i];
        uint32_t t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        k = g;
        g = f;
        f = e;
        e = d + t1;
        d = c;
        c = b;
        b = a;
        a = t1 + t2;
    }
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
    h[4] += e;
    h[5] += f;
    h[6] += g;
    h[7] += k;
}

static void sha256_portable(const unsigned char *data, size_t len, unsigned char *out) {
    uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                     0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    size_t full = len & ~(size_t)63;
    for (size_t i = 0; i < full; i += 64) {
        sha256_block(h, data + i);
    }
    unsigned char tail[128];
    size_t rest = len - full;
    memcpy(tail, data + full, rest);
    tail[rest] = 0x80;
    size_t padded = rest + 9 <= 64 ? 64 : 128;
    memset(tail + rest + 1, 0, padded - rest - 1);
    uint64_t bits = (uint64_t)len * 8;
    for (int i = 0; i < 8; i++) {
        tail[padded - 1 - i] = (unsigned char)(bits >> (8 * i));
    }
    sha256_block(h, tail);
    if (padded == 128) {
        sha256_block(h, tail + 64);
    }
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (unsigned char)(h[i] >> 24);
        out[4 * i + 1] = (unsigned char)(h[i] >> 16);
        out[4 * i + 2] = (unsigned char)(h[i] >> 8);
        out[4 * i + 3] = (unsigned char)h[i];
    }
}

static void probe_openssl(void) {
    static const char *names[] = {"libcrypto.so.3", "libcrypto.so.1.1", "libcrypto.so",
                                  "libcrypto.3.dylib", NULL};
    sha_probed = 1;
    for (int i = 0; names[i] != NULL; i++) {
        void *lib = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
        if (lib == NULL) {
            continue;
        }
        void *init = dlsym(lib, "SHA256_Init");
        void *update = dlsym(lib, "SHA256_Update");
        void *final = dlsym(lib, "SHA256_Final");
        if (init != NULL && update != NULL && final != NULL) {
            ossl_init = (sha_init_fn)init;
            ossl_update = (sha_update_fn)update;
            ossl_final = (sha_final_fn)final;
            openssl_sha256 = lib;
            return;
        }
        dlclose(lib);
    }
}

static inline void sha256(const unsigned char *data, size_t len, unsigned char *out) {
    if (!sha_probed) {
        probe_openssl();
    }
    if (openssl_sha256 != NULL && !force_portable) {
        _Alignas(16) unsigned char ctx[256];
        ossl_init(ctx);
        ossl_update(ctx, data, len);
        ossl_final(out, ctx);
    } else {
        sha256_portable(data, len, out);
    }
}

/* -- growable buffer ------------------------------------------------------------------------ */

typedef struct {
    unsigned char *data;
    size_t len;
    size_t cap;
} Buf;

static int buf_reserve(Buf *b, size_t extra) {
    if (b->len + extra <= b->cap) {
        return 0;
    }
    size_t cap = b->cap ? b->cap : 1024;
    while (cap < b->len + extra) {
        cap *= 2;
    }
    unsigned char *data = PyMem_Realloc(b->data, cap);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->data = data;
    b->cap = cap;
    return 0;
}

static inline int buf_put(Buf *b, const void *src, size_t n) {
    if (buf_reserve(b, n) < 0) {
        return -1;
    }
    memcpy(b->data + b->len, src, n);
    b->len += n;
    return 0;
}

static inline int buf_byte(Buf *b, unsigned char c) { return buf_put(b, &c, 1); }

static inline void put_u32_at(Buf *b, size_t at, uint32_t v) {
    b->data[at] = (unsigned char)(v >> 24);
    b->data[at + 1] = (unsigned char)(v >> 16);
    b->data[at + 2] = (unsigned char)(v >> 8);
    b->data[at + 3] = (unsigned char)v;
}

static inline int buf_u32(Buf *b, uint32_t v) {
    if (buf_reserve(b, 4) < 0) {
        return -1;
    }
    put_u32_at(b, b->len, v);
    b->len += 4;
    return 0;
}

static inline uint32_t get_u32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* Module-level scratch: the GIL serialises every caller (the extension is not loaded with
 * the GIL off, see native.py). */
static Buf scratch = {NULL, 0, 0};
static Buf members_tmp = {NULL, 0, 0};

/* -- canonical JSON ------------------------------------------------------------------------- */

typedef struct {
    const unsigned char *p;
    const unsigned char *end;
    int depth;
} Parser;

static int fail(const char *why) {
    PyErr_Format(PyExc_ValueError, "metadata is not JSON: %s", why);
    return -1;
}

static inline void skip_ws(Parser *ps) {
    while (ps->p < ps->end &&
           (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\n' || *ps->p == '\r')) {
        ps->p++;
    }
}

static int hex4(Parser *ps, uint32_t *out) {
    if (ps->end - ps->p < 4) {
        return fail("short \\u escape");
    }
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) {
        unsigned char c = ps->p[i];
        v <<= 4;
        if (c >= '0' && c <= '9') {
            v |= (uint32_t)(c - '0');
        } else if (c >= 'a' && c <= 'f') {
            v |= (uint32_t)(c - 'a' + 10);
        } else if (c >= 'A' && c <= 'F') {
            v |= (uint32_t)(c - 'A' + 10);
        } else {
            return fail("bad \\u escape");
        }
    }
    ps->p += 4;
    *out = v;
    return 0;
}

static int put_utf8(Buf *b, uint32_t cp) {
    unsigned char u[4];
    size_t n;
    if (cp < 0x80) {
        u[0] = (unsigned char)cp;
        n = 1;
    } else if (cp < 0x800) {
        u[0] = (unsigned char)(0xC0 | (cp >> 6));
        u[1] = (unsigned char)(0x80 | (cp & 0x3F));
        n = 2;
    } else if (cp < 0x10000) {
        u[0] = (unsigned char)(0xE0 | (cp >> 12));
        u[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        u[2] = (unsigned char)(0x80 | (cp & 0x3F));
        n = 3;
    } else {
        u[0] = (unsigned char)(0xF0 | (cp >> 18));
        u[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
        u[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        u[3] = (unsigned char)(0x80 | (cp & 0x3F));
        n = 4;
    }
    return buf_put(b, u, n);
}

/* A JSON string (after its opening quote) as 's'? no: as u32 length + decoded UTF-8. */
static int parse_string_body(Parser *ps, Buf *out) {
    size_t at = out->len;
    if (buf_u32(out, 0) < 0) {
        return -1;
    }
    for (;;) {
        const unsigned char *run = ps->p;
        while (ps->p < ps->end && *ps->p != '"' && *ps->p != '\\' && *ps->p >= 0x20) {
            ps->p++;
        }
        if (ps->p > run && buf_put(out, run, (size_t)(ps->p - run)) < 0) {
            return -1;
        }
        if (ps->p >= ps->end) {
            return fail("unterminated string");
        }
        unsigned char c = *ps->p++;
        if (c == '"') {
            break;
        }
        if (c < 0x20) {
            return fail("control character in string");
        }
        if (ps->p >= ps->end) {
            return fail("unterminated escape");
        }
        unsigned char e = *ps->p++;
        unsigned char lit;
        switch (e) {
        case '"': lit = '"'; break;
        case '\\': lit = '\\'; break;
        case '/': lit = '/'; break;
        case 'b': lit = '\b'; break;
        case 'f': lit = '\f'; break;
        case 'n': lit = '\n'; break;
        case 'r': lit = '\r'; break;
        case 't': lit = '\t'; break;
        case 'u': {
            uint32_t cp;
            if (hex4(ps, &cp) < 0) {
                return -1;
            }
            if (cp >= 0xD800 && cp <= 0xDBFF && ps->end - ps->p >= 6 && ps->p[0] == '\\' &&
                ps->p[1] == 'u') {
                Parser look = *ps;
                look.p += 2;
                uint32_t low;
                if (hex4(&look, &low) < 0) {
                    return -1;
                }
                if (low >= 0xDC00 && low <= 0xDFFF) {
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                    ps->p = look.p;
                }
            }
            if (put_utf8(out, cp) < 0) {
                return -1;
            }
            continue;
        }
        default:
            return fail("bad escape");
        }
        if (buf_byte(out, lit) < 0) {
            return -1;
        }
    }
    put_u32_at(out, at, (uint32_t)(out->len - at - 4));
    return 0;
}

static inline int is_digit(unsigned char c) { return c >= '0' && c <= '9'; }

static int parse_number(Parser *ps, Buf *out) {
    const unsigned char *p = ps->p;
    int negative = 0;
    if (p < ps->end && *p == '-') {
        negative = 1;
        p++;
    }
    /* significant digits: the integer and fraction digits, leading zeros dropped */
    const unsigned char *int_start = p;
    while (p < ps->end && is_digit(*p)) {
        p++;
    }
    const unsigned char *int_end = p;
    if (int_end == int_start) {
        return fail("bad number");
    }
    const unsigned char *frac_start = p, *frac_end = p;
    if (p < ps->end && *p == '.') {
        p++;
        frac_start = p;
        while (p < ps->end && is_digit(*p)) {
            p++;
        }
        frac_end = p;
        if (frac_end == frac_start) {
            return fail("bad number");
        }
    }
    int64_t exponent = 0;
    if (p < ps->end && (*p == 'e' || *p == 'E')) {
        p++;
        int eneg = 0;
        if (p < ps->end && (*p == '+' || *p == '-')) {
            eneg = *p == '-';
            p++;
        }
        if (p >= ps->end || !is_digit(*p)) {
            return fail("bad number");
        }
        while (p < ps->end && is_digit(*p)) {
            if (exponent < INT64_C(100000000000000)) {
                exponent = exponent * 10 + (*p - '0');
            }
            p++;
        }
        if (eneg) {
            exponent = -exponent;
        }
    }
    ps->p = p;
    exponent -= (int64_t)(frac_end - frac_start);
    /* digits = int digits + frac digits; strip leading zeros, then trailing zeros */
    size_t n_int = (size_t)(int_end - int_start), n_frac = (size_t)(frac_end - frac_start);
    size_t total = n_int + n_frac;
    size_t lead = 0;
    while (lead < total && (lead < n_int ? int_start[lead] : frac_start[lead - n_int]) == '0') {
        lead++;
    }
    size_t at = out->len;
    if (buf_byte(out, 'n') < 0 || buf_u32(out, 0) < 0) {
        return -1;
    }
    if (lead == total) {
        if (buf_byte(out, '0') < 0) {
            return -1;
        }
    } else {
        size_t last = total; /* one past the last non-zero digit */
        while ((last - 1 < n_int ? int_start[last - 1] : frac_start[last - 1 - n_int]) == '0') {
            last--;
        }
        exponent += (int64_t)(total - last);
        if (negative && buf_byte(out, '-') < 0) {
            return -1;
        }
        if (buf_reserve(out, last - lead) < 0) {
            return -1;
        }
        for (size_t i = lead; i < last; i++) {
            out->data[out->len++] = i < n_int ? int_start[i] : frac_start[i - n_int];
        }
        /* "e" and the exponent in decimal (snprintf's format parsing cost more than the
         * rest of a small number's canonical form) */
        char exp_text[32];
        char *q = exp_text + sizeof exp_text;
        uint64_t mag = exponent < 0 ? (uint64_t)(-(exponent + 1)) + 1 : (uint64_t)exponent;
        do {
            *--q = (char)('0' + mag % 10);
            mag /= 10;
        } while (mag != 0);
        if (exponent < 0) {
            *--q = '-';
        }
        *--q = 'e';
        if (buf_put(out, q, (size_t)(exp_text + sizeof exp_text - q)) < 0) {
            return -1;
        }
    }
    put_u32_at(out, at + 1, (uint32_t)(out->len - at - 5));
    return 0;
}

static int parse_value(Parser *ps, Buf *out);

typedef struct {
    size_t off;  /* member start in out: u32 key length, key, value */
    size_t len;  /* member length */
    size_t index;
} Member;

static const unsigned char *member_base; /* for the comparator (GIL-serialised) */

static int member_cmp(const void *a, const void *b) {
    const Member *x = a, *y = b;
    uint32_t xl = get_u32(member_base + x->off), yl = get_u32(member_base + y->off);
    int c = memcmp(member_base + x->off + 4, member_base + y->off + 4, xl < yl ? xl : yl);
    if (c != 0) {
        return c;
    }
    if (xl != yl) {
        return xl < yl ? -1 : 1;
    }
    return x->index < y->index ? -1 : (x->index > y->index ? 1 : 0);
}

/* Insertion sort for the usual handful of keys (qsort's call per comparison costs more). */
static void sort_members(Member *m, size_t n) {
    if (n > 16) {
        qsort(m, n, sizeof(Member), member_cmp);
        return;
    }
    for (size_t i = 1; i < n; i++) {
        Member key = m[i];
        size_t j = i;
        while (j > 0 && member_cmp(&m[j - 1], &key) > 0) {
            m[j] = m[j - 1];
            j--;
        }
        m[j] = key;
    }
}

static int parse_object(Parser *ps, Buf *out) {
    size_t start = out->len;
    Member local[16];
    Member *members = local;
    size_t count = 0, cap = 16;
    int rc = -1;
    if (buf_byte(out, 'o') < 0 || buf_u32(out, 0) < 0) {
        return -1;
    }
    size_t body = out->len;
    skip_ws(ps);
    if (ps->p < ps->end && *ps->p == '}') {
        ps->p++;
        return 0;
    }
    for (;;) {
        skip_ws(ps);
        if (ps->p >= ps->end || *ps->p != '"') {
            fail("expected a key");
            goto done;
        }
        ps->p++;
        if (count == cap) {
            cap *= 2;
            Member *grown = PyMem_Malloc(cap * sizeof(Member));
            if (grown == NULL) {
                PyErr_NoMemory();
                goto done;
            }
            memcpy(grown, members, count * sizeof(Member));
            if (members != local) {
                PyMem_Free(members);
            }
            members = grown;
        }
        size_t off = out->len;
        if (parse_string_body(ps, out) < 0) {
            goto done;
        }
        skip_ws(ps);
        if (ps->p >= ps->end || *ps->p != ':') {
            fail("expected ':'");
            goto done;
        }
        ps->p++;
        if (parse_value(ps, out) < 0) {
            goto done;
        }
        members[count].off = off;
        members[count].len = out->len - off;
        members[count].index = count;
        count++;
        skip_ws(ps);
        if (ps->p < ps->end && *ps->p == ',') {
            ps->p++;
            continue;
        }
        if (ps->p < ps->end && *ps->p == '}') {
            ps->p++;
            break;
        }
        fail("expected ',' or '}'");
        goto done;
    }
    /* sort by key bytes (then text order), keep the last of equal keys, write back */
    member_base = out->data;
    sort_members(members, count);
    members_tmp.len = 0;
    size_t kept = 0;
    for (size_t i = 0; i < count; i++) {
        if (i + 1 < count) {
            uint32_t a = get_u32(out->data + members[i].off);
            uint32_t b = get_u32(out->data + members[i + 1].off);
            if (a == b && memcmp(out->data + members[i].off + 4,
                                 out->data + members[i + 1].off + 4, a) == 0) {
                continue; /* a later duplicate follows: it wins */
            }
        }
        if (buf_put(&members_tmp, out->data + members[i].off, members[i].len) < 0) {
            goto done;
        }
        kept++;
    }
    out->len = body;
    if (buf_put(out, members_tmp.data, members_tmp.len) < 0) {
        goto done;
    }
    put_u32_at(out, start + 1, (uint32_t)kept);
    rc = 0;
done:
    if (members != local) {
        PyMem_Free(members);
    }
    return rc;
}

static int parse_array(Parser *ps, Buf *out) {
    size_t start = out->len;
    uint32_t count = 0;
    if (buf_byte(out, 'a') < 0 || buf_u32(out, 0) < 0) {
        return -1;
    }
    skip_ws(ps);
    if (ps->p < ps->end && *ps->p == ']') {
        ps->p++;
        return 0;
    }
    for (;;) {
        if (parse_value(ps, out) < 0) {
            return -1;
        }
        count++;
        skip_ws(ps);
        if (ps->p < ps->end && *ps->p == ',') {
            ps->p++;
            continue;
        }
        if (ps->p < ps->end && *ps->p == ']') {
            ps->p++;
            break;
        }
        return fail("expected ',' or ']'");
    }
    put_u32_at(out, start + 1, count);
    return 0;
}

static int literal(Parser *ps, const char *word, size_t n) {
    if ((size_t)(ps->end - ps->p) < n || memcmp(ps->p, word, n) != 0) {
        return fail("unexpected character");
    }
    ps->p += n;
    return 0;
}

static int parse_value(Parser *ps, Buf *out) {
    skip_ws(ps);
    if (ps->p >= ps->end) {
        return fail("unexpected end");
    }
    if (++ps->depth > MAX_DEPTH) {
        return fail("nested too deeply");
    }
    int rc;
    unsigned char c = *ps->p;
    if (c == '{') {
        ps->p++;
        rc = parse_object(ps, out);
    } else if (c == '[') {
        ps->p++;
        rc = parse_array(ps, out);
    } else if (c == '"') {
        ps->p++;
        rc = buf_byte(out, 's') < 0 ? -1 : parse_string_body(ps, out);
    } else if (c == 't') {
        rc = literal(ps, "true", 4) < 0 ? -1 : buf_byte(out, 't');
    } else if (c == 'f') {
        rc = literal(ps, "false", 5) < 0 ? -1 : buf_byte(out, 'f');
    } else if (c == 'n') {
        rc = literal(ps, "null", 4) < 0 ? -1 : buf_byte(out, 'z');
    } else if (c == '-' || is_digit(c)) {
        rc = parse_number(ps, out);
    } else {
        rc = fail("unexpected character");
    }
    ps->depth--;
    return rc;
}

static int canonical_into(const unsigned char *text, size_t len, Buf *out) {
    Parser ps = {text, text + len, 0};
    if (parse_value(&ps, out) < 0) {
        return -1;
    }
    skip_ws(&ps);
    if (ps.p != ps.end) {
        return fail("extra data after the value");
    }
    return 0;
}

/* -- leaves ---------------------------------------------------------------------------------- */

static inline int32_t get_i32(const unsigned char *p) { return (int32_t)get_u32(p); }

/* The leaf of the tuple at data[0:len] (which must be complete) into out[32]; with
 * `extra` (the stream's 16 bytes, then an 8-byte position) appended as two more fields. */
static int leaf_of(const unsigned char *data, size_t len, int json_field,
                   const unsigned char *extra, unsigned char *out) {
    if (len < 2) {
        PyErr_SetString(PyExc_ValueError, "truncated tuple");
        return -1;
    }
    int count = (int16_t)((data[0] << 8) | data[1]);
    int total = count + (extra ? 2 : 0);
    scratch.len = 0;
    unsigned char head[7] = {0x00, 'A', 'Q', 'L', '1', (unsigned char)(total >> 8),
                             (unsigned char)total};
    if (buf_put(&scratch, head, sizeof head) < 0) {
        return -1;
    }
    size_t at = 2;
    for (int i = 0; i < count; i++) {
        if (at + 4 > len) {
            PyErr_SetString(PyExc_ValueError, "truncated tuple");
            return -1;
        }
        int32_t flen = get_i32(data + at);
        if (flen < 0) {
            if (buf_put(&scratch, data + at, 4) < 0) {
                return -1;
            }
            at += 4;
            continue;
        }
        if (at + 4 + (size_t)flen > len) {
            PyErr_SetString(PyExc_ValueError, "truncated tuple");
            return -1;
        }
        if (i == json_field) {
            if (flen < 1 || data[at + 4] != 1) {
                PyErr_SetString(PyExc_ValueError,
                                "jsonb field without binary format version 1");
                return -1;
            }
            size_t len_at = scratch.len;
            if (buf_u32(&scratch, 0) < 0 ||
                canonical_into(data + at + 5, (size_t)flen - 1, &scratch) < 0) {
                return -1;
            }
            put_u32_at(&scratch, len_at, (uint32_t)(scratch.len - len_at - 4));
        } else if (buf_put(&scratch, data + at, 4 + (size_t)flen) < 0) {
            return -1;
        }
        at += 4 + (size_t)flen;
    }
    if (extra != NULL) {
        static const unsigned char l16[4] = {0, 0, 0, 16}, l8[4] = {0, 0, 0, 8};
        if (buf_put(&scratch, l16, 4) < 0 || buf_put(&scratch, extra, 16) < 0 ||
            buf_put(&scratch, l8, 4) < 0 || buf_put(&scratch, extra + 16, 8) < 0) {
            return -1;
        }
    }
    sha256(scratch.data, scratch.len, out);
    return 0;
}

/* The length of the complete tuple at data[0:avail], 0 when it is incomplete, -1 for the
 * trailer; sets *fields to its field count. */
static Py_ssize_t tuple_length(const unsigned char *data, size_t avail, int *fields) {
    if (avail < 2) {
        return 0;
    }
    int count = (int16_t)((data[0] << 8) | data[1]);
    *fields = count;
    if (count == -1) {
        return -1;
    }
    size_t at = 2;
    for (int i = 0; i < count; i++) {
        if (at + 4 > avail) {
            return 0;
        }
        int32_t flen = get_i32(data + at);
        at += 4 + (flen > 0 ? (size_t)flen : 0);
        if (at > avail) {
            return 0;
        }
    }
    return (Py_ssize_t)at;
}

static PyObject *chain_leaves(PyObject *self, PyObject *args) {
    Py_buffer view;
    int json_field = 12;
    if (!PyArg_ParseTuple(args, "y*|i", &view, &json_field)) {
        return NULL;
    }
    const unsigned char *data = view.buf;
    size_t len = (size_t)view.len, at = 0;
    Buf out = {NULL, 0, 0};
    while (at < len) {
        int fields;
        Py_ssize_t n = tuple_length(data + at, len - at, &fields);
        if (n <= 0 || buf_reserve(&out, HASH_SIZE) < 0 ||
            leaf_of(data + at, (size_t)n, json_field, NULL, out.data + out.len) < 0) {
            if (n <= 0) {
                PyErr_SetString(PyExc_ValueError, "truncated tuple");
            }
            PyMem_Free(out.data);
            PyBuffer_Release(&view);
            return NULL;
        }
        out.len += HASH_SIZE;
        at += (size_t)n;
    }
    PyBuffer_Release(&view);
    PyObject *result = PyBytes_FromStringAndSize((const char *)out.data, (Py_ssize_t)out.len);
    PyMem_Free(out.data);
    return result;
}

/* The stamped tuples and their leaves are written straight into bytes objects of their
 * exact size (a first pass counts the tuples): no growing buffer, no copy into the
 * result, and no resize (shrinking a large block in place defeats the allocator's reuse
 * of it and costs page faults on every call). */
static PyObject *chain_stamp(PyObject *self, PyObject *args) {
    Py_buffer view, stream;
    unsigned long long first_pos;
    if (!PyArg_ParseTuple(args, "y*y*K", &view, &stream, &first_pos)) {
        return NULL;
    }
    PyObject *result = NULL, *out = NULL, *leaves = NULL;
    if (stream.len != 16) {
        PyErr_SetString(PyExc_ValueError, "stream must be 16 bytes");
        goto done;
    }
    const unsigned char *data = view.buf;
    size_t len = (size_t)view.len, at = 0;
    size_t rows = 0;
    while (at < len) {
        int fields;
        Py_ssize_t n = tuple_length(data + at, len - at, &fields);
        if (n <= 0) {
            PyErr_SetString(PyExc_ValueError, "truncated tuple");
            goto done;
        }
        if (fields != STAMPED_FIELDS) {
            PyErr_Format(PyExc_ValueError, "a row with %d fields, expected %d", fields,
                         STAMPED_FIELDS);
            goto done;
        }
        at += (size_t)n;
        rows++;
    }
    at = 0;
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(len + 32 * rows));
    leaves = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(HASH_SIZE * rows));
    if (out == NULL || leaves == NULL) {
        goto done;
    }
    unsigned char *o = (unsigned char *)PyBytes_AS_STRING(out);
    unsigned char *l = (unsigned char *)PyBytes_AS_STRING(leaves);
    size_t o_len = 0, l_len = 0;
    unsigned char extra[24];
    memcpy(extra, stream.buf, 16);
    uint64_t pos = first_pos;
    static const unsigned char l16[4] = {0, 0, 0, 16}, l8[4] = {0, 0, 0, 8};
    while (at < len) {
        int fields;
        Py_ssize_t n = tuple_length(data + at, len - at, &fields);
        for (int i = 0; i < 8; i++) {
            extra[16 + i] = (unsigned char)(pos >> (56 - 8 * i));
        }
        if (leaf_of(data + at, (size_t)n, 12, extra, l + l_len) < 0) {
            goto done;
        }
        l_len += HASH_SIZE;
        unsigned char *t = o + o_len;
        int total = fields + 2;
        t[0] = (unsigned char)(total >> 8);
        t[1] = (unsigned char)total;
        memcpy(t + 2, data + at + 2, (size_t)n - 2);
        t += n;
        memcpy(t, l16, 4);
        memcpy(t + 4, extra, 16);
        memcpy(t + 20, l8, 4);
        memcpy(t + 24, extra + 16, 8);
        o_len += (size_t)n + 32;
        at += (size_t)n;
        pos++;
    }
    result = PyTuple_Pack(2, out, leaves);
done:
    Py_XDECREF(out);
    Py_XDECREF(leaves);
    PyBuffer_Release(&view);
    PyBuffer_Release(&stream);
    return result;
}

/* RFC 6962 root: pair left to right, promote an odd last node. */
static int root_into(const unsigned char *leaves, size_t n, unsigned char *out) {
    if (n == 0) {
        sha256((const unsigned char *)"", 0, out);
        return 0;
    }
    unsigned char *level = PyMem_Malloc(n * HASH_SIZE);
    if (level == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(level, leaves, n * HASH_SIZE);
    unsigned char node[1 + 2 * HASH_SIZE];
    node[0] = 0x01;
    while (n > 1) {
        size_t m = 0;
        for (size_t i = 0; i + 1 < n; i += 2) {
            memcpy(node + 1, level + i * HASH_SIZE, 2 * HASH_SIZE);
            sha256(node, sizeof node, level + m * HASH_SIZE);
            m++;
        }
        if (n % 2) {
            memmove(level + m * HASH_SIZE, level + (n - 1) * HASH_SIZE, HASH_SIZE);
            m++;
        }
        n = m;
    }
    memcpy(out, level, HASH_SIZE);
    PyMem_Free(level);
    return 0;
}

static PyObject *chain_root(PyObject *self, PyObject *args) {
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "y*", &view)) {
        return NULL;
    }
    if (view.len % HASH_SIZE) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "leaves must be whole 32-byte hashes");
        return NULL;
    }
    unsigned char out[HASH_SIZE];
    int rc = root_into(view.buf, (size_t)view.len / HASH_SIZE, out);
    PyBuffer_Release(&view);
    if (rc < 0) {
        return NULL;
    }
    return PyBytes_FromStringAndSize((const char *)out, HASH_SIZE);
}

/* scan(buf, start, fields) -> (next, records, ended, leaves): the complete tuples of a binary COPY
 * TO stream from `start`; each gives an 80-byte record: stream[16] pos[8] id[16] leaf[32]
 * tuple offset[4] tuple length[4]. Stops at an incomplete tuple (next is where it starts)
 * or at the trailer (ended). The stream and position are the last two fields; `leaves` is
 * the records' leaves again, contiguous, so a whole batch is checked with one comparison. */
static PyObject *chain_scan(PyObject *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t start;
    int want = LEAF_FIELDS;
    if (!PyArg_ParseTuple(args, "y*n|i", &view, &start, &want)) {
        return NULL;
    }
    const unsigned char *data = view.buf;
    size_t len = (size_t)view.len, at = (size_t)start;
    Buf out = {NULL, 0, 0}, leaves = {NULL, 0, 0};
    int ended = 0;
    PyObject *result = NULL;
    while (at < len) {
        int fields = 0;
        Py_ssize_t n = tuple_length(data + at, len - at, &fields);
        if (n == -1) {
            at += 2;
            ended = 1;
            break;
        }
        if (n == 0) {
            break;
        }
        if (fields != want) {
            PyErr_Format(PyExc_ValueError, "a row with %d fields, expected %d", fields, want);
            goto done;
        }
        if (buf_reserve(&out, SCAN_RECORD) < 0) {
            goto done;
        }
        unsigned char *rec = out.data + out.len;
        memset(rec, 0, 40);
        /* walk to the id (field 0), stream (want-2) and position (want-1) */
        size_t f = at + 2;
        for (int i = 0; i < fields; i++) {
            int32_t flen = get_i32(data + f);
            const unsigned char *value = data + f + 4;
            if (i == 0 && flen == 16) {
                memcpy(rec + 24, value, 16);
            } else if (i == want - 2 && flen == 16) {
                memcpy(rec, value, 16);
            } else if (i == want - 1 && flen == 8) {
                memcpy(rec + 16, value, 8);
            }
            f += 4 + (flen > 0 ? (size_t)flen : 0);
        }
        if (leaf_of(data + at, (size_t)n, 12, NULL, rec + 40) < 0) {
            goto done;
        }
        put_u32_at(&out, out.len + 72, (uint32_t)at);
        put_u32_at(&out, out.len + 76, (uint32_t)n);
        if (buf_put(&leaves, rec + 40, HASH_SIZE) < 0) {
            goto done;
        }
        out.len += SCAN_RECORD;
        at += (size_t)n;
    }
    result = Py_BuildValue("ny#Oy#", (Py_ssize_t)at, out.data ? (const char *)out.data : "",
                           (Py_ssize_t)out.len, ended ? Py_True : Py_False,
                           leaves.data ? (const char *)leaves.data : "", (Py_ssize_t)leaves.len);
done:
    PyMem_Free(out.data);
    PyMem_Free(leaves.data);
    PyBuffer_Release(&view);
    return result;
}

static PyObject *chain_canonical_json(PyObject *self, PyObject *args) {
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "s*", &view)) {
        return NULL;
    }
    Buf out = {NULL, 0, 0};
    int rc = canonical_into(view.buf, (size_t)view.len, &out);
    PyBuffer_Release(&view);
    PyObject *result = NULL;
    if (rc == 0) {
        result = PyBytes_FromStringAndSize(out.data ? (const char *)out.data : "",
                                           (Py_ssize_t)out.len);
    }
    PyMem_Free(out.data);
    return result;
}

static PyObject *chain_sha256(PyObject *self, PyObject *args) {
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "y*", &view)) {
        return NULL;
    }
    unsigned char out[HASH_SIZE];
    sha256(view.buf, (size_t)view.len, out);
    PyBuffer_Release(&view);
    return PyBytes_FromStringAndSize((const char *)out, HASH_SIZE);
}

static PyObject *chain_sha256_backend(PyObject *self, PyObject *args) {
    int portable = -1;
    if (!PyArg_ParseTuple(args, "|p", &portable)) {
        return NULL;
    }
    if (portable != -1) {
        force_portable = portable;
    }
    if (!sha_probed) {
        probe_openssl();
    }
    return PyUnicode_FromString(openssl_sha256 != NULL && !force_portable ? "openssl"
                                                                          : "portable");
}

static PyMethodDef chain_methods[] = {
    {"chain_leaves", chain_leaves, METH_VARARGS,
     "chain_leaves(tuples, json_field=12) -> the 32-byte leaf of each binary COPY tuple"},
    {"chain_stamp", chain_stamp, METH_VARARGS,
     "chain_stamp(tuples, stream, first_pos) -> (tuples with chain_stream and chain_pos "
     "appended, their leaves)"},
    {"chain_root", chain_root, METH_VARARGS, "chain_root(leaves) -> RFC 6962 Merkle root"},
    {"chain_scan", chain_scan, METH_VARARGS,
     "chain_scan(buf, start, fields=16) -> (next, records, ended, leaves) over COPY TO data"},
    {"chain_canonical_json", chain_canonical_json, METH_VARARGS,
     "chain_canonical_json(text) -> the canonical form of a JSON text"},
    {"chain_sha256", chain_sha256, METH_VARARGS, "chain_sha256(data) -> SHA-256 digest"},
    {"chain_sha256_backend", chain_sha256_backend, METH_VARARGS,
     "chain_sha256_backend([portable]) -> 'openssl' or 'portable' (forces one when given)"},
    {NULL, NULL, 0, NULL},
};

int auditq_add_chain(PyObject *module) { return PyModule_AddFunctions(module, chain_methods); }
